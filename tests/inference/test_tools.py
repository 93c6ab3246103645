"""Tool calls: spotting them in streamed text, parsing into OpenAI's shape, templating, grammars."""

from __future__ import annotations

import json

import llguidance
from llguidance import LLMatcher

from darkbloom.inference.constrained import json_grammar, request_grammar, schema_error
from darkbloom.inference.params import ToolSpec, parse_chat
from darkbloom.inference.tools import HERMES, ToolCallScanner, messages_for_template, parse_tool_calls

WEATHER = ToolSpec(name="get_weather", parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})


def test_parse_one_call() -> None:
    calls = parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', HERMES, [WEATHER])
    assert calls is not None and len(calls) == 1
    c = calls[0]
    assert c["type"] == "function" and c["id"].startswith("call_")
    assert c["function"]["name"] == "get_weather"
    assert json.loads(c["function"]["arguments"]) == {"city": "Paris"}


def test_parse_parallel_calls_have_distinct_ids() -> None:
    raw = '<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>\n<tool_call>{"name": "get_weather", "arguments": {"city": "B"}}</tool_call>'
    calls = parse_tool_calls(raw, HERMES, [WEATHER])
    assert calls is not None and [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["A", "B"]
    assert calls[0]["id"] != calls[1]["id"]


def test_missing_end_tag_on_the_last_call_is_tolerated() -> None:
    calls = parse_tool_calls('<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}', HERMES, [WEATHER])
    assert calls is not None and calls[0]["function"]["name"] == "get_weather"


def test_a_cut_off_call_after_complete_ones_is_dropped() -> None:
    raw = '<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>\n<tool_call>{"name": "get_wea'
    calls = parse_tool_calls(raw, HERMES, [WEATHER])
    assert calls is not None and len(calls) == 1
    assert parse_tool_calls('<tool_call>{"name": "get_wea', HERMES, [WEATHER]) is None


def test_malformed_or_unknown_calls_are_rejected() -> None:
    assert parse_tool_calls('<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', HERMES, [WEATHER]) is None
    assert parse_tool_calls('<tool_call>{"name": "launch", "arguments": {}}</tool_call>', HERMES, [WEATHER]) is None
    assert parse_tool_calls('<tool_call>{"name": "get_weather", "arguments": 3}</tool_call>', HERMES, [WEATHER]) is None
    assert parse_tool_calls('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call> trailing words', HERMES, [WEATHER]) is None


def test_string_arguments_are_normalised() -> None:
    calls = parse_tool_calls('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>', HERMES, [WEATHER])
    assert calls is not None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}


def test_scanner_streams_content_and_captures_calls_across_splits() -> None:
    text = 'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    for cut in range(len(text) + 1):
        s = ToolCallScanner(HERMES)
        content = s.feed(text[:cut]) + s.feed(text[cut:]) + s.flush()
        assert content == "Let me check. "
        assert s.in_call and s.captured.startswith("<tool_call>")


def test_scanner_releases_a_false_start() -> None:
    s = ToolCallScanner(HERMES)
    assert s.feed("a <tool") == "a "
    assert s.feed("s are fun") == "<tools are fun"
    assert not s.in_call


def test_messages_for_a_template_without_tools() -> None:
    msgs = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c"},
    ]
    out = messages_for_template(msgs, [WEATHER], template_has_tools=False)
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert "<tool_call>" in out[2]["content"] and '"city": "Paris"' in out[2]["content"]
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}


def test_messages_for_a_template_with_tools_get_object_arguments() -> None:
    msgs = [{"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}]
    out = messages_for_template(msgs, [WEATHER], template_has_tools=True)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert len(out) == 1


def test_schema_errors_come_from_llguidance() -> None:
    assert schema_error({"type": "object", "properties": {"a": {"type": "integer"}}}) == ""
    assert "objectx" in schema_error({"type": "objectx"})


def _accepts(grammar: str, text: str) -> bool:
    """Check text against a grammar with a byte-level tokenizer-free matcher."""
    tok = llguidance.LLTokenizer(_byte_tokenizer_json())
    m = LLMatcher(tok, grammar, log_level=0)
    ok = m.consume_tokens(tok.tokenize_str(text))
    return ok and m.is_accepting()


_BYTES: str | None = None


def _byte_tokenizer_json() -> str:
    """A tiny byte-level BPE tokenizer (256 byte tokens + EOS), enough to drive a matcher."""
    global _BYTES
    if _BYTES is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
        vocab["<eos>"] = 256
        t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t.decoder = decoders.ByteLevel()
        t.add_special_tokens(["<eos>"])
        _BYTES = t.to_str()
    return _BYTES


def test_json_object_grammar_accepts_objects_only() -> None:
    g = json_grammar(None)
    assert _accepts(g, '{"a": 1}')
    assert not _accepts(g, "[1, 2]")
    assert not _accepts(g, "hello")


def test_json_schema_grammar_enforces_the_schema() -> None:
    g = json_grammar({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False})
    assert _accepts(g, '{"n": 5}')
    assert not _accepts(g, '{"n": "five"}')
    assert not _accepts(g, '{"m": 5}')


def test_forced_tool_grammar() -> None:
    req = parse_chat(
        {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER.as_openai()], "tool_choice": "required", "parallel_tool_calls": False}
    )
    g = request_grammar(req, "<tool_call>", "</tool_call>")
    assert g is not None
    assert _accepts(g, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert not _accepts(g, '<tool_call>\n{"name": "other", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert not _accepts(g, "The weather is nice.")


def test_free_requests_have_no_grammar() -> None:
    assert request_grammar(parse_chat({"messages": [{"role": "user", "content": "x"}]}), "<tool_call>", "</tool_call>") is None
