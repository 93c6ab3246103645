"""Hosted mode pays per API key: each key's requests are funded by that key's own ledger account.

Memory network, real engine, real ledger service (SQLite), the shim over real HTTP with hosted
keys and the openai SDK. The shim's own account holds nothing, so any request it paid for itself
would be refused.
"""

from __future__ import annotations

import time

import openai
import pytest
import trio

from darkbloom.api.keys import KeyAuthenticator, KeyStore
from darkbloom.api.metering import ConsumerMeter
from darkbloom.api.network import NetworkBackend
from darkbloom.config import ApiConfig, LedgerConfig
from darkbloom.identity import Identity
from darkbloom.inference.catalog import model_info
from darkbloom.inference.engine import open_engine
from darkbloom.ledger.client import LedgerClient
from darkbloom.ledger.receipts import verify_voucher
from darkbloom.ledger.service import LedgerService
from darkbloom.ledger.store import open_store
from darkbloom.node.serve import InferenceService, NodeMeter, serve_inference
from darkbloom.p2p.memory import MemoryHub, open_memory_network
from darkbloom.wire.caps import CapabilityRecord, ModelCap
from darkbloom.wire.ledger import LEDGER_PROTOCOL

from .harness import running_shim

CHAT = "tiny-chat"
PRICE_IN, PRICE_OUT = 200_000, 800_000
MSG = [{"role": "user", "content": "Tell me something."}]


async def test_each_keys_requests_are_paid_from_its_own_account(tiny_model_dir, tmp_path):
    hub = MemoryHub()
    ledger_id, node_id, shim_id = Identity.generate(), Identity.generate(), Identity.generate()
    store = open_store("", tmp_path / "ledger")
    keys = KeyStore(tmp_path / "shim")
    alice_key, alice = keys.create_sync("alice")
    bob_key, bob = keys.create_sync("bob")
    broke_key, broke = keys.create_sync("broke")
    now_ms = int(time.time() * 1000)
    store.deposit(alice.account, 500_000, now_ms=now_ms)
    store.deposit(bob.account, 300_000, now_ms=now_ms)
    kept = []

    async def keep(voucher) -> None:
        kept.append(voucher)

    info = model_info(CHAT, tiny_model_dir, "chat")
    cfg = LedgerConfig(voucher_every_tokens=8, lane_reserve=50_000)
    try:
        with trio.fail_after(120):
            async with open_engine([(CHAT, tiny_model_dir)], self_benchmark=False) as engine, \
                    open_memory_network(hub, ledger_id) as ledger_net, \
                    open_memory_network(hub, node_id) as node, \
                    open_memory_network(hub, shim_id) as shim_net:
                service = LedgerService(store, ledger_id, cfg)
                ledger_net.serve(LEDGER_PROTOCOL, service.handle)
                serve_inference(node, InferenceService(engine, digests={CHAT: info.digest}, meter=NodeMeter(
                    node_id, ledger_key=ledger_id.public_key.hex(), price_input_per_m=PRICE_IN,
                    price_output_per_m=PRICE_OUT, voucher_every_tokens=8, voucher_timeout_s=5, store=keep)))
                await node.put_record(CapabilityRecord(
                    peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0, max_concurrent=8,
                    price_input_per_m=PRICE_IN, price_output_per_m=PRICE_OUT,
                    models=(ModelCap(id=CHAT, digest=info.digest, context_length=2048, features=info.features),)))
                await node.provide(CHAT)
                consumer = ConsumerMeter(shim_net, shim_id, cfg, ledger_peer=ledger_net.peer_id)
                backend = NetworkBackend(shim_net, ApiConfig(), meter=consumer)
                told: dict[str, int] = {}
                async with running_shim(backend, auth=KeyAuthenticator(keys), require_api_key=True) as url:
                    async def ask(api_key: str, who: str, n: int = 2) -> None:
                        async with openai.AsyncOpenAI(base_url=url, api_key=api_key, max_retries=0) as client:
                            for _ in range(n):
                                r = await client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=12)
                                told[who] = told.get(who, 0) + r.usage.total_tokens

                    async with trio.open_nursery() as both:  # two tenants at once
                        both.start_soon(ask, alice_key, "alice", 3)
                        both.start_soon(ask, bob_key, "bob", 2)
                    with pytest.raises(openai.RateLimitError) as refused:  # its account holds nothing
                        await ask(broke_key, "broke", 1)
                    assert refused.value.body["code"] == "insufficient_quota"

                # each tenant's lanes were opened by, and reserved from, its own account; none by the shim's
                assert consumer.opened == 0
                assert set(consumer.payers) == {alice.account, bob.account, broke.account}
                lanes = {}
                for v in kept:
                    lanes[v.lane] = v
                by_account: dict[str, list] = {alice.account: [], bob.account: []}
                for lane, v in lanes.items():
                    state = store.lane(lane)
                    verify_voucher(v, state.consumer, node_id.public_key.hex())  # signed by the key's account
                    by_account[state.consumer].append(v)
                assert by_account[alice.account] and by_account[bob.account]
                for who, key in (("alice", alice), ("bob", bob)):
                    tokens = sum(v.cum_prompt_tokens + v.cum_completion_tokens for v in by_account[key.account])
                    assert told[who] <= tokens <= told[who] + 2 * 8 * len(by_account[key.account])
                # usage per key, as the shim records it
                assert sum(p + c for _, p, c in keys.usage_sync(alice.id).values()) == told["alice"]
                assert sum(p + c for _, p, c in keys.usage_sync(bob.id).values()) == told["bob"]
                assert keys.usage_sync(broke.id) == {}

                # the node submits, the ledger settles: each key's account pays exactly its own vouchers
                node_client = LedgerClient(await node.open_stream(ledger_net.peer_id, LEDGER_PROTOCOL), node_id)
                assert {r.status for r in await node_client.submit(list(lanes.values()))} == {"queued"}
                await service.settle_now()
                for key, deposit in ((alice, 500_000), (bob, 300_000)):
                    balance, reserved = store.balance(key.account)
                    assert balance + reserved == deposit - sum(v.cum_cost for v in by_account[key.account])
                assert store.balance(shim_id.public_key.hex()) == (0, 0)
                assert store.totals().conserved
                await node_client.close()
                await consumer.aclose()
    finally:
        keys.close()
        store.close()
