"""Reputation from settled epochs (darkbloom.ledger.reputation): consumers over volume, decay, spot-check penalties, signed table."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from darkbloom.errors import InvalidSignature
from darkbloom.identity import Identity
from darkbloom.ledger.reputation import ReputationPolicy, compute_reputation, reputation_table, sign_table, verify_table
from darkbloom.wire.codec import decode, encode
from darkbloom.wire.ledger import EpochSummary, NodeEpochStats, SettlementRow
from darkbloom.wire.trust import ReputationTable

Z = bytes(32)


def key(n: int) -> str:
    return Identity.from_seed(bytes([n]) * 32).public_key.hex()


NODE_A, NODE_B, NODE_C = key(10), key(11), key(12)
CONSUMERS = [key(20 + i) for i in range(30)]


def epoch(e: int, work: list[tuple[str, str, int, int]]) -> tuple[EpochSummary, list[SettlementRow]]:
    """work: (consumer, node, paid, completion tokens) settled in epoch e."""
    rows = [
        SettlementRow(epoch=e, index=i, lane="0" * 32, consumer=c, node=n, seq=1, cum_prompt_tokens=0,
                      cum_completion_tokens=t, cum_cost=p, paid=p, operator_amount=p, network_amount=0,
                      voucher_hash=Z, prev_hash=Z)
        for i, (c, n, p, t) in enumerate(work)
    ]
    per: dict[str, list] = {}
    for c, n, p, t in work:
        s = per.setdefault(n, [0, set(), 0])
        s[0] += t
        if p > 0:
            s[1].add(c)
        s[2] += p
    nodes = tuple(NodeEpochStats(node=n, prompt_tokens=0, completion_tokens=s[0], paying_consumers=len(s[1]), paid=s[2])
                  for n, s in sorted(per.items()))
    summary = EpochSummary(epoch=e, closed_ms=e * 600_000, row_count=len(rows), root=Z, head=Z, prev_summary=Z,
                           total_paid=sum(r.paid for r in rows), released=0, nodes=nodes)
    return summary, rows


def test_many_paying_consumers_beat_one_big_buyer() -> None:
    # A: 20 consumers x 10k tokens. B: one consumer buying 1M tokens. C: self-dealing only.
    work = [(c, NODE_A, 100, 10_000) for c in CONSUMERS[:20]]
    work += [(CONSUMERS[0], NODE_B, 10_000, 1_000_000)]
    work += [(NODE_C, NODE_C, 10_000, 1_000_000)]
    rep = compute_reputation([epoch(1, work)])
    assert rep[NODE_A].score_ppm > rep[NODE_B].score_ppm > rep[NODE_C].score_ppm
    assert rep[NODE_A].consumers == 20 and rep[NODE_B].consumers == 1 and rep[NODE_C].consumers == 0
    assert rep[NODE_C].score_ppm == 500_000  # self-dealing earns nothing above the prior


def test_unpaid_rows_count_for_nothing() -> None:
    rep = compute_reputation([epoch(1, [(c, NODE_A, 0, 5_000) for c in CONSUMERS[:10]])])
    assert rep[NODE_A].consumers == 0 and rep[NODE_A].score_ppm == 500_000


def test_old_work_fades_and_leaves_the_window() -> None:
    policy = ReputationPolicy(window_epochs=10, half_life_epochs=2.0)
    work = [(c, NODE_A, 100, 50_000) for c in CONSUMERS[:10]]
    fresh = compute_reputation([epoch(5, work)], policy=policy)[NODE_A].score_ppm
    older = compute_reputation([epoch(5, work), epoch(9, [])], policy=policy)[NODE_A].score_ppm
    gone = compute_reputation([epoch(5, work), epoch(20, [])], policy=policy)
    assert fresh > older > 500_000
    assert NODE_A not in gone  # no data inside the window: the shim falls back to the prior


def test_failed_spot_checks_cut_reputation() -> None:
    work = [(c, NODE_A, 100, 50_000) for c in CONSUMERS[:10]]
    clean = compute_reputation([epoch(3, work)])[NODE_A]
    one = compute_reputation([epoch(3, work)], {NODE_A: [3]})[NODE_A]
    two = compute_reputation([epoch(3, work)], {NODE_A: [3, 3]})[NODE_A]
    assert two.score_ppm < one.score_ppm < clean.score_ppm
    assert one.score_ppm == pytest.approx(clean.score_ppm / 2, abs=1)
    assert two.failed_checks == 2
    # a flagged node with no settled work at all ranks below a newcomer
    stranger = compute_reputation([epoch(3, [])], {NODE_B: [3]})[NODE_B]
    assert stranger.score_ppm == 250_000


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 29), st.integers(0, 2), st.integers(0, 1000), st.integers(0, 10**6)), max_size=40),
       st.lists(st.integers(1, 5), max_size=5))
def test_scores_are_bounded_and_monotone_in_failures(work, fails) -> None:
    nodes = [NODE_A, NODE_B, NODE_C]
    data = [epoch(5, [(CONSUMERS[c], nodes[n], p, t) for c, n, p, t in work])]
    base = compute_reputation(data)
    worse = compute_reputation(data, {NODE_A: fails})
    for entry in [*base.values(), *worse.values()]:
        assert 0 <= entry.score_ppm <= 1_000_000
    if NODE_A in base:
        assert worse[NODE_A].score_ppm <= base[NODE_A].score_ppm


def test_table_is_signed_round_trips_and_rejects_tampering() -> None:
    relay = Identity.from_seed(b"\x05" * 32)
    rep = compute_reputation([epoch(1, [(c, NODE_A, 100, 10_000) for c in CONSUMERS[:3]])], {NODE_B: [1]})
    table = sign_table(relay, reputation_table(rep, epoch=1, now_ms=123))
    wire = decode(encode(table), ReputationTable)
    verify_table(wire, relay.public_key.hex())
    bumped = dataclasses.replace(wire.entries[1], score_ppm=1_000_000)
    forged = dataclasses.replace(wire, entries=(wire.entries[0], bumped))
    with pytest.raises(InvalidSignature):
        verify_table(forged, relay.public_key.hex())
    with pytest.raises(InvalidSignature):
        verify_table(wire, Identity.from_seed(b"\x06" * 32).public_key.hex())
