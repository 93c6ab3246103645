"""Paid serving end to end: the shim opens a lane at a real ledger service (SQLite store), signs
vouchers as tokens arrive, the node (real engine) countersigns and gates, the node submits, the
ledger settles. Over the in-memory network; HTTP through the openai SDK."""

from __future__ import annotations

import time

import openai
import pytest
import trio

from darkbloom.api.metering import ConsumerMeter
from darkbloom.api.network import NetworkBackend
from darkbloom.config import ApiConfig, LedgerConfig
from darkbloom.identity import Identity
from darkbloom.inference.catalog import model_info
from darkbloom.inference.engine import open_engine
from darkbloom.ledger.client import LedgerClient
from darkbloom.ledger.receipts import cost_of, verify_voucher
from darkbloom.ledger.service import LedgerService
from darkbloom.ledger.store import open_store
from darkbloom.node.serve import InferenceService, NodeMeter, open_embedder, serve_inference
from darkbloom.p2p.memory import MemoryHub, open_memory_network
from darkbloom.wire.caps import CapabilityRecord, ModelCap
from darkbloom.wire.ledger import LEDGER_PROTOCOL

from .harness import running_shim

CHAT, EMBED = "tiny-chat", "all-minilm-l6-v2"
PRICE_IN, PRICE_OUT = 200_000, 800_000
MSG = [{"role": "user", "content": "Tell me something."}]


async def test_vouchers_follow_the_tokens_and_settle(tiny_model_dir, minilm_dir, tmp_path):
    hub = MemoryHub()
    ledger_id, node_id, shim_id = Identity.generate(), Identity.generate(), Identity.generate()
    store = open_store("", tmp_path)
    kept = []  # the node's countersigned vouchers, in order

    async def keep(voucher) -> None:
        kept.append(voucher)

    chat_info = model_info(CHAT, tiny_model_dir, "chat")
    embed_info = model_info(EMBED, minilm_dir, "embedding")
    ledger_cfg = LedgerConfig(voucher_every_tokens=8, lane_reserve=50_000)
    with trio.fail_after(120):
        async with open_engine([(CHAT, tiny_model_dir)], self_benchmark=False) as engine, \
                open_embedder(minilm_dir, model_id=EMBED) as embed, \
                open_memory_network(hub, ledger_id) as ledger_net, \
                open_memory_network(hub, node_id) as node, \
                open_memory_network(hub, shim_id) as shim_net, \
                trio.open_nursery() as nursery:
            service = LedgerService(store, ledger_id, ledger_cfg)
            ledger_net.serve(LEDGER_PROTOCOL, service.handle)
            meter = NodeMeter(node_id, ledger_key=ledger_id.public_key.hex(), price_input_per_m=PRICE_IN,
                              price_output_per_m=PRICE_OUT, voucher_every_tokens=8, voucher_timeout_s=5, store=keep)
            serve_inference(node, InferenceService(engine, digests={CHAT: chat_info.digest, EMBED: embed_info.digest},
                                                   embedders={EMBED: embed}, meter=meter))
            await node.put_record(CapabilityRecord(
                peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0, max_concurrent=8,
                price_input_per_m=PRICE_IN, price_output_per_m=PRICE_OUT,
                models=(ModelCap(id=CHAT, digest=chat_info.digest, context_length=2048, features=chat_info.features),
                        ModelCap(id=EMBED, digest=embed_info.digest, context_length=512, features=("embeddings",)))))
            await node.provide(CHAT)
            await node.provide(EMBED)
            consumer = ConsumerMeter(shim_net, shim_id, ledger_cfg, ledger_peer=ledger_net.peer_id)
            backend = NetworkBackend(shim_net, ApiConfig(), meter=consumer)
            async with running_shim(backend) as url, \
                    openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0) as client:
                # no credit yet: the ledger refuses the lane, the SDK sees insufficient_quota
                with pytest.raises(openai.RateLimitError) as broke:
                    await client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=5)
                assert broke.value.body["code"] == "insufficient_quota"
                store.deposit(shim_id.public_key.hex(), 1_000_000, now_ms=int(time.time() * 1000))

                usage = []
                r = await client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=30,
                                                         extra_body={"logit_bias": {"0": -100, "2": -100}})
                usage.append(r.usage)
                stream = await client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=20, stream=True,
                                                              stream_options={"include_usage": True})
                usage.append([c async for c in stream][-1].usage)
                e = await client.embeddings.create(model=EMBED, input=["a b c", "d e f g"])
                usage.append(e.usage)
                # two requests at once need two lanes (a lane's hash chain is sequential)
                async with trio.open_nursery() as both:
                    for _ in range(2):
                        both.start_soon(lambda: client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=4))
            # lanes are reused once a request finished cleanly; two at once needed two
            assert 2 <= consumer.opened < 5

            # the node holds countersigned vouchers that cover exactly what the client was told
            latest = {}
            for v in kept:
                verify_voucher(v, shim_id.public_key.hex(), node_id.public_key.hex())
                latest[v.lane] = v
            assert len(latest) == consumer.opened
            tokens = sum(v.cum_prompt_tokens + v.cum_completion_tokens for v in latest.values())
            told = sum(u.total_tokens for u in usage)
            assert told < tokens <= told + 2 * 4 + 2 * 20  # plus the two concurrent small requests
            assert max(v.seq for v in kept) >= 30 // 8  # vouchers came during the answer, not only at the end
            total_cost = sum(v.cum_cost for v in latest.values())
            assert total_cost == sum(cost_of(v.cum_prompt_tokens, v.cum_completion_tokens, PRICE_IN, PRICE_OUT)
                                     for v in latest.values())

            # the node submits, the ledger settles: the shim pays what it signed for
            node_client = LedgerClient(await node.open_stream(ledger_net.peer_id, LEDGER_PROTOCOL), node_id)
            results = await node_client.submit(list(latest.values()))
            assert {r.status for r in results} == {"queued"}
            await service.settle_now()
            balance, reserved = store.balance(shim_id.public_key.hex())
            assert balance + reserved == 1_000_000 - total_cost
            node_balance, _ = store.balance(node_id.public_key.hex())
            assert 0 < node_balance <= total_cost
            await node_client.close()
            await consumer.aclose()
            nursery.cancel_scope.cancel()


async def test_a_free_node_gets_no_more_lanes(tiny_model_dir, tmp_path):
    hub = MemoryHub()
    ledger_id, shim_id = Identity.generate(), Identity.generate()
    store = open_store("", tmp_path)
    store.deposit(shim_id.public_key.hex(), 1_000_000, now_ms=int(time.time() * 1000))
    info = model_info(CHAT, tiny_model_dir, "chat")
    with trio.fail_after(120):
        async with open_engine([(CHAT, tiny_model_dir)], self_benchmark=False) as engine, \
                open_memory_network(hub, ledger_id) as ledger_net, \
                open_memory_network(hub, Identity.generate()) as node, \
                open_memory_network(hub, shim_id) as shim_net:
            ledger_net.serve(LEDGER_PROTOCOL, LedgerService(store, ledger_id, LedgerConfig()).handle)
            serve_inference(node, InferenceService(engine, digests={CHAT: info.digest}))  # no meter: free
            await node.put_record(CapabilityRecord(
                peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0, max_concurrent=4,
                models=(ModelCap(id=CHAT, digest=info.digest, context_length=2048, features=info.features),)))
            await node.provide(CHAT)
            consumer = ConsumerMeter(shim_net, shim_id, LedgerConfig(), ledger_peer=ledger_net.peer_id)
            backend = NetworkBackend(shim_net, ApiConfig(), meter=consumer)
            async with running_shim(backend) as url, \
                    openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0) as client:
                for _ in range(3):
                    stream = await client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=3, stream=True)
                    assert [c async for c in stream][-1].choices[0].finish_reason in ("stop", "length")
            await consumer.aclose()
    assert consumer.opened == 1  # the first request found out the node serves free
