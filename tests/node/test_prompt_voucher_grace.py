"""Paid serving: the first tokens do not wait for the prompt's voucher round trip, and the node's
exposure stays bounded when no voucher ever comes.

A real ledger service (SQLite store) reserves a lane for the consumer; the node (real engine
on the tiny model, real MiniLM embedder) serves with a NodeMeter. The client is a raw infer stream that sends the
request with the lane's reservation and then never a voucher, so every frame the node sends
is one it sent unpaid beyond the prompt.
"""

from __future__ import annotations

import time

import trio

from darkbloom.api.metering import ConsumerMeter, session_bytes
from darkbloom.config import LedgerConfig
from darkbloom.identity import Identity
from darkbloom.inference.catalog import model_info
from darkbloom.inference.engine import open_engine
from darkbloom.ledger.service import LedgerService
from darkbloom.ledger.store import open_store
from darkbloom.node.serve import InferenceService, NodeMeter, open_embedder, serve_inference
from darkbloom.p2p.memory import MemoryHub, open_memory_network
from darkbloom.wire.codec import FrameDecoder, encode_frame, read_frame
from darkbloom.wire.infer import INFER_PROTOCOL, Accepted, Delta, Embeddings, ErrorFrame, InferRequest
from darkbloom.wire.ledger import LEDGER_PROTOCOL

CHAT, EMBED = "tiny-chat", "all-minilm-l6-v2"
PRICE_IN, PRICE_OUT = 200_000, 800_000
EVERY = 4  # voucher interval: the node lets 2 * EVERY tokens go unvouched


async def unpaid(shim_net, node, lane, request: InferRequest) -> list:
    """Send `request` on the lane, never a voucher; every frame the node answers (up to an error)."""
    stream = await shim_net.open_stream(node.peer_id, INFER_PROTOCOL)
    await stream.write(encode_frame(request))
    decoder = FrameDecoder()
    frames = []
    while (frame := await read_frame(stream.read, decoder, None)) is not None:
        frames.append(frame)
        if isinstance(frame, ErrorFrame):
            break
    await stream.reset()
    return frames


async def test_first_tokens_go_before_the_prompt_voucher_and_stop_without_one(tiny_model_dir, minilm_dir, tmp_path):
    hub = MemoryHub()
    ledger_id, node_id, shim_id = Identity.generate(), Identity.generate(), Identity.generate()
    store = open_store("", tmp_path)
    store.deposit(shim_id.public_key.hex(), 1_000_000, now_ms=int(time.time() * 1000))
    info = model_info(CHAT, tiny_model_dir, "chat")
    ledger_cfg = LedgerConfig(voucher_every_tokens=EVERY, lane_reserve=50_000)
    with trio.fail_after(60):
        async with open_engine([(CHAT, tiny_model_dir)], self_benchmark=False) as engine, \
                open_embedder(minilm_dir, model_id=EMBED) as embed, \
                open_memory_network(hub, ledger_id) as ledger_net, \
                open_memory_network(hub, node_id) as node, \
                open_memory_network(hub, shim_id) as shim_net:
            ledger_net.serve(LEDGER_PROTOCOL, LedgerService(store, ledger_id, ledger_cfg).handle)
            meter = NodeMeter(node_id, ledger_key=ledger_id.public_key.hex(), price_input_per_m=PRICE_IN,
                              price_output_per_m=PRICE_OUT, voucher_every_tokens=EVERY, voucher_timeout_s=0.5)
            serve_inference(node, InferenceService(engine, digests={CHAT: info.digest, EMBED: "e" * 64},
                                                   embedders={EMBED: embed}, meter=meter))
            consumer = ConsumerMeter(shim_net, shim_id, ledger_cfg, ledger_peer=ledger_net.peer_id)
            lane = await consumer.acquire(node.peer_id, price_input_per_m=PRICE_IN, price_output_per_m=PRICE_OUT)
            assert lane is not None

            frames = await unpaid(shim_net, node, lane, InferRequest(
                request_id="grace-1", kind="chat", model=CHAT, session=session_bytes(lane),
                params={"messages": [{"role": "user", "content": "Tell me a long story."}],
                        "max_tokens": 40, "temperature": 0, "logit_bias": {"0": -100, "2": -100}}))
            # An embedding's whole answer is its prompt: it still waits for the prompt's voucher (another lane:
            # the first one ended unpaid).
            lane2 = await consumer.acquire(node.peer_id, price_input_per_m=PRICE_IN, price_output_per_m=PRICE_OUT,
                                           avoid=lane.lane)
            assert lane2 is not None and lane2.lane != lane.lane
            embed_frames = await unpaid(shim_net, node, lane2, InferRequest(
                request_id="grace-2", kind="embedding", model=EMBED, session=session_bytes(lane2),
                params={"input": ["one two three four five six seven eight nine ten eleven twelve"]}))
            await consumer.aclose()

    accepted = frames[0]
    assert isinstance(accepted, Accepted)
    assert accepted.prompt_tokens > 2 * EVERY  # without the grace the gate would hold the very first token
    deltas = [f for f in frames[1:] if isinstance(f, Delta)]
    assert isinstance(frames[1], Delta)  # the first token came without any voucher
    served = sum(d.tokens for d in deltas)
    # ...and no more than the lane's allowance went out unpaid (checked before each Delta, as the gate always does)
    assert 0 < served - deltas[-1].tokens <= 2 * EVERY
    assert isinstance(frames[-1], ErrorFrame) and frames[-1].code == "payment_required"  # vouchers never came

    assert isinstance(embed_frames[0], Accepted) and embed_frames[0].prompt_tokens > 2 * EVERY
    assert not any(isinstance(f, Embeddings) for f in embed_frames)  # no vectors without the voucher
    assert isinstance(embed_frames[-1], ErrorFrame) and embed_frames[-1].code == "payment_required"
