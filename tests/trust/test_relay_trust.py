"""The relay's trust service on a real SQLite ledger over the ledger protocol (trio memory streams): reputation computed, signed and
published after each settled epoch; spot-check reports checked, counted and refused with reasons."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing

from darkbloom.api.trust.evidence import attest_output, attest_scores, make_report
from darkbloom.api.trust.refresh import entry_for
from darkbloom.api.trust.routing import TrustedRouting
from darkbloom.api.trust.verify import ScoredOutput, judge
from darkbloom.config import LedgerConfig
from darkbloom.errors import EvidenceRejected, InvalidSignature
from darkbloom.identity import Identity
from darkbloom.ledger.book import VoucherBook
from darkbloom.ledger.client import LedgerClient, submit_unsettled
from darkbloom.ledger.reputation import verify_table
from darkbloom.ledger.service import LedgerService
from darkbloom.ledger.store import SqliteStore
from darkbloom.ledger.trustclient import TrustClient
from darkbloom.p2p.keys import peer_id_from_public_key
from darkbloom.relay.intake import RELAY_POLICY, TrustStore
from darkbloom.relay.trust import RelayTrust

from tests.ledger.helpers import LEDGER, LEDGER_KEY, Pair, seeded

NOW = 1_800_000_000.0
NOW_MS = int(NOW * 1000)
HONEST, CHEAT, VERIFIER = seeded(60), seeded(61), seeded(62)
SHIMS = [seeded(70 + i) for i in range(6)]
PROMPT, OUTPUT = list(range(1, 12)), list(range(100, 116))


class MemoryLedgerStream:
    def __init__(self, stream: trio.abc.Stream, peer_id: str) -> None:
        self._stream = stream
        self.peer_id = peer_id

    async def read(self, n: int) -> bytes:
        return await self._stream.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def close(self) -> None:
        await self._stream.aclose()


@pytest.fixture
def relay(tmp_path):
    store = SqliteStore(tmp_path / "ledger.sqlite3")
    trust_store = TrustStore(tmp_path / "trust.sqlite3")
    service = LedgerService(store, LEDGER, LedgerConfig(epoch_s=600), clock=lambda: NOW)
    trust = RelayTrust(service.ledger, LEDGER, trust_store, clock=lambda: NOW)
    trust.attach(service)
    yield service, trust
    trust_store.close()
    store.close()


def connect(nursery, service, identity: Identity | None = None):
    left, right = trio.testing.memory_stream_pair()
    nursery.start_soon(service.handle, MemoryLedgerStream(right, "peer"))
    stream = MemoryLedgerStream(left, "ledger")
    if identity is None:
        return TrustClient(stream, ledger_key=LEDGER_KEY)
    return LedgerClient(stream, identity, ledger_key=LEDGER_KEY, clock=lambda: NOW)


async def _settle_work(service, tmp_path, work: list[tuple[Identity, Identity, int]]) -> None:
    """Each (consumer, node, completion tokens): a funded lane, vouchers the node submits; then one epoch closes."""
    store = service.ledger.store
    async with trio.open_nursery() as nursery:
        for i, (consumer, node, tokens) in enumerate(work):
            store.deposit(consumer.public_key.hex(), 10_000_000, now_ms=1)
            shim = connect(nursery, service, consumer)
            reservation = await shim.open_lane(node.public_key.hex(), 1_000_000, price_input_per_m=100_000, price_output_per_m=400_000)
            pair = Pair(consumer, node, reservation)
            book = VoucherBook(tmp_path / f"vouchers-{i}-{service.epochs_closed}.sqlite3")
            book.put(pair.use(prompt=10, completion=tokens))
            await submit_unsettled(book, connect(nursery, service, node))
        nursery.cancel_scope.cancel()
    await service.settle_now()


def _report(reporter: Identity, suspect: Identity = CHEAT, *, verifier: Identity = VERIFIER, logprob: float = -12.0,
            time_ms: int = NOW_MS, output=OUTPUT):
    out = attest_output(suspect, request_id="r1", model="m", model_digest="d" * 64, prompt_ids=PROMPT, output_ids=output,
                        time_ms=time_ms - 1000)
    score = attest_scores(verifier, model_digest="d" * 64, prompt_ids=PROMPT, output_ids=output,
                          logprobs=[logprob] * len(output), ranks=[5000] * len(output), time_ms=time_ms - 500)
    verdict = judge(ScoredOutput((-12.0,) * len(output), (5000,) * len(output)), RELAY_POLICY)
    return make_report(reporter, out, score, verdict, RELAY_POLICY, time_ms=time_ms)


async def test_table_published_after_each_epoch_and_verified_by_the_client(relay, tmp_path):
    service, trust = relay
    with trio.fail_after(20):
        # HONEST serves five paying consumers; CHEAT one consumer with as many tokens in total.
        work = [(c, HONEST, 2_000) for c in SHIMS[:5]] + [(SHIMS[5], CHEAT, 10_000)]
        await _settle_work(service, tmp_path, work)
        async with trio.open_nursery() as nursery:
            client = connect(nursery, service)
            table = await client.reputation()
            nursery.cancel_scope.cancel()
    assert table is not None and table.epoch == 1 and table.ledger == LEDGER_KEY
    verify_table(table, LEDGER_KEY)
    honest, cheat = entry_for(table, HONEST.public_key.hex()), entry_for(table, CHEAT.public_key.hex())
    assert honest.consumers == 5 and cheat.consumers == 1
    assert honest.completion_tokens == 10_000 and cheat.completion_tokens == 10_000
    assert honest.score_ppm > cheat.score_ppm > 500_000  # both earned something above the prior
    # The shim takes it: ledger scores under the nodes' peer ids.
    routing = TrustedRouting()
    assert routing.apply_table(table, 0.0)
    hp = peer_id_from_public_key(HONEST.public_key)
    assert routing.book.reputation(hp, 0.0) == pytest.approx(honest.score_ppm / 1e6)
    assert not routing.apply_table(table, 0.0)  # the same table again changes nothing


async def test_a_table_signed_by_another_key_is_refused(relay):
    service, trust = relay
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            client = connect(nursery, service)
            client.ledger_key = seeded(99).public_key.hex()
            with pytest.raises(InvalidSignature):
                await client.reputation()
            nursery.cancel_scope.cancel()


async def test_spot_check_report_counts_once_and_cuts_reputation(relay, tmp_path):
    service, trust = relay
    with trio.fail_after(20):
        await _settle_work(service, tmp_path, [(c, CHEAT, 2_000) for c in SHIMS[:5]])
        first = await trust.publish()
        before = entry_for(first, CHEAT.public_key.hex())
        async with trio.open_nursery() as nursery:
            client = connect(nursery, service)
            ack = await client.report(_report(SHIMS[0]))
            assert ack.counted and ack.suspect == CHEAT.public_key.hex() and ack.epoch == 1 and ack.reason
            # the same evidence again, and another output from the same reporter this epoch: kept, not counted
            assert not (await client.report(_report(SHIMS[0]))).counted
            assert not (await client.report(_report(SHIMS[0], output=OUTPUT[::-1]))).counted
            # a second reporter counts
            assert (await client.report(_report(SHIMS[1]))).counted
            table = await client.reputation()
            nursery.cancel_scope.cancel()
    after = entry_for(table, CHEAT.public_key.hex())
    assert table.epoch == 1 and table.computed_ms > first.computed_ms and after.failed_checks == 2
    assert after.score_ppm < before.score_ppm / 3  # each failure halves the score
    assert trust.reports_counted == 2
    assert len(trust.store.reports(CHEAT.public_key.hex())) == 3


async def test_forged_unsigned_and_pointless_reports_are_refused_with_a_reason(relay):
    service, trust = relay
    good = _report(SHIMS[0])
    cases = [
        (dataclasses.replace(good, signature=b""), EvidenceRejected, "not signed"),
        (dataclasses.replace(good, signature=bytes(64)), InvalidSignature, "invalid signature"),
        (dataclasses.replace(good, reason="other"), InvalidSignature, "invalid signature"),  # tampered after signing
        (make_report(SHIMS[0], *_swap_output_signature(good), judge(ScoredOutput((-12.0,) * 16, (5000,) * 16), RELAY_POLICY),
                     RELAY_POLICY, time_ms=NOW_MS), InvalidSignature, "trust.output"),
        (_report(SHIMS[0], verifier=CHEAT), EvidenceRejected, "cannot verify itself"),
        (_report(CHEAT), EvidenceRejected, "cannot report itself"),
        (_report(SHIMS[0], verifier=SHIMS[0]), EvidenceRejected, "own verifier"),
        (_report(SHIMS[0], logprob=-0.1), EvidenceRejected, "pass the policy"),
        (_report(SHIMS[0], time_ms=NOW_MS - 2 * 86_400_000), EvidenceRejected, "older"),
        (_report(SHIMS[0], time_ms=NOW_MS + 3_600_000), EvidenceRejected, "future"),
        (_report(SHIMS[5]), EvidenceRejected, "never opened a lane"),  # sound evidence from a key that never paid it
    ]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            client = connect(nursery, service)
            for report, error, words in cases:
                with pytest.raises(error) as info:
                    await client.report(report)
                assert words in str(info.value), (words, str(info.value))
            table = await client.reputation()  # the stream survived every refusal
            nursery.cancel_scope.cancel()
    assert entry_for(table, CHEAT.public_key.hex()) is None
    assert trust.reports_counted == 0 and trust.reports_refused == len(cases)


def _swap_output_signature(report):
    """The suspect's output attestation re-signed by somebody else (a forged node signature)."""
    from darkbloom.wire.codec import decode, encode
    from darkbloom.wire.ledger import signed_bytes
    from darkbloom.wire.trust import OutputAttestation, ScoreAttestation

    out = decode(report.output, OutputAttestation)
    forged = dataclasses.replace(out, signature=SHIMS[3].sign(signed_bytes(out, "node")))
    return forged, decode(report.score, ScoreAttestation)


async def test_relay_observations_reach_the_table_and_bar_features_at_the_shim(relay):
    service, trust = relay
    node = HONEST.public_key.hex()
    t = NOW
    for i in range(25 * 12):  # a probe every 5 minutes for 25 hours, all answered
        trust.record_probe(node, t + i * 300, up=True, decode_tps=40.0)
    trust.clock = lambda: t + 25 * 3600
    trust.record_canary(node, "json", trust.clock(), ok=False, reason="content is not JSON")
    trust.record_canary(node, "tools", trust.clock(), ok=True)
    table = await trust.publish()
    entry = entry_for(table, node)
    assert entry.node_class == "pro" and entry.uptime_ppm == 1_000_000
    assert entry.failed_features == ("json",)
    assert entry.score_ppm == 500_000  # observed but never paid: the prior
    routing = TrustedRouting()
    routing.apply_table(table, 10.0)
    pid = peer_id_from_public_key(HONEST.public_key)
    assert routing.canaries.barred(pid, ["json"], 10.0) and not routing.canaries.barred(pid, ["tools"], 10.0)
    assert routing.relay_classes[pid] == "pro"
    # a node declaring "pro" that the relay never saw keeps its claim; one it measured gets the measured class
    from darkbloom.api.router import Candidate, RouteHints, rank

    cands = [Candidate(peer_id=pid, model="m", node_class="basic"), Candidate(peer_id="other", model="m", node_class="pro")]
    observed = routing.with_observed_classes(cands)
    assert [c.node_class for c in observed] == ["pro", "pro"]
    ranked, _ = rank(observed, {}, RouteHints(model="m", node_class="pro"), 0.0)
    assert {c.peer_id for c in ranked} == {pid, "other"}


async def test_a_large_table_comes_in_signed_pages_and_a_node_gets_its_own_entry(relay, monkeypatch):
    import darkbloom.relay.trust as relay_trust

    service, trust = relay
    monkeypatch.setattr(relay_trust, "PAGE_ENTRIES", 2)
    keys = sorted(seeded(120 + i).public_key.hex() for i in range(5))
    for k in keys:
        trust.record_probe(k, NOW, up=True)
    published = await trust.publish()
    assert [e.node for e in published.entries] == keys
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            client = connect(nursery, service)
            merged = await client.reputation()
            table, entry = await client.entry(keys[3])
            none_table, missing = await client.entry(seeded(99).public_key.hex())
            client.ledger_key = seeded(99).public_key.hex()
            with pytest.raises(InvalidSignature):
                await client.entry(keys[3])
            nursery.cancel_scope.cancel()
    assert [e.node for e in merged.entries] == keys and merged.signature == b""  # each page was checked
    assert (merged.epoch, merged.computed_ms) == (published.epoch, published.computed_ms)
    assert entry.node == keys[3] and [e.node for e in table.entries] == [keys[3]]
    verify_table(table, LEDGER_KEY)  # the one-entry table is signed by the relay
    assert none_table is not None and missing is None
