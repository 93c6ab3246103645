"""The wire codec: round trips for every message, strict decoding, framing, canonical bytes."""

from __future__ import annotations

import dataclasses
import typing

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from darkbloom.errors import MalformedMessage
from darkbloom.wire import codec
from darkbloom.wire.codec import (
    FrameDecoder,
    canonical_bytes,
    decode,
    decode_frame,
    decode_uvarint,
    encode,
    encode_frame,
    encode_uvarint,
    message_types,
    read_frame,
)
from darkbloom.wire.infer import Delta, Done, Embeddings, InferRequest, NodeLoad, TokenLogprob, Usage

# Importing every wire module registers every message type.
import darkbloom.wire  # noqa: F401
import importlib
import pkgutil

for _mod in pkgutil.iter_modules(darkbloom.wire.__path__):
    importlib.import_module(f"darkbloom.wire.{_mod.name}")

_text = st.text(max_size=20)
_any_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False), _text, st.binary(max_size=20))
_any = st.recursive(_any_scalar, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(_text, c, max_size=3)), max_leaves=8)


def strategy_for(hint) -> st.SearchStrategy:
    """Values of a message field type, as the codec accepts them."""
    if hint is typing.Any:
        return _any
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, __import__("types").UnionType):
        return st.one_of(*[strategy_for(a) for a in args])
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is tuple:
        if args and args[-1] is not Ellipsis:
            return st.tuples(*[strategy_for(a) for a in args])
        return st.lists(strategy_for(args[0]), max_size=3).map(tuple)
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=3).map(tuple)
    if origin is dict:
        return st.dictionaries(strategy_for(args[0]), strategy_for(args[1]), max_size=3)
    if dataclasses.is_dataclass(hint):
        return instances(hint)
    return {
        int: st.integers(-(2**63), 2**63 - 1),
        float: st.floats(allow_nan=False),
        str: _text,
        bytes: st.binary(max_size=40),
        bool: st.booleans(),
        type(None): st.none(),
    }[hint]


def _nonneg_ints(hint) -> st.SearchStrategy:
    """Plain int fields hold counts, amounts and times: draw them non-negative."""
    return st.integers(0, 2**63 - 1) if hint is int else strategy_for(hint)


def _embeddings():
    return st.tuples(st.integers(0, 4), st.integers(0, 3)).flatmap(
        lambda dc: st.builds(
            Embeddings,
            request_id=_text,
            dim=st.just(dc[0]),
            count=st.just(dc[1]),
            vectors=st.binary(min_size=dc[0] * dc[1] * 4, max_size=dc[0] * dc[1] * 4),
            prompt_tokens=st.integers(0, 10),
        )
    )


# Messages whose __post_init__ ties fields together get a builder that honours the tie.
OVERRIDES = {Embeddings: _embeddings}


_hex = lambda n: st.text("0123456789abcdef", min_size=n, max_size=n)  # noqa: E731
_sig = st.sampled_from([b"", b"\x07" * 64]) | st.binary(min_size=64, max_size=64)
# Fields whose message classes check their shape in __post_init__, by name, so that generated
# instances are valid often enough; the shape checks themselves are tested with each message.
FIELD_STRATEGIES = {
    "lane": _hex(32),
    "consumer": _hex(64),
    "node": _hex(64),
    "ledger": _hex(64),
    "account": _hex(64),
    "signature": _sig,
    "consumer_sig": _sig,
    "node_sig": _sig,
    "chain": st.binary(min_size=32, max_size=32),
    "nonce": st.binary(min_size=16, max_size=16),
}


def instances(cls) -> st.SearchStrategy:
    if cls in OVERRIDES:
        return OVERRIDES[cls]()
    hints = typing.get_type_hints(cls)
    kwargs = {
        f.name: FIELD_STRATEGIES[f.name] if f.name in FIELD_STRATEGIES else _nonneg_ints(hints[f.name])
        for f in dataclasses.fields(cls)
    }

    def build(values):
        try:
            return cls(**values)
        except (TypeError, ValueError):  # __post_init__ invariants (checked separately)
            return None

    return st.fixed_dictionaries(kwargs).map(build).filter(lambda m: m is not None)


ALL_TYPES = sorted(message_types().items())


def test_registry_has_inference_messages():
    names = set(message_types())
    assert {"infer.request", "infer.delta", "infer.done", "infer.error", "status.reply"} <= names


@pytest.mark.parametrize("name,cls", ALL_TYPES, ids=[n for n, _ in ALL_TYPES])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_every_message(name, cls, data):
    msg = data.draw(instances(cls))
    assert decode(encode(msg)) == msg
    assert decode_frame(encode_frame(msg)) == msg


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_malformed(blob):
    try:
        decode(blob)
    except MalformedMessage:
        pass
    try:
        decode_frame(blob)
    except MalformedMessage:
        pass


@settings(max_examples=300, deadline=None)
@given(data=st.dictionaries(st.sampled_from(["type", "request_id", "kind", "model", "params", "x"]), _any, max_size=6))
def test_random_maps_only_raise_malformed(data):
    data.setdefault("type", "infer.request")
    try:
        decode(msgpack.packb(data, use_bin_type=True))
    except MalformedMessage:
        pass


def _req(**kw):
    base = dict(request_id="r1", kind="chat", model="m", params={"messages": []})
    base.update(kw)
    return InferRequest(**base)


def _raw(**fields):
    return msgpack.packb(fields, use_bin_type=True)


@pytest.mark.parametrize(
    "body,reason",
    [
        (_raw(type="nope"), "unknown message type"),
        (_raw(request_id="r"), "missing or non-string 'type'"),
        (_raw(type="infer.request", kind="chat", model="m"), "missing field 'request_id'"),
        (_raw(type="infer.request", request_id=1, kind="chat", model="m"), "expected str"),
        (_raw(type="infer.request", request_id="r", kind="dance", model="m"), "is not one of"),
        (_raw(type="infer.request", request_id="r", kind="chat", model="m", extra=1), "unknown field 'extra'"),
        (_raw(type="infer.delta", request_id="r", tokens=True), "expected int, got bool"),
        (msgpack.packb([1, 2]), "expected a map"),
        (b"\xc1", "not msgpack"),
        (encode(_req()) + b"\x00", "not msgpack"),
    ],
)
def test_strict_decoding_reasons(body, reason):
    with pytest.raises(MalformedMessage) as info:
        decode(body)
    assert reason in info.value.reason


def test_post_init_invariant_is_malformed():
    body = _raw(type="infer.embeddings", request_id="r", dim=4, count=2, vectors=b"\x00" * 3, prompt_tokens=1)
    with pytest.raises(MalformedMessage, match="vectors length"):
        decode(body)


def test_expect_restricts_types():
    with pytest.raises(MalformedMessage, match="unexpected message"):
        decode(encode(_req()), expect=Done)
    assert decode(encode(_req()), expect=(Done, InferRequest)) == _req()


def test_nested_dataclasses_and_tuples_decode_to_their_types():
    d = Delta(request_id="r", text="hé", tokens=2, logprobs=(TokenLogprob(token="a", logprob=-0.5, top=(("a", -0.5), ("b", -1.0))),))
    back = decode(encode(d))
    assert isinstance(back.logprobs[0], TokenLogprob)
    assert back.logprobs[0].top == (("a", -0.5), ("b", -1.0))
    assert back == d


@given(st.integers(0, 2**64 - 1))
def test_uvarint_round_trip(n):
    enc = encode_uvarint(n)
    assert decode_uvarint(enc) == (n, len(enc))
    assert decode_uvarint(enc[:-1]) is None


def test_uvarint_rejects_overlong_and_non_minimal():
    with pytest.raises(MalformedMessage, match="longer than 10"):
        decode_uvarint(b"\xff" * 11)
    with pytest.raises(MalformedMessage, match="non-minimal"):
        decode_uvarint(b"\x81\x00")


def test_oversize_frames_rejected_both_ways():
    big = _req(params={"x": "a" * 2000})
    with pytest.raises(MalformedMessage, match="exceeds the 1000-byte limit"):
        encode_frame(big, max_frame_bytes=1000)
    decoder = FrameDecoder(max_frame_bytes=1000)
    with pytest.raises(MalformedMessage, match="exceeds"):
        decoder.feed(encode_frame(big))  # refused on the prefix, before buffering the body


def test_truncated_and_trailing_frames():
    frame = encode_frame(_req())
    with pytest.raises(MalformedMessage, match="truncated"):
        decode_frame(frame[:-1])
    with pytest.raises(MalformedMessage, match="after the frame"):
        decode_frame(frame + b"\x01")


@given(st.lists(st.integers(1, 50), max_size=20))
def test_frame_decoder_any_split(cuts):
    msgs = [_req(request_id=str(i)) for i in range(3)]
    stream = b"".join(encode_frame(m) for m in msgs)
    decoder = FrameDecoder()
    out, pos = [], 0
    for cut in cuts + [len(stream)]:
        decoder.feed(stream[pos : pos + cut])
        pos += cut
        while (body := decoder.next_body()) is not None:
            out.append(decode(body))
    assert out == msgs


async def test_read_frame_from_a_stream():
    send, recv = trio.testing.memory_stream_pair()
    msgs = [_req(request_id=str(i)) for i in range(3)]
    decoder = FrameDecoder()
    with trio.fail_after(5):
        await send.send_all(b"".join(encode_frame(m) for m in msgs) + encode_frame(msgs[0])[:3])
        await send.send_eof()
        got = [await read_frame(recv.receive_some, decoder) for _ in msgs]
        assert got == msgs
        with pytest.raises(MalformedMessage, match="truncated"):
            await read_frame(recv.receive_some, decoder)


async def test_read_frame_clean_eof():
    send, recv = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        await send.send_eof()
        assert await read_frame(recv.receive_some, FrameDecoder()) is None


def test_canonical_bytes_domain_separated_and_field_ordered():
    done = Done(request_id="r", usage=Usage(prompt_tokens=1, completion_tokens=2), load=NodeLoad(active=0, queued=0, max_concurrent=1))
    a = canonical_bytes(done)
    assert a.startswith(b"darkbloom/infer.done/v1\x00")
    assert canonical_bytes(done, exclude=("receipt",)) != a
    # dict key order does not change canonical bytes
    r1 = _req(params={"a": 1, "b": 2})
    r2 = _req(params={"b": 2, "a": 1})
    assert canonical_bytes(r1) == canonical_bytes(r2)
    # the same field values under another type sign differently
    assert canonical_bytes(Delta(request_id="r")) != canonical_bytes(Done(request_id="r", usage=Usage(prompt_tokens=0, completion_tokens=0), load=NodeLoad(active=0, queued=0, max_concurrent=0)))


@given(st.text(max_size=10), st.text(max_size=10))
def test_canonical_bytes_injective_on_fields(a, b):
    if a != b:
        assert canonical_bytes(_req(model=a)) != canonical_bytes(_req(model=b))


def test_unregistered_class_cannot_be_encoded():
    @dataclasses.dataclass(frozen=True)
    class Loose:
        x: int

    with pytest.raises(TypeError):
        encode(Loose(x=1))


def test_duplicate_registration_refused():
    with pytest.raises(TypeError, match="registered twice"):

        @codec.message("infer.request")
        @dataclasses.dataclass(frozen=True)
        class Other:
            x: int
