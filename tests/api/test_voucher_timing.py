"""When the shim signs and writes vouchers relative to the frames it hands on (a scripted node
stream, no engine: this is about the order of writes on one stream).

Generation: the prompt's voucher and each due voucher go out when the app asks for the next
frame, so the frame that made a voucher due reaches the client before the voucher is signed and
written (the node streams its first tokens without the prompt's voucher). Embeddings and scores
wait for the prompt's voucher at the node, so theirs still goes at once.
"""

from __future__ import annotations

import time

import trio

from darkbloom.api.client import open_infer
from darkbloom.identity import Identity
from darkbloom.ledger.lanes import ConsumerLane
from darkbloom.wire.codec import FrameDecoder, decode, encode_frame
from darkbloom.wire.infer import Accepted, ChoiceEnd, Delta, Done, Embeddings, InferRequest, NodeLoad, Usage
from darkbloom.wire.ledger import LaneReservation, Voucher

LOAD = NodeLoad(active=1, queued=0, max_concurrent=4)
PROMPT_TOKENS = 40  # over the interval below: the prompt alone makes a voucher due


class ScriptedNodeStream:
    """A FAKE node's side of one stream: answers a fixed frame script; records what the shim writes."""

    peer_id = "12D3KooWScriptedNode"
    route = "direct"

    def __init__(self, frames: list[object], log: list[str]) -> None:
        self._data = b"".join(encode_frame(f) for f in frames)
        self.log = log
        self.vouchers: list[Voucher] = []
        self._decoder = FrameDecoder()

    async def read(self, n: int) -> bytes:
        await trio.lowlevel.checkpoint()
        out, self._data = self._data[:n], self._data[n:]
        return out

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._decoder.feed(data)
        while (body := self._decoder.next_body()) is not None:
            msg = decode(body)
            if isinstance(msg, Voucher):
                self.vouchers.append(msg)
                self.log.append(f"voucher prompt={msg.cum_prompt_tokens} completion={msg.cum_completion_tokens}")

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()

    async def reset(self) -> None:
        await trio.lowlevel.checkpoint()


class ScriptedNetwork:
    def __init__(self, stream: ScriptedNodeStream) -> None:
        self.stream = stream
        self.first: bytes | None = None

    async def open_stream(self, peer_id: str, protocol: str, *, addrs=(), first: bytes | None = None):
        await trio.lowlevel.checkpoint()
        self.first = first
        return self.stream


def _lane(consumer: Identity) -> ConsumerLane:
    ledger, node = Identity.generate(), Identity.generate()
    now = int(time.time() * 1000)
    reservation = LaneReservation(lane="ab" * 16, consumer=consumer.public_key.hex(), node=node.public_key.hex(),
                                  cap=10_000_000, price_input_per_m=1000, price_output_per_m=1000, opened_ms=now,
                                  expires_ms=now + 3_600_000, ledger=ledger.public_key.hex())
    return ConsumerLane(consumer, reservation, voucher_every_tokens=8)


def _script(rid: str, kind: str) -> list[object]:
    accepted = Accepted(request_id=rid, node_version="test", digest="cd" * 32, prompt_tokens=PROMPT_TOKENS, load=LOAD)
    if kind == "embedding":
        return [accepted, Embeddings(request_id=rid, dim=1, count=1, vectors=b"\0\0\x80?", prompt_tokens=PROMPT_TOKENS),
                Done(request_id=rid, usage=Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=0), load=LOAD)]
    deltas = [Delta(request_id=rid, text=f"t{i}", tokens=1) for i in range(10)]
    return [accepted, *deltas, ChoiceEnd(request_id=rid, finish_reason="length", completion_tokens=10),
            Done(request_id=rid, usage=Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=10), load=LOAD)]


async def test_a_generation_hands_on_its_first_frame_before_the_prompt_voucher_is_written():
    log: list[str] = []
    request = InferRequest(request_id="chatcmpl-timing", kind="chat", model="m", params={"messages": []})
    stream = ScriptedNodeStream(_script(request.request_id, "chat"), log)
    lane = _lane(Identity.generate())
    with trio.fail_after(10):
        call = await open_infer(ScriptedNetwork(stream), stream.peer_id, request, lane=lane)
        assert stream.vouchers == []  # accepted: the prompt's voucher is owed, not yet written
        frames = []
        while (frame := await call.receive()) is not None:
            frames.append(frame)
            log.append(f"handed {type(frame).__name__}")
        await call.aclose()
    assert log[0] == "handed Delta"  # the first token went on before any voucher was signed
    assert log[1] == f"voucher prompt={PROMPT_TOKENS} completion=1"  # then the prompt's (and that token's) voucher
    # every voucher follows the frame that made it due, and the final one covers everything
    assert log[-2:] == ["voucher prompt=40 completion=10", "handed Done"]
    assert stream.vouchers[-1].cum_completion_tokens == sum(f.tokens for f in frames if isinstance(f, Delta))
    assert [v.seq for v in stream.vouchers] == sorted(v.seq for v in stream.vouchers)


async def test_an_embedding_pays_for_its_prompt_at_once():
    log: list[str] = []
    request = InferRequest(request_id="emb-timing", kind="embedding", model="m", params={"input": "x"})
    stream = ScriptedNodeStream(_script(request.request_id, "embedding"), log)
    with trio.fail_after(10):
        await open_infer(ScriptedNetwork(stream), stream.peer_id, request, lane=_lane(Identity.generate()))
    # the node holds the vectors until the prompt's voucher arrives: it is written before open_infer returns
    assert log == [f"voucher prompt={PROMPT_TOKENS} completion=0"]
