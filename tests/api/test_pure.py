"""Pure layers of the shim: router scoring/filtering/breaker, request checks, formatting, error table."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from darkbloom.api import errors as api_errors
from darkbloom.api import router
from darkbloom.api.client import error_from_frame, is_final
from darkbloom.api.format import Completion, embedding_response
from darkbloom.api.requests import parse_chat_request, parse_completion_request, parse_embedding_request
from darkbloom.api.router import Candidate, PeerStats, RouteHints
from darkbloom.errors import (
    ApiError,
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    NoCapacity,
    PeerUnreachable,
)
from darkbloom.wire.infer import ChoiceEnd, Delta, ErrorFrame, TokenLogprob

MSG = [{"role": "user", "content": "hi"}]


def cand(peer: str, **kw) -> Candidate:
    base = dict(model="m", digest="d1", features=frozenset({"tools", "json"}), region="eu", node_class="m2",
                price_input_per_m=100, price_output_per_m=400, decode_tps=50.0, max_concurrent=4)
    base.update(kw)
    return Candidate(peer_id=peer, **base)


# --- router -----------------------------------------------------------------------------


def test_filters_name_the_missing_criterion():
    cands = [cand("a"), cand("b", region="us", features=frozenset())]
    assert router.filter_candidates(cands, RouteHints(model="x"))[1] == "no provider for model x"
    kept, _ = router.filter_candidates(cands, RouteHints(model="m", region="eu"))
    assert [c.peer_id for c in kept] == ["a"]
    assert "region mars" in router.filter_candidates(cands, RouteHints(model="m", region="mars"))[1]
    assert "weights digest" in router.filter_candidates(cands, RouteHints(model="m", digest="zz"))[1]
    kept, _ = router.filter_candidates(cands, RouteHints(model="m", features=frozenset({"tools"})))
    assert [c.peer_id for c in kept] == ["a"]
    assert "max price 50" in router.filter_candidates(cands, RouteHints(model="m", max_price=50))[1]
    assert "node class m9" in router.filter_candidates(cands, RouteHints(model="m", node_class="m9"))[1]


def test_a_class_request_accepts_that_class_and_higher_ones():
    cands = [router.Candidate(peer_id=p, model="m", digest="d", node_class=k) for p, k in
             (("new", "new"), ("basic", "basic"), ("std", "standard"), ("pro", "pro"), ("odd", "m9"))]
    kept, _ = router.filter_candidates(cands, RouteHints(model="m", node_class="standard"))
    assert sorted(c.peer_id for c in kept) == ["pro", "std"]
    kept, _ = router.filter_candidates(cands, RouteHints(model="m", node_class="m9"))
    assert [c.peer_id for c in kept] == ["odd"]  # an unknown class name matches only itself


def test_score_prefers_fast_idle_close_reputable():
    hints = RouteHints(model="m")
    now = 100.0
    fast, slow = cand("fast", decode_tps=100), cand("slow", decode_tps=10)
    ranked, _ = router.rank([slow, fast], {}, hints, now)
    assert [c.peer_id for c in ranked] == ["fast", "slow"]
    busy = PeerStats()
    router.record_load(busy, now, active=4, queued=4, max_concurrent=4)
    ranked, _ = router.rank([slow, fast], {"fast": busy}, hints, now)
    assert [c.peer_id for c in ranked] == ["slow", "fast"]
    # a stale load report no longer counts
    ranked, _ = router.rank([slow, fast], {"fast": busy}, hints, now + router.LOAD_FRESH_S + 1)
    assert ranked[0].peer_id == "fast"
    far = PeerStats(latency_s=5.0)
    near = PeerStats(latency_s=0.01)
    same = [cand("far"), cand("near")]
    ranked, _ = router.rank(same, {"far": far, "near": near}, hints, now)
    assert ranked[0].peer_id == "near"
    bad = PeerStats(reputation=0.05)
    ranked, _ = router.rank(same, {"far": bad}, hints, now)
    assert ranked[0].peer_id == "near"
    cheap = cand("cheap", price_input_per_m=0, price_output_per_m=0, decode_tps=40)
    ranked, _ = router.rank([cand("dear", price_input_per_m=10**7, price_output_per_m=10**7), cheap],
                            {}, RouteHints(model="m", prefer="cost"), now)
    assert ranked[0].peer_id == "cheap"


def test_breaker_opens_after_consecutive_failures_and_half_opens():
    s = PeerStats()
    for i in range(router.BREAKER_THRESHOLD):
        assert not router.breaker_open(s, 10.0)
        router.record_failure(s, 10.0)
    assert router.breaker_open(s, 10.0)
    ranked, reason = router.rank([cand("a")], {"a": s}, RouteHints(model="m"), 10.0)
    assert ranked == [] and "failed recently" in reason
    assert not router.breaker_open(s, 10.0 + router.BREAKER_BASE_S)  # half-open: one more try
    router.record_failure(s, 20.0)
    assert s.open_until == 20.0 + 2 * router.BREAKER_BASE_S  # backs off
    router.record_success(s, 40.0, 0.1)
    assert not router.breaker_open(s, 40.0) and s.consecutive_failures == 0


def test_rank_deduplicates_peers_and_breaks_ties_by_id():
    ranked, _ = router.rank([cand("b"), cand("a"), cand("b")], {}, RouteHints(model="m"), 0.0)
    assert [c.peer_id for c in ranked] == ["a", "b"]


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.floats(0.1, 1000), st.integers(0, 8)), max_size=12))
def test_rank_is_a_permutation_of_the_usable_peers(rows):
    cands = [cand(p, decode_tps=t) for p, t, _ in rows]
    stats = {}
    for p, _, load in rows:
        s = stats.setdefault(p, PeerStats())
        router.record_load(s, 0.0, active=load, queued=0, max_concurrent=4)
    ranked, _ = router.rank(cands, stats, RouteHints(model="m"), 0.0)
    assert sorted(c.peer_id for c in ranked) == sorted({p for p, _, _ in rows})
    scores = [router.score(c, stats.get(c.peer_id), RouteHints(model="m"), 0.0) for c in ranked]
    assert all(math.isfinite(x) and x > 0 for x in scores)
    assert scores == sorted(scores, reverse=True)


# --- request checks ---------------------------------------------------------------------


def test_chat_request_routing_fields():
    r = parse_chat_request({
        "model": "m", "messages": MSG, "stream": True, "stream_options": {"include_usage": True}, "n": 2,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "response_format": {"type": "json_object"}, "logprobs": True, "user": "u-1", "something_new": 1,
        "darkbloom": {"region": "eu", "max_price": 500, "prefer": "cost", "digest": "d1", "node_class": "m2"},
    })
    assert r.stream and r.include_usage and r.n == 2
    assert r.hints.features == frozenset({"tools", "json", "logprobs"})
    assert (r.hints.region, r.hints.max_price, r.hints.prefer, r.hints.digest) == ("eu", 500, "cost", "d1")
    for shim_only in ("stream", "stream_options", "user", "darkbloom"):
        assert shim_only not in r.params
    assert r.params["something_new"] == 1  # unknown fields pass through, ignored


@pytest.mark.parametrize("body, param", [
    ({"messages": MSG}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": MSG, "stream": "yes"}, "stream"),
    ({"model": "m", "messages": MSG, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "m", "messages": MSG, "n": 0}, "n"),
    ({"model": "m", "messages": MSG, "audio": {"voice": "alloy"}}, "audio"),
    ({"model": "m", "messages": MSG, "store": True}, "store"),
    ({"model": "m", "messages": MSG, "functions": [{"name": "f"}]}, "functions"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": MSG, "darkbloom": {"prefer": "speed"}}, "darkbloom.prefer"),
    ({"model": "m", "messages": MSG, "darkbloom": {"max_price": -1}}, "darkbloom.max_price"),
    ({"model": "m", "messages": MSG, "temperature": 5}, "temperature"),
    ({"model": "m", "messages": MSG, "response_format": {"type": "xml"}}, "response_format"),
])
def test_chat_request_errors_name_the_param(body, param):
    with pytest.raises(ApiError) as e:
        parse_chat_request(body)
    assert e.value.status == 400 and e.value.param == param


def test_multipart_text_content_is_accepted():
    r = parse_chat_request({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert r.params["messages"][0]["content"][1]["text"] == "b"


def test_completion_and_embedding_requests():
    r = parse_completion_request({"model": "m", "prompt": "x", "logprobs": 2})
    assert r.kind == "completion" and "logprobs" in r.hints.features
    with pytest.raises(ApiError) as e:
        parse_completion_request({"model": "m", "prompt": "x", "suffix": "y"})
    assert e.value.param == "suffix"
    many = parse_completion_request({"model": "m", "prompt": ["x", "y", "z"]})
    assert many.prompts == ("x", "y", "z") and many.params["prompt"] == "x"
    assert parse_completion_request({"model": "m", "prompt": ["x"]}).prompts == ()  # a list of one is one prompt
    for bad, status_text in [([], "non-empty array"), ([1, 2], "token-id"), (["x", 3], "non-empty array"),
                             (["x"] * 17, "at most 16 prompts")]:
        with pytest.raises(ApiError) as e:
            parse_completion_request({"model": "m", "prompt": bad})
        assert e.value.status == 400 and e.value.param == "prompt" and status_text in str(e.value)
    one = parse_embedding_request({"model": "e", "input": "a"})
    assert one.inputs == ("a",) and one.encoding_format == "float" and one.hints.features == {"embeddings"}
    assert parse_embedding_request({"model": "e", "input": ["a", "b"], "encoding_format": "base64"}).inputs == ("a", "b")
    for body, param in [({"model": "e", "input": [1, 2]}, "input"), ({"model": "e", "input": ""}, "input"),
                        ({"model": "e", "input": "a", "encoding_format": "hex"}, "encoding_format"),
                        ({"model": "e", "input": "a", "dimensions": 64}, "dimensions")]:
        with pytest.raises(ApiError) as e:
            parse_embedding_request(body)
        assert e.value.param == param


# --- formatting -------------------------------------------------------------------------


def test_chat_chunks_role_first_tool_calls_merged_usage_counted():
    c = Completion(kind="chat", id="chatcmpl-1", model="m", created=1, n=1, include_usage=True, prompt_tokens=5)
    chunks = c.on_delta(Delta(request_id="r", text="Hi", tokens=1))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "Hi"} and chunks[1]["usage"] is None
    c.on_delta(Delta(request_id="r", tokens=2, tool_calls=(
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a"'}},)))
    c.on_delta(Delta(request_id="r", tokens=1, tool_calls=({"index": 0, "function": {"arguments": ": 1}"}},)))
    end = c.on_choice_end(ChoiceEnd(request_id="r", finish_reason="stop", completion_tokens=4))
    assert end[0]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    body = c.response()
    msg = body["choices"][0]["message"]
    assert msg["tool_calls"] == [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert c.usage_chunk()["choices"] == []


def test_usage_counts_only_what_was_passed_on():
    c = Completion(kind="chat", id="x", model="m", created=1, n=2, prompt_tokens=3)
    c.on_delta(Delta(request_id="r", index=0, text="a", tokens=2))
    c.on_delta(Delta(request_id="r", index=1, text="b", tokens=1))
    assert c.completion_tokens == 3 and not c.finished  # cut here: 3 tokens reached the client
    with pytest.raises(ValueError):
        c.on_delta(Delta(request_id="r", index=2, text="c", tokens=1))


def test_completion_logprobs_shape():
    c = Completion(kind="completion", id="cmpl-1", model="m", created=1, want_logprobs=True)
    lp = TokenLogprob(token="ab", logprob=-0.5, top=(("ab", -0.5), ("x", -2.0)))
    chunk = c.on_delta(Delta(request_id="r", text="ab", tokens=1, logprobs=(lp, lp)))[0]
    assert chunk["object"] == "text_completion" and chunk["choices"][0]["text"] == "ab"
    assert chunk["choices"][0]["logprobs"]["text_offset"] == [0, 2]
    assert chunk["choices"][0]["logprobs"]["top_logprobs"][0] == {"ab": -0.5, "x": -2.0}


def test_embedding_response_float_and_base64():
    import base64
    import struct

    vecs = struct.pack("<4f", 1, 2, 3, 4)
    f = embedding_response(model="e", vectors=vecs, dim=2, count=2, prompt_tokens=4, encoding_format="float")
    assert [d["embedding"] for d in f["data"]] == [[1.0, 2.0], [3.0, 4.0]]
    b = embedding_response(model="e", vectors=vecs, dim=2, count=2, prompt_tokens=4, encoding_format="base64")
    assert base64.b64decode(b["data"][1]["embedding"]) == vecs[8:]


# --- error table --------------------------------------------------------------------------


@pytest.mark.parametrize("exc, status, code", [
    (InvalidRequest("bad", param="top_p"), 400, "invalid_value"),
    (ContextLengthExceeded(10, 5, 8), 400, "context_length_exceeded"),
    (ModelNotFound("m"), 404, "model_not_found"),
    (NoCapacity(), 503, "all_providers_busy"),
    (PeerUnreachable("peer"), 502, "provider_failed"),
    (api_errors.rate_limited("requests per minute", 2.5), 429, "rate_limit_exceeded"),
    (api_errors.too_large(10), 413, "request_too_large"),
    (api_errors.invalid_api_key(), 401, "invalid_api_key"),
    (api_errors.no_provider("m"), 503, "no_provider"),
    (RuntimeError("bug"), 500, "internal_error"),
])
def test_error_table(exc, status, code):
    err = api_errors.to_api_error(exc)
    body = api_errors.error_body(err)["error"]
    assert err.status == status and body["code"] == code and set(body) == {"message", "type", "param", "code"}
    headers = api_errors.error_headers(err)
    if status == 429:
        assert headers["Retry-After"] == "3"
    if status == 500:
        assert "bug" not in body["message"]


def test_node_error_frames_translate_once():
    f = ErrorFrame(request_id="r", code="bad_request", message="m", param="top_p")
    e = error_from_frame(f, "peer")
    assert isinstance(e, InvalidRequest) and e.param == "top_p" and is_final(e)
    busy = error_from_frame(ErrorFrame(request_id="r", code="no_capacity", message="m", retry_after_s=3), "p")
    assert isinstance(busy, NoCapacity) and busy.retry_after_s == 3 and not is_final(busy)
    ctx = error_from_frame(ErrorFrame(request_id="r", code="context_length_exceeded", message="m"), "p")
    assert ctx.status == 400 and is_final(ctx)
    assert not is_final(error_from_frame(ErrorFrame(request_id="r", code="internal", message="m"), "p"))
