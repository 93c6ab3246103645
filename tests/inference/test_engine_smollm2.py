"""The engine with the bundled real chat model (SmolLM2-135M-Instruct): behaviour that needs a real model."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from darkbloom.inference.engine import Admitted, ChoiceFinished, Engine, TextDelta, open_engine
from darkbloom.inference.params import parse_chat

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


@asynccontextmanager
async def engine(model_dir: Path, **kw: Any) -> AsyncIterator[Engine]:
    with trio.fail_after(300):
        async with open_engine([(MODEL, model_dir)], max_concurrent=4, max_queue=4, self_benchmark=False, **kw) as eng:
            yield eng


async def answer(eng: Engine, body: dict[str, Any]) -> tuple[str, ChoiceFinished, list[dict[str, Any]]]:
    text, calls, fin = "", [], None
    async for ev in eng.generate(MODEL, parse_chat({"temperature": 0, **body})):
        if isinstance(ev, TextDelta):
            text += ev.text
            calls.extend(ev.tool_calls)
        elif isinstance(ev, ChoiceFinished):
            fin = ev
    assert fin is not None
    return text, fin, calls


def ask(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


async def test_capital_of_france_and_a_stop_string(smollm2_dir: Path) -> None:
    async with engine(smollm2_dir) as eng:
        text, fin, _ = await answer(eng, {"messages": ask("What is the capital of France?"), "max_tokens": 30})
        assert "Paris" in text
        assert fin.finish_reason == "stop"
        # Stop in the middle of the word "Paris": the answer ends right before it.
        cut, fin2, _ = await answer(eng, {"messages": ask("What is the capital of France?"), "max_tokens": 30, "stop": ["aris"]})
    assert fin2.finish_reason == "stop"
    assert cut == text[: text.index("aris")]
    assert cut.endswith("P")


async def test_json_mode_and_json_schema(smollm2_dir: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    async with engine(smollm2_dir) as eng:
        text, fin, _ = await answer(
            eng,
            {
                "messages": ask('What is the capital of France? Reply in JSON with a single key "answer".'),
                "max_tokens": 60,
                "response_format": {"type": "json_object"},
            },
        )
        assert fin.finish_reason == "stop", text
        assert "Paris" in json.loads(text).values()
        text, fin, _ = await answer(
            eng,
            {
                "messages": ask("Which city is the capital of France, and in which country is it? Answer in JSON."),
                "max_tokens": 60,
                "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
            },
        )
    assert fin.finish_reason == "stop", text
    value = json.loads(text)
    assert set(value) == {"city", "country"} and all(isinstance(v, str) for v in value.values())


async def test_tool_call(smollm2_dir: Path) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"], "additionalProperties": False},
            },
        }
    ]
    async with engine(smollm2_dir) as eng:
        text, fin, calls = await answer(
            eng,
            {"messages": ask("What is the weather in Paris right now?"), "max_tokens": 60, "tools": tools, "tool_choice": "required", "parallel_tool_calls": False},
        )
    assert fin.finish_reason == "tool_calls"
    assert text == ""
    assert len(calls) == 1
    call = calls[0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    args = json.loads(call["function"]["arguments"])
    assert "paris" in args["city"].lower()


async def test_cancellation_frees_the_slot(smollm2_dir: Path) -> None:
    async with engine(smollm2_dir) as eng:
        body = {"messages": ask("Write a very long story about a dragon."), "max_tokens": 2000, "temperature": 0}
        async with aclosing(eng.generate(MODEL, parse_chat(body))) as gen:
            async for ev in gen:
                if isinstance(ev, TextDelta):
                    assert eng.load().active == 1
                    break
        # The cancel is applied before the engine's next decode step; this request then runs alone.
        text, fin, _ = await answer(eng, {"messages": ask("Say hi."), "max_tokens": 5})
        assert fin.completion_tokens >= 1
        assert not eng._worker.jobs and eng.load().active == 0
