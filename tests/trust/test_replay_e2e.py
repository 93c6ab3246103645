"""End to end over libp2p with real tiny-model engines: the shim seeds a sampled request, a node that draws from the
right model but ignores the seed is caught by the verifier's replay, and the relay counts the signed evidence."""

from __future__ import annotations

import dataclasses
from contextlib import aclosing
from typing import Any

import openai
import trio

from darkbloom.api.trust.report import Reporter
from darkbloom.api.trust.routing import TrustedRouting
from darkbloom.config import LedgerConfig
from darkbloom.identity import Identity
from darkbloom.ledger.service import LedgerService
from darkbloom.ledger.store import SqliteStore
from darkbloom.p2p.keys import peer_id_from_public_key, public_key_from_peer_id
from darkbloom.relay.intake import IntakePolicy, TrustStore
from darkbloom.relay.trust import RelayTrust

from tests.api.netharness import CHAT, SpotCheckLog, network
from tests.trust.test_report_e2e import LedgerOnlyNetwork

RELAY = Identity.from_seed(b"\x61" * 32)
SHIM = Identity.from_seed(b"\x62" * 32)


class SeedIgnoringEngine:
    """A real engine whose node samples every request without its seed: the right model and the right
    distribution (the e-value sees nothing wrong), but not the draws the seed commits it to."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.seeds: list[int | None] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    async def generate(self, model_id: str, req: Any):
        self.seeds.append(req.sampling.seed)
        unseeded = dataclasses.replace(req, sampling=dataclasses.replace(req.sampling, seed=None))
        async with aclosing(self.engine.generate(model_id, unseeded)) as events:
            async for event in events:
                yield event


async def test_a_node_that_ignores_the_seed_is_caught_by_replay_and_counted(tiny_model_dir, tmp_path):
    store, trust_store = SqliteStore(tmp_path / "ledger.sqlite3"), TrustStore(tmp_path / "trust.sqlite3")
    service = LedgerService(store, RELAY, LedgerConfig(epoch_s=3600))
    relay = RelayTrust(service.ledger, RELAY, trust_store, intake=IntakePolicy(require_lane=False))  # default policy
    relay.attach(service)
    trust = TrustedRouting(spot_check_probability=1.0)  # the shipped policy, replay rule included
    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as side:
                reporter = Reporter(LedgerOnlyNetwork(service, side), SHIM, (peer_id_from_public_key(RELAY.public_key), ()))
                async with network(tiny_model_dir, [{"decode_tps": 1000.0}, {"decode_tps": 10.0}], trust=trust) as net:
                    cheat, _honest = net.nodes
                    wrapped = SeedIgnoringEngine(cheat.service.engine)
                    cheat.service.engine = wrapped
                    net.backend.reporter = reporter
                    log = SpotCheckLog(net.backend)
                    async with openai.AsyncOpenAI(base_url=net.url, api_key="local", max_retries=0) as client:
                        first = await client.chat.completions.with_raw_response.create(
                            model=CHAT, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=24,
                            temperature=1.0)  # no seed from the developer
                        assert first.headers["x-darkbloom-node"] == cheat.peer_id
                        await log.checked.wait()
                side.cancel_scope.cancel()
        assert len(wrapped.seeds) == 1 and isinstance(wrapped.seeds[0], int)  # the shim seeded it
        served_by, verdict = log.verdicts[0]
        assert served_by == cheat.peer_id and verdict.flagged and verdict.reason == "replay_mismatch", verdict
        cheat_key = public_key_from_peer_id(cheat.peer_id).hex()
        assert [a.suspect for a in reporter.sent] == [cheat_key] and reporter.sent[0].counted
        assert relay.reports_counted == 1 and relay.reports_refused == 0
        (stored,) = trust_store.reports(cheat_key)
        assert stored.reason == "replay_mismatch"
    finally:
        trust_store.close()
        store.close()
