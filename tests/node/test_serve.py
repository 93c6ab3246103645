"""The node's `/darkbloom/infer/1.0.0` handler with a real engine (tiny random model) over the
in-memory PeerNetwork, driven by the shim's protocol client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from darkbloom.api.client import open_infer
from darkbloom.errors import InvalidRequest, ModelNotFound, NoCapacity, StreamClosed
from darkbloom.identity import Identity
from darkbloom.inference.engine import open_engine
from darkbloom.node.serve import InferenceService, ServedRequest, serve_inference
from darkbloom.p2p.memory import MemoryHub, open_memory_network
from darkbloom.wire.codec import encode_frame
from darkbloom.wire.infer import INFER_PROTOCOL, ChoiceEnd, Delta, Done, ErrorFrame, InferRequest
from darkbloom.wire.codec import FrameDecoder, read_frame

MODEL = "tiny"
DIGEST = "sha256:" + "11" * 32
MSG = [{"role": "user", "content": "hello there"}]
NO_END = {"0": -100, "2": -100}  # the tiny model's <|endoftext|> and <|im_end|>: keep it generating


@asynccontextmanager
async def node_and_client(model_dir, *, max_concurrent=2, max_queue=4) -> AsyncIterator[tuple]:
    hub = MemoryHub()
    served: list[ServedRequest] = []
    finished = trio.Event()

    def on_served(s: ServedRequest) -> None:
        served.append(s)
        finished.set()

    async with open_engine([(MODEL, model_dir)], max_concurrent=max_concurrent, max_queue=max_queue,
                           self_benchmark=False) as engine:
        async with open_memory_network(hub, Identity.generate()) as node, \
                open_memory_network(hub, Identity.generate()) as shim:
            service = InferenceService(engine, digests={MODEL: DIGEST}, on_served=on_served)
            serve_inference(node, service)
            yield node, shim, engine, served, finished


def chat(rid: str, **params) -> InferRequest:
    return InferRequest(request_id=rid, kind="chat", model=MODEL,
                        params={"messages": MSG, "max_tokens": 8, "temperature": 0, **params})


async def test_chat_frames_in_order(tiny_model_dir):
    with trio.fail_after(60):
        async with node_and_client(tiny_model_dir) as (node, shim, engine, served, finished):
            call = await open_infer(shim, node.peer_id, chat("r1", n=2))
            assert call.accepted.digest == DIGEST and call.accepted.prompt_tokens > 0
            assert call.accepted.load.max_concurrent == 2
            frames = []
            while (f := await call.receive()) is not None:
                frames.append(f)
            await call.aclose()
            await finished.wait()
    assert isinstance(frames[-1], Done)
    ends = [f for f in frames if isinstance(f, ChoiceEnd)]
    assert sorted(e.index for e in ends) == [0, 1]
    delta_tokens = sum(f.tokens for f in frames if isinstance(f, Delta))
    assert frames[-1].usage.completion_tokens == sum(e.completion_tokens for e in ends)
    assert delta_tokens <= frames[-1].usage.completion_tokens <= 16
    assert all(f.request_id == "r1" for f in frames)
    assert served[0].outcome == "done" and served[0].completion_tokens == frames[-1].usage.completion_tokens


async def test_errors_come_back_typed(tiny_model_dir):
    with trio.fail_after(60):
        async with node_and_client(tiny_model_dir) as (node, shim, *_):
            with pytest.raises(InvalidRequest) as bad:
                await open_infer(shim, node.peer_id, chat("r2", temperature=9))
            assert bad.value.param == "temperature"
            with pytest.raises(ModelNotFound):
                await open_infer(shim, node.peer_id, InferRequest(request_id="r3", kind="chat", model="other",
                                                                  params={"messages": MSG}))
            with pytest.raises(ModelNotFound):
                await open_infer(shim, node.peer_id, InferRequest(request_id="r4", kind="chat", model=MODEL,
                                                                  digest="sha256:" + "22" * 32, params={"messages": MSG}))


async def test_no_capacity_when_queue_is_full(tiny_model_dir):
    with trio.fail_after(60):
        async with node_and_client(tiny_model_dir, max_concurrent=1, max_queue=0) as (node, shim, *_):
            first = await open_infer(shim, node.peer_id, chat("busy-1", max_tokens=3000, logit_bias=NO_END))
            with pytest.raises(NoCapacity):
                await open_infer(shim, node.peer_id, chat("busy-2"))
            await first.aclose()


async def test_reset_mid_generation_frees_the_slot(tiny_model_dir):
    with trio.fail_after(60):
        async with node_and_client(tiny_model_dir, max_concurrent=1, max_queue=0) as (node, shim, engine, served, finished):
            call = await open_infer(shim, node.peer_id, chat("long", max_tokens=3000, logit_bias=NO_END))
            assert isinstance(await call.receive(), (Delta, ChoiceEnd))
            await call.aclose()  # before Done: resets the stream
            await finished.wait()
            assert served[0].outcome == "cancelled"
            # the slot is free again: with one slot and no queue, a new request is admitted
            again = await open_infer(shim, node.peer_id, chat("after"))
            while await again.receive() is not None:
                pass
            await again.aclose()


async def test_garbage_first_frame_gets_an_error_frame(tiny_model_dir):
    with trio.fail_after(60):
        async with node_and_client(tiny_model_dir) as (node, shim, *_):
            stream = await shim.open_stream(node.peer_id, INFER_PROTOCOL)
            await stream.write(encode_frame(ErrorFrame(request_id="x", code="internal", message="not a request")))
            reply = await read_frame(stream.read, FrameDecoder(), ErrorFrame)
            assert reply.code == "bad_request"
            assert await stream.read() == b""  # the node closed its side
            # a stream that ends before Done is an error, never a silent end
            call = await open_infer(shim, node.peer_id, chat("cut", max_tokens=3000, logit_bias=NO_END))
            await call.stream.close()  # half-close: the node stops generating and closes too
            with pytest.raises(StreamClosed):
                while await call.receive() is not None:
                    pass
            await call.aclose()
