"""OpenAI bodies into GenerationRequest: accepted shapes, and a typed error naming the param for bad ones."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from darkbloom.errors import InvalidRequest
from darkbloom.inference.params import parse_chat, parse_completion

MSG = [{"role": "user", "content": "hi"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MSG, **kw}


def test_minimal_chat_has_openai_defaults() -> None:
    r = parse_chat(chat())
    assert r.kind == "chat"
    assert r.messages == ({"role": "user", "content": "hi"},)
    assert r.n == 1 and r.max_tokens is None and r.stop == ()
    assert r.sampling.temperature == 1.0 and r.sampling.top_p == 1.0 and r.sampling.seed is None
    assert r.response_format.type == "text" and not r.uses_tools


def test_full_chat_body() -> None:
    r = parse_chat(
        chat(
            max_completion_tokens=7,
            temperature=0.5,
            top_p=0.9,
            n=2,
            stop="END",
            seed=42,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            logit_bias={"15": -100, "7": 2.5},
            logprobs=True,
            top_logprobs=3,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            parallel_tool_calls=False,
            stream=True,
            user="ignored",
        )
    )
    assert r.max_tokens == 7 and r.n == 2 and r.stop == ("END",)
    assert r.sampling.temperature == 0.5 and r.sampling.seed == 42
    assert r.sampling.logit_bias == ((7, 2.5), (15, -100.0))
    assert r.logprobs and r.top_logprobs == 3
    assert r.tools[0].name == "get_weather" and r.tool_choice == "required" and r.tool_name == "get_weather"
    assert r.forces_tool and not r.parallel_tool_calls


def test_multipart_text_content_is_joined_and_developer_is_system() -> None:
    r = parse_chat(
        {"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    )
    assert r.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"})


def test_assistant_tool_calls_and_tool_results_are_kept() -> None:
    r = parse_chat(
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
            "tools": [WEATHER],
        }
    )
    assert r.messages[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert r.messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens=-3), "max_tokens"),
        (chat(max_completion_tokens=0), "max_completion_tokens"),
        (chat(max_tokens="ten"), "max_tokens"),
        (chat(temperature=2.5), "temperature"),
        (chat(temperature=float("nan")), "temperature"),
        (chat(top_p=1.5), "top_p"),
        (chat(top_p=-0.1), "top_p"),
        (chat(n=0), "n"),
        (chat(n=100), "n"),
        (chat(presence_penalty=3), "presence_penalty"),
        (chat(frequency_penalty=-2.5), "frequency_penalty"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat(stop=[""]), "stop"),
        (chat(stop=5), "stop"),
        (chat(seed="x"), "seed"),
        (chat(logit_bias={"x": 1}), "logit_bias"),
        (chat(logit_bias={"5": 101}), "logit_bias"),
        (chat(top_logprobs=3), "top_logprobs"),
        (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
        (chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools[0].function.name"),
        (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}]), "tools[0].function.parameters"),
        (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/missing"}}}}}]), "tools[0].function.parameters"),
        (chat(tools=[WEATHER, WEATHER]), "tools[1].function.name"),
        (chat(tool_choice="required"), "tool_choice"),
        (chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (chat(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
        (chat(response_format={"type": "xml"}), "response_format"),
        (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}), "response_format.json_schema.schema"),
        (chat(response_format={"type": "json_schema", "json_schema": "nope"}), "response_format.json_schema"),
    ],
)
def test_bad_values_name_their_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat(body)
    assert info.value.param == param
    assert param in str(info.value)


def test_json_schema_format_is_kept() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    r = parse_chat(chat(response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}))
    assert r.response_format.type == "json_schema" and r.response_format.schema == schema


def test_completion_prompt_forms() -> None:
    assert parse_completion({"prompt": "Once"}).prompt == "Once"
    assert parse_completion({"prompt": ["Once"]}).prompt == "Once"
    assert parse_completion({"prompt": [1, 2, 3]}).prompt == (1, 2, 3)
    r = parse_completion({"prompt": "x", "logprobs": 2, "max_tokens": 5})
    assert r.logprobs and r.top_logprobs == 2 and r.max_tokens == 5 and r.kind == "completion"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_completion_values(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_completion(body)
    assert info.value.param == param


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["temperature", "top_p", "n", "max_tokens", "presence_penalty", "seed", "stop", "logprobs", "top_logprobs", "tool_choice"]),
        st.one_of(st.none(), st.booleans(), st.integers(-5, 50), st.floats(allow_nan=True), st.text(max_size=5), st.lists(st.text(max_size=3), max_size=6)),
    )
)
def test_any_body_parses_or_raises_invalid_request(extra: dict[str, Any]) -> None:
    try:
        r = parse_chat(chat(**extra))
    except InvalidRequest as exc:
        assert exc.param
    else:
        assert r.n >= 1 and (r.max_tokens is None or r.max_tokens >= 1)
        assert 0.0 <= r.sampling.temperature <= 2.0
