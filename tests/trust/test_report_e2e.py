"""A spot check flags a cheating node (real tiny-model engines over libp2p); the shim reports it with both signed
attestations to a real ledger service with the relay's trust service, which checks the evidence and counts it."""

from __future__ import annotations

import openai
import trio
import trio.testing

from darkbloom.api.trust.refresh import entry_for
from darkbloom.api.trust.report import Reporter
from darkbloom.api.trust.routing import TrustedRouting
from darkbloom.api.trust.verify import VerifyPolicy
from darkbloom.config import LedgerConfig
from darkbloom.identity import Identity
from darkbloom.ledger.service import LedgerService
from darkbloom.ledger.store import SqliteStore
from darkbloom.p2p.keys import peer_id_from_public_key, public_key_from_peer_id
from darkbloom.relay.intake import IntakePolicy, TrustStore
from darkbloom.relay.trust import RelayTrust

from tests.api.netharness import CHAT, SpotCheckLog, network

RELAY = Identity.from_seed(b"\x51" * 32)
SHIM = Identity.from_seed(b"\x52" * 32)
# The tiny random model is nearly uniform: judge by rank only (as tests/api/test_spot_checks.py).
TINY_POLICY = VerifyPolicy(top_k=100, max_outside=2, min_mean_logprob=-50.0)


class _Stream:
    def __init__(self, stream: trio.abc.Stream, peer_id: str) -> None:
        self._stream, self.peer_id = stream, peer_id

    async def read(self, n: int = 65536) -> bytes:
        return await self._stream.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def close(self) -> None:
        await self._stream.aclose()


class LedgerOnlyNetwork:
    """Routes ledger streams to an in-process LedgerService (the relay's service, real SQLite) over memory streams."""

    def __init__(self, service: LedgerService, nursery: trio.Nursery) -> None:
        self.service, self.nursery = service, nursery

    async def open_stream(self, peer_id: str, protocol: str, *, addrs=()):
        left, right = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.service.handle, _Stream(right, "shim"))
        return _Stream(left, peer_id)


async def test_a_flagged_cheat_is_reported_and_counted_by_the_relay(tiny_model_dir, tmp_path):
    store, trust_store = SqliteStore(tmp_path / "ledger.sqlite3"), TrustStore(tmp_path / "trust.sqlite3")
    service = LedgerService(store, RELAY, LedgerConfig(epoch_s=3600))
    relay = RelayTrust(service.ledger, RELAY, trust_store, intake=IntakePolicy(verify=TINY_POLICY, require_lane=False))  # the harness serves free
    relay.attach(service)
    trust = TrustedRouting(spot_check_probability=1.0, verify_policy=TINY_POLICY)
    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as side:
                ledger_peer = peer_id_from_public_key(RELAY.public_key)
                reporter = Reporter(LedgerOnlyNetwork(service, side), SHIM, (ledger_peer, ()))
                async with network(tiny_model_dir, [{"decode_tps": 1000.0, "lie": True}, {"decode_tps": 10.0}],
                                   trust=trust) as net:
                    cheat, honest = net.nodes
                    net.backend.reporter = reporter
                    log = SpotCheckLog(net.backend)
                    async with openai.AsyncOpenAI(base_url=net.url, api_key="local", max_retries=0) as client:
                        first = await client.chat.completions.with_raw_response.create(
                            model=CHAT, messages=[{"role": "user", "content": "Count to five."}], max_tokens=12,
                            temperature=0)
                        assert first.headers["x-darkbloom-node"] == cheat.peer_id
                        await log.checked.wait()
                side.cancel_scope.cancel()
        served_by, verdict = log.verdicts[0]
        assert served_by == cheat.peer_id and verdict.flagged
        cheat_key = public_key_from_peer_id(cheat.peer_id).hex()
        assert [a.suspect for a in reporter.sent] == [cheat_key] and reporter.sent[0].counted
        assert relay.reports_counted == 1 and relay.reports_refused == 0
        (stored,) = trust_store.reports(cheat_key)
        assert stored.reporter == SHIM.public_key.hex()
        assert entry_for(relay.table, cheat_key).failed_checks == 1
    finally:
        trust_store.close()
        store.close()
