"""The relay daemon's trust side over real libp2p on 127.0.0.1: a shim-side refresher fetches the signed table the relay
publishes after an epoch, a spot-check report sent over the network is counted and the republished table reaches the
shim's routing; the relay's Prometheus text carries settlement lag and pending vouchers."""

from __future__ import annotations

import dataclasses
from functools import partial

import httpx
import pytest
import trio

from darkbloom.api.trust.evidence import attest_output, attest_scores, make_report
from darkbloom.api.trust.refresh import entry_for, run_table_refresh
from darkbloom.api.trust.routing import TrustedRouting
from darkbloom.api.trust.verify import ScoredOutput, judge
from darkbloom.config import Config, LedgerConfig
from darkbloom.identity import Identity, load_or_create_identity
from darkbloom.ledger.client import LedgerClient
from darkbloom.ledger.lanes import ConsumerLane, NodeLane
from darkbloom.ledger.trustclient import TrustClient
from darkbloom.p2p.keys import peer_id_from_public_key
from darkbloom.relay.intake import RELAY_POLICY
from darkbloom.up import _role_config
from darkbloom.wire.ledger import LEDGER_PROTOCOL

NODE = Identity.from_seed(b"\x31" * 32)
VERIFIER = Identity.from_seed(b"\x32" * 32)
CONSUMERS = [Identity.from_seed(bytes([0x40 + i]) * 32) for i in range(3)]


def _report(reporter: Identity, now_ms: int):
    prompt, output = list(range(1, 9)), list(range(200, 216))
    out = attest_output(NODE, request_id="r", model="m", model_digest="d" * 64, prompt_ids=prompt, output_ids=output,
                        time_ms=now_ms)
    score = attest_scores(VERIFIER, model_digest="d" * 64, prompt_ids=prompt, output_ids=output,
                          logprobs=[-12.0] * 16, ranks=[5000] * 16, time_ms=now_ms)
    verdict = judge(ScoredOutput((-12.0,) * 16, (5000,) * 16), RELAY_POLICY)
    return make_report(reporter, out, score, verdict, RELAY_POLICY, time_ms=now_ms)


async def test_relay_publishes_reputation_and_counts_reports_over_libp2p(tmp_path):
    from darkbloom.p2p.network import open_network
    from darkbloom.relay.daemon import open_relay

    base = Config(data_dir=str(tmp_path), ledger=LedgerConfig(epoch_s=3600))
    base = dataclasses.replace(base, relay=dataclasses.replace(base.relay, status_port=0))
    relay_cfg = _role_config(base, tmp_path / "relay", relay={"listen_addrs": ("/ip4/127.0.0.1/tcp/0",), "status_port": 0})
    with trio.fail_after(60):
        async with open_relay(relay_cfg) as relay:
            boot = relay.addrs
            shim_cfg = _role_config(base, tmp_path / "shim", p2p={"bootstrap": boot})
            ident = load_or_create_identity(tmp_path / "shim")
            async with open_network(shim_cfg.p2p, ident, role="shim", bootstrap=boot) as net:
                await net.wait_joined()

                async def connect():
                    return await net.open_stream(relay.peer_id, LEDGER_PROTOCOL, addrs=boot)

                # Three consumers pay the node; its vouchers reach the ledger; one epoch closes.
                for c in CONSUMERS:
                    await trio.to_thread.run_sync(partial(relay.store.deposit, c.public_key.hex(), 5_000_000, now_ms=0))
                    client = LedgerClient(await connect(), c, ledger_key=relay.ledger_key)
                    reservation = await client.open_lane(NODE.public_key.hex(), 1_000_000, price_input_per_m=100_000,
                                                         price_output_per_m=400_000)
                    await client.close()
                    cl = ConsumerLane(c, reservation, voucher_every_tokens=32)
                    nl = NodeLane.open(NODE, reservation, ledger_key=relay.ledger_key, now_ms=reservation.opened_ms,
                                       voucher_every_tokens=32)
                    for side in (cl, nl):
                        side.begin_request(b"request-1", "digest-1")
                    nl.served(prompt_tokens=10, completion_tokens=3_000)
                    cl.add_usage(prompt_tokens=10, completion_tokens=3_000)
                    signed = nl.accept(cl.next_voucher(now_ms=reservation.opened_ms + 1), now_ms=reservation.opened_ms + 1)
                    node_client = LedgerClient(await connect(), NODE, ledger_key=relay.ledger_key)
                    assert [r.status for r in await node_client.submit([signed])] == ["queued"]
                    await node_client.close()
                async with httpx.AsyncClient() as http:
                    before = (await http.get(f"{relay.status_url}/metrics")).text
                assert 'darkbloom_ledger_pending_vouchers{role="relay"} 3.0' in before
                assert 'darkbloom_ledger_last_epoch{role="relay"} 0.0' in before
                await relay.ledger.settle_now()  # the after-epoch hook publishes the table

                routing = TrustedRouting()
                tables: list = []
                changed = trio.Event()

                def on_table(table) -> None:
                    nonlocal changed
                    if routing.apply_table(table, trio.current_time()):
                        tables.append(table)
                        changed.set()
                        changed = trio.Event()

                async with trio.open_nursery() as nursery:
                    await nursery.start(partial(run_table_refresh, connect, relay.ledger_key, on_table, interval_s=0.05))
                    while not tables:
                        await changed.wait()
                    entry = entry_for(tables[-1], NODE.public_key.hex())
                    assert tables[-1].epoch == 1 and entry.consumers == 3 and entry.completion_tokens == 9_000
                    pid = peer_id_from_public_key(NODE.public_key)
                    score = routing.book.reputation(pid, trio.current_time())
                    assert score == pytest.approx(entry.score_ppm / 1e6) and score > 0.5

                    # A shim reports the node with signed evidence over libp2p; the refresher sees the cut.
                    trust_client = TrustClient(await connect(), ledger_key=relay.ledger_key)
                    ack = await trust_client.report(_report(CONSUMERS[0], relay.ledger.now_ms()))
                    await trust_client.close()
                    assert ack.counted and ack.epoch == 1
                    while entry_for(tables[-1], NODE.public_key.hex()).failed_checks == 0:
                        await changed.wait()
                    assert routing.book.reputation(pid, trio.current_time()) == pytest.approx(score / 2, rel=0.01)
                    nursery.cancel_scope.cancel()

                async with httpx.AsyncClient() as http:
                    metrics = (await http.get(f"{relay.status_url}/metrics")).text
                    status = (await http.get(f"{relay.status_url}/status.json")).json()
    assert 'darkbloom_ledger_pending_vouchers{role="relay"} 0.0' in metrics
    assert 'darkbloom_ledger_last_epoch{role="relay"} 1.0' in metrics
    assert 'darkbloom_settlement_lag_seconds{role="relay"}' in metrics
    assert status["reputation_epoch"] == 1 and status["spot_checks_counted"] == 1
