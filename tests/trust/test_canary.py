"""Capability canaries: a real engine (tiny random model, constrained decoding) passes them; doctored replies fail."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from darkbloom.api.trust.canary import (
    CanaryBook,
    CanaryReply,
    CanaryResult,
    features_of,
    make_canary,
    reply_from_frames,
)
from darkbloom.inference.engine import ChoiceFinished, TextDelta, open_engine
from darkbloom.inference.params import parse_chat
from darkbloom.wire.infer import ChoiceEnd, Delta, TokenLogprob

MODEL = "tiny"


async def answer(eng, params) -> CanaryReply:
    frames = []
    async for ev in eng.generate(MODEL, parse_chat(params)):
        if isinstance(ev, (TextDelta, ChoiceFinished)):
            frames.append(ev)
    return reply_from_frames(frames)


async def test_real_engine_passes_every_canary(tiny_model_dir: Path) -> None:
    rng = random.Random(7)
    with trio.fail_after(180):
        async with open_engine([(MODEL, tiny_model_dir)], max_concurrent=2, self_benchmark=False) as eng:
            for _ in range(2):  # two draws of each: wording and names vary
                for feature in ("json", "tools", "logprobs"):
                    canary = make_canary(feature, rng)
                    reply = await answer(eng, canary.params)
                    assert canary.check(reply) == CanaryResult(True), (feature, reply.finish_reason)


def test_doctored_replies_fail() -> None:
    rng = random.Random(1)
    js = make_canary("json", rng)
    assert not js.check(CanaryReply(text="Sure! The sky is blue.")).ok
    assert not js.check(CanaryReply(text='{"other": true}')).ok
    key = js.params["response_format"]["json_schema"]["schema"]["required"][0]
    assert js.check(CanaryReply(text=f'{{"{key}": false}}')).ok

    tools = make_canary("tools", rng)
    name = tools.params["tool_choice"]["function"]["name"]
    assert not tools.check(CanaryReply(text="I cannot call tools")).ok
    city = tools.params["tools"][0]["function"]["parameters"]["properties"]["city"]["enum"][0]
    assert not tools.check(CanaryReply(tool_calls=[{"name": "other", "arguments": f'{{"city": "{city}"}}'}])).ok
    assert not tools.check(CanaryReply(tool_calls=[{"name": name, "arguments": '{"city": "Atlantis"}'}])).ok
    assert not tools.check(CanaryReply(tool_calls=[{"name": name, "arguments": '{"city": '}])).ok
    # deltas that stream the arguments in pieces are merged
    frames = [
        Delta(request_id="r", tool_calls=({"index": 0, "function": {"name": name, "arguments": '{"ci'}},)),
        Delta(request_id="r", tool_calls=({"index": 0, "function": {"arguments": f'ty": "{city}"}}'}},)),
        ChoiceEnd(request_id="r", finish_reason="tool_calls", completion_tokens=9),
    ]
    assert tools.check(reply_from_frames(frames)).ok

    lp = make_canary("logprobs", rng)
    k = lp.params["top_logprobs"]
    good = TokenLogprob(token="a", logprob=-0.1, top=tuple([("a", -0.1)] + [(f"t{i}", -1.0 - i) for i in range(k - 1)]))
    assert lp.check(CanaryReply(logprobs=[good], completion_tokens=1)).ok
    fabricated = [
        TokenLogprob(token="a", logprob=0.5, top=good.top),  # positive logprob
        TokenLogprob(token="a", logprob=-0.1, top=good.top[:-1]),  # too few alternatives
        TokenLogprob(token="a", logprob=-0.1, top=tuple(reversed(good.top))),  # unsorted
        TokenLogprob(token="b", logprob=-0.1, top=good.top),  # greedy token not first
    ]
    for bad in fabricated:
        assert not lp.check(CanaryReply(logprobs=[bad], completion_tokens=1)).ok
    assert not lp.check(CanaryReply(logprobs=[], completion_tokens=3)).ok
    assert not lp.check(CanaryReply(logprobs=[good], completion_tokens=3)).ok
    with pytest.raises(ValueError):
        make_canary("embeddings", rng)


def test_canary_book_gates_features() -> None:
    book = CanaryBook(ttl_s=100.0, fail_ttl_s=10.0)
    assert book.needed("p", ["json", "tools"], 0.0) == ["json", "tools"]
    assert not book.eligible("p", ["json"], 0.0)
    assert book.eligible("p", [], 0.0) and book.eligible("p", ["embeddings"], 0.0)  # not canaried
    book.record("p", "json", CanaryResult(True), 0.0)
    book.record("p", "tools", CanaryResult(False, "no tool call"), 0.0)
    assert book.eligible("p", ["json"], 50.0)
    assert not book.eligible("p", ["json", "tools"], 5.0) and book.barred("p", ["tools"], 5.0)
    assert book.needed("p", ["json", "tools"], 5.0) == []  # barred, not retried yet
    assert book.needed("p", ["json", "tools"], 11.0) == ["tools"]
    assert book.needed("p", ["json"], 100.0) == ["json"]  # the pass expired


def test_features_of_requests() -> None:
    assert features_of({"messages": []}) == frozenset()
    assert features_of({"response_format": {"type": "json_object"}, "logprobs": True}) == {"json", "logprobs"}
    assert features_of({"tools": [{}], "tool_choice": "none"}) == frozenset()
    assert features_of({"tools": [{}]}) == {"tools"}
