"""The relay's prober over libp2p with real tiny-model nodes: status probes give uptime (and the derived class), capability
canaries catch a node that advertises JSON mode but ignores it, the failure is published in the signed table and a shim
that takes the table sends that node no JSON requests."""

from __future__ import annotations

import dataclasses

import trio

from darkbloom.api.trust.refresh import entry_for
from darkbloom.api.trust.routing import TrustedRouting
from darkbloom.config import LedgerConfig
from darkbloom.inference.params import ResponseFormat
from darkbloom.ledger.reputation import verify_table
from darkbloom.ledger.service import LedgerService
from darkbloom.ledger.store import SqliteStore
from darkbloom.p2p.keys import public_key_from_peer_id
from darkbloom.p2p.status import serve_status
from darkbloom.relay.intake import TrustStore
from darkbloom.relay.probe import RelayProber
from darkbloom.relay.trust import RelayTrust
from darkbloom.wire.infer import PROTOCOL_VERSION, StatusReply

from tests.api.netharness import CHAT, network


class IgnoresJsonMode:
    """A real engine behind a node that advertises JSON mode but generates free text (a cheat for the canary)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, model_id, req):
        return self.engine.generate(model_id, dataclasses.replace(req, response_format=ResponseFormat()))


async def test_relay_canaries_and_probes_reach_the_table(tiny_model_dir, tmp_path):
    store, trust_store = SqliteStore(tmp_path / "ledger.sqlite3"), TrustStore(tmp_path / "trust.sqlite3")
    try:
        with trio.fail_after(180):
            async with network(tiny_model_dir, [{"decode_tps": 50.0}, {"decode_tps": 50.0}]) as net:
                honest, cheat = net.nodes
                cheat.service.engine = IgnoresJsonMode(cheat.service.engine)
                for n in net.nodes:  # the node daemon serves the status protocol; the harness's nodes do not
                    serve_status(n.member.net, lambda n=n: StatusReply(version="test", protocol=PROTOCOL_VERSION,
                                                                       load=n.service.load(), models=(CHAT,)))
                relay_member = net.swarm.relays[0]
                service = LedgerService(store, relay_member.identity, LedgerConfig(epoch_s=3600))
                t0 = 1_800_000_000.0
                now = [t0]
                trust = RelayTrust(service.ledger, relay_member.identity, trust_store, clock=lambda: now[0])
                prober = RelayProber(relay_member.net, trust, models=(CHAT,), timeout_s=60.0, probe_interval_s=0,
                                     canary_interval_s=0)
                assert set(await prober.discover()) == {honest.peer_id, cheat.peer_id}
                await prober.probe_round()
                now[0] = t0 + 300
                await prober.probe_round()
                plan = prober.plan(prober.known)
                assert {(p, f) for p, _, f in plan} >= {(cheat.peer_id, "json"), (honest.peer_id, "json")}
                await prober.canary_round()
                table = await trust.publish()
    finally:
        trust_store.close()
        store.close()
    verify_table(table, relay_member.identity.public_key.hex())
    cheat_entry = entry_for(table, public_key_from_peer_id(cheat.peer_id).hex())
    honest_entry = entry_for(table, public_key_from_peer_id(honest.peer_id).hex())
    assert cheat_entry.failed_features == ("json",)
    assert honest_entry.failed_features == ()
    assert prober.canaries_run == len(plan)
    for e in (cheat_entry, honest_entry):
        assert e.uptime_ppm == 1_000_000 and e.node_class == "new"  # up at both probes; observed < 1 h
    routing = TrustedRouting()
    assert routing.apply_table(table, 5.0)
    assert routing.canaries.barred(cheat.peer_id, ["json"], 5.0)
    assert not routing.canaries.barred(honest.peer_id, ["json"], 5.0)
    # the honest node still gets the shim's own canary before JSON requests; the cheat is not even asked
    assert routing.canaries.needed(honest.peer_id, ["json"], 5.0) == ["json"]
    assert routing.canaries.needed(cheat.peer_id, ["json"], 5.0) == []
