"""Hypothesis fuzzing of the protocol handlers as a hostile peer sees them: the node's infer
handler (real engine, tiny model), the status handler and the relay's ledger service (real
SQLite store), each over the in-memory PeerNetwork.

Each example sends a batch of hostile streams (random bytes, mutated request frames, valid
frames with random OpenAI parameters, oversize length prefixes, truncated frames). Properties:
no handler raises (an escaping exception would crash the network's nursery and the test),
every byte the server sends back is a well-formed frame, no stream outlives its deadline,
and a well-formed request still gets its full answer afterwards.
"""

from __future__ import annotations

import tempfile
import time

import msgpack
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from darkbloom.config import LedgerConfig
from darkbloom.errors import MalformedMessage, StreamClosed
from darkbloom.identity import Identity
from darkbloom.inference.engine import open_engine
from darkbloom.ledger.service import LedgerService
from darkbloom.ledger.store import open_store
from darkbloom.node.serve import InferenceService, serve_inference
from darkbloom.p2p import status
from darkbloom.p2p.memory import MemoryHub, open_memory_network
from darkbloom.wire.codec import FrameDecoder, decode, encode, encode_frame, encode_uvarint
from darkbloom.wire.infer import INFER_PROTOCOL, STATUS_PROTOCOL, Done, InferRequest, NodeLoad, StatusReply, StatusRequest
from darkbloom.wire.ledger import LEDGER_PROTOCOL, BalanceQuery, EpochQuery, LedgerErrorReply, OpenLane, ProofQuery

from .strategies import anything, instances, mutated_bytes, mutated_map, text

BATCH = settings(max_examples=5, deadline=None, derandomize=False,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                        HealthCheck.data_too_large, HealthCheck.filter_too_much])
MODEL = "tiny"
DIGEST = "sha256:" + "11" * 32
PER_STREAM_S = 30

OPENAI_KEYS = ["messages", "prompt", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "stop",
               "logprobs", "top_logprobs", "logit_bias", "seed", "tools", "tool_choice", "response_format",
               "stream", "presence_penalty", "frequency_penalty", "user", "suffix", "echo", "best_of"]


def _framed(body: bytes) -> bytes:
    return encode_uvarint(len(body)) + body


def hostile(request: st.SearchStrategy) -> st.SearchStrategy:
    """Byte strings a hostile client could open a stream with, built around valid `request`s."""
    valid = request.map(encode)
    return st.one_of(
        st.binary(max_size=200),
        valid.flatmap(lambda b: mutated_map(b)).map(_framed),
        valid.flatmap(lambda b: mutated_bytes(_framed(b))),
        valid.map(lambda b: _framed(b)[: max(1, len(b) // 2)]),  # cut inside the frame
        st.integers(1 << 21, 1 << 40).map(lambda n: encode_uvarint(n) + b"\x00" * 16),  # oversize prefix
        st.tuples(valid, st.binary(min_size=1, max_size=64)).map(lambda t: _framed(t[0]) + t[1]),  # trailing junk
    )


def infer_requests() -> st.SearchStrategy:
    content = st.one_of(text, anything)
    params = st.fixed_dictionaries(
        {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool", "x"]),
                                                     "content": content}), max_size=3)},
        optional={k: anything | st.integers(-5, 5000) for k in OPENAI_KEYS[1:]},
    )
    return st.builds(InferRequest, request_id=text, kind=st.sampled_from(["chat", "completion", "embedding", "score"]),
                     model=st.sampled_from([MODEL, "other"]) | text, digest=st.none() | st.just(DIGEST) | text,
                     params=params | st.dictionaries(text, anything, max_size=4), session=st.just(b"") | st.binary(max_size=40))


async def _exchange(client, peer_id: str, protocol: str, blob: bytes) -> None:
    """Send `blob`, half-close, read everything back; every byte received must be whole frames."""
    with trio.fail_after(PER_STREAM_S):
        stream = await client.open_stream(peer_id, protocol)
        received = b""
        try:
            await stream.write(blob)
            await stream.close()
            while chunk := await stream.read():
                received += chunk
        except StreamClosed:
            pass  # a reset is a valid way to refuse
        finally:
            await stream.reset()
    decoder = FrameDecoder(1 << 20)
    decoder.feed(received)
    while (body := decoder.next_body()) is not None:
        decode(body)  # raises MalformedMessage: the server sent a broken frame
    assert decoder.buffered == 0, "the server's reply ended inside a frame"


@BATCH
@given(blobs=st.lists(hostile(infer_requests()), min_size=25, max_size=25))
async def test_infer_handler_survives_hostile_streams(tiny_model_dir, blobs):
    hub = MemoryHub()
    async with open_engine([(MODEL, tiny_model_dir)], max_concurrent=2, max_queue=4, self_benchmark=False) as engine, \
            open_memory_network(hub, Identity.generate()) as node, \
            open_memory_network(hub, Identity.generate()) as client:
        service = InferenceService(engine, digests={MODEL: DIGEST})
        serve_inference(node, service)
        for blob in blobs:
            await _exchange(client, node.peer_id, INFER_PROTOCOL, blob)
        ok = InferRequest(request_id="after", kind="chat", model=MODEL,
                          params={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        stream = await client.open_stream(node.peer_id, INFER_PROTOCOL)
        await stream.write(encode_frame(ok))
        frames = []
        with trio.fail_after(PER_STREAM_S):
            decoder = FrameDecoder()
            while chunk := await stream.read():
                decoder.feed(chunk)
                while (body := decoder.next_body()) is not None:
                    frames.append(decode(body))
                if frames and isinstance(frames[-1], Done):
                    break
        await stream.close()
        assert isinstance(frames[-1], Done) and frames[-1].usage.completion_tokens > 0
        assert engine.load().active == 0 and node._inbound.get(client.peer_id, 0) <= 1


@BATCH
@given(blobs=st.lists(hostile(instances(StatusRequest)), min_size=40, max_size=40))
async def test_status_handler_survives_hostile_streams(blobs):
    hub = MemoryHub()
    async with open_memory_network(hub, Identity.generate()) as node, \
            open_memory_network(hub, Identity.generate()) as client:
        status.serve_status(node, lambda: StatusReply(version="t", protocol="1.0.0",
                                                      load=NodeLoad(active=0, queued=0, max_concurrent=1)))
        for blob in blobs:
            await _exchange(client, node.peer_id, STATUS_PROTOCOL, blob)
        with trio.fail_after(PER_STREAM_S):
            assert (await status.query_status(client, node.peer_id)).protocol == "1.0.0"
        await trio.testing.wait_all_tasks_blocked()
        assert node._inbound == {}  # no handler left behind


def ledger_requests() -> st.SearchStrategy:
    return st.one_of(instances(OpenLane), instances(BalanceQuery), instances(EpochQuery), instances(ProofQuery))


@BATCH
@given(blobs=st.lists(hostile(ledger_requests()) | ledger_requests().map(lambda m: encode_frame(m)),
                      min_size=30, max_size=30))
async def test_ledger_service_survives_hostile_streams(blobs):
    hub = MemoryHub()
    ledger_id = Identity.generate()
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store("", tmp)
        try:
            async with open_memory_network(hub, ledger_id) as ledger_net, \
                    open_memory_network(hub, Identity.generate()) as client:
                ledger_net.serve(LEDGER_PROTOCOL, LedgerService(store, ledger_id, LedgerConfig()).handle)
                for blob in blobs:
                    await _exchange(client, ledger_net.peer_id, LEDGER_PROTOCOL, blob)
                # still serving: a well-formed query is answered (epoch 0 does not exist: a typed refusal)
                stream = await client.open_stream(ledger_net.peer_id, LEDGER_PROTOCOL)
                with trio.fail_after(PER_STREAM_S):
                    await stream.write(encode_frame(EpochQuery(epoch=10**6)))
                    decoder = FrameDecoder()
                    reply = None
                    while reply is None and (chunk := await stream.read()):
                        decoder.feed(chunk)
                        if (body := decoder.next_body()) is not None:
                            reply = decode(body)
                await stream.close()
                assert reply is not None and type(reply).__name__ in ("EpochReply", "LedgerErrorReply")
            # nothing a hostile client sent moved money
            assert store.balance(client.identity.public_key.hex()) == (0, 0)
        finally:
            store.close()


def test_hostile_strategy_draws_each_kind():
    """The strategies above produce what they claim (guards against a vacuous fuzz)."""
    body = encode(EpochQuery(epoch=3))
    assert decode(body) == EpochQuery(epoch=3)
    try:
        decode(msgpack.packb({"type": "ledger.epoch_query", "epoch": "x"}))
    except MalformedMessage as exc:
        assert "epoch" in exc.reason
    else:
        raise AssertionError("a retyped field must not decode")
    assert LedgerErrorReply(code="x", message="y") == decode(encode(LedgerErrorReply(code="x", message="y")))
    assert time.time() > 0
