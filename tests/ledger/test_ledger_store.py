"""The ledger store on SQLite and on a real PostgreSQL: lanes, submission, settlement, proofs, conservation."""

from __future__ import annotations

import dataclasses

import pytest

from darkbloom.errors import InsufficientFunds, InvalidSignature, LedgerError, UnknownLane, VoucherRejected
from darkbloom.ledger import merkle
from darkbloom.ledger.receipts import ZERO_HASH, row_hash, sign_voucher, summary_hash, verify
from darkbloom.wire.ledger import NETWORK_ACCOUNT

from .helpers import HOUR_MS, LEDGER, LEDGER_KEY, PPM, expected_cost, open_pair, open_request, seeded, top_up_request

ALICE, BOB, NODE_A, NODE_B, MALLORY = (seeded(i) for i in range(10, 15))
GRACE = 600_000


def hexkey(identity) -> str:
    return identity.public_key.hex()


def settle(store, now_ms=10_000):
    return store.settle(ledger=LEDGER, now_ms=now_ms, operator_ppm=PPM, grace_ms=GRACE)


def assert_conserved(store):
    totals = store.totals()
    assert totals.conserved, totals


def test_deposit_and_balance(store):
    assert store.balance(hexkey(ALICE)) == (0, 0)
    assert store.deposit(hexkey(ALICE), 5_000, now_ms=1) == 5_000
    assert store.deposit(hexkey(ALICE), 2_000, now_ms=2) == 7_000
    assert store.balance(hexkey(ALICE)) == (7_000, 0)
    with pytest.raises(LedgerError, match="positive"):
        store.deposit(hexkey(ALICE), 0, now_ms=3)
    with pytest.raises(LedgerError, match="not an account"):
        store.deposit("alice", 10, now_ms=3)
    assert [e.kind for e in store.history(hexkey(ALICE))] == ["deposit", "deposit"]
    assert_conserved(store)


def test_open_lane_reserves_and_is_idempotent(store):
    store.deposit(hexkey(ALICE), 10_000, now_ms=1)
    request = open_request(ALICE, NODE_A, 4_000)
    first = store.open_lane(request, ledger=LEDGER, now_ms=1000, ttl_ms=HOUR_MS)
    again = store.open_lane(request, ledger=LEDGER, now_ms=2000, ttl_ms=HOUR_MS)
    assert first == again
    verify(first, LEDGER_KEY)
    assert (first.cap, first.consumer, first.node) == (4_000, hexkey(ALICE), hexkey(NODE_A))
    assert store.balance(hexkey(ALICE)) == (6_000, 4_000)
    assert_conserved(store)


def test_balance_never_goes_negative(store):
    store.deposit(hexkey(ALICE), 1_000, now_ms=1)
    with pytest.raises(InsufficientFunds) as info:
        store.open_lane(open_request(ALICE, NODE_A, 1_001), ledger=LEDGER, now_ms=1000, ttl_ms=HOUR_MS)
    assert (info.value.needed, info.value.available) == (1_001, 1_000)
    pair = open_pair(store, ALICE, NODE_A, 600)
    with pytest.raises(InsufficientFunds):
        store.top_up(top_up_request(ALICE, pair.reservation.lane, 1_001), ledger=LEDGER, now_ms=2000, ttl_ms=HOUR_MS)
    assert store.balance(hexkey(ALICE)) == (400, 600)
    assert_conserved(store)


def test_forged_requests_are_refused(store):
    store.deposit(hexkey(ALICE), 10_000, now_ms=1)
    forged = dataclasses.replace(open_request(MALLORY, NODE_A, 5_000), consumer=hexkey(ALICE))
    with pytest.raises(InvalidSignature):
        store.open_lane(forged, ledger=LEDGER, now_ms=1000, ttl_ms=HOUR_MS)
    pair = open_pair(store, ALICE, NODE_A, 1_000)
    with pytest.raises(InvalidSignature):
        store.top_up(top_up_request(MALLORY, pair.reservation.lane, 9_000), ledger=LEDGER, now_ms=2000, ttl_ms=HOUR_MS)
    with pytest.raises(UnknownLane):
        store.top_up(top_up_request(ALICE, "00" * 16, 9_000), ledger=LEDGER, now_ms=2000, ttl_ms=HOUR_MS)
    assert store.balance(hexkey(ALICE)) == (9_000, 1_000)


def test_top_up_is_absolute_so_a_replay_is_a_no_op(store):
    store.deposit(hexkey(ALICE), 10_000, now_ms=1)
    pair = open_pair(store, ALICE, NODE_A, 1_000)
    request = top_up_request(ALICE, pair.reservation.lane, 3_000)
    raised = store.top_up(request, ledger=LEDGER, now_ms=2000, ttl_ms=HOUR_MS)
    assert raised.cap == 3_000 and raised.expires_ms == 2000 + HOUR_MS
    verify(raised, LEDGER_KEY)
    assert store.top_up(request, ledger=LEDGER, now_ms=3000, ttl_ms=HOUR_MS) == raised
    assert store.balance(hexkey(ALICE)) == (7_000, 3_000)
    assert_conserved(store)


def test_submit_settle_pay_and_prove(store):
    store.deposit(hexkey(ALICE), 10_000_000, now_ms=1)
    store.deposit(hexkey(BOB), 10_000_000, now_ms=1)
    a = open_pair(store, ALICE, NODE_A, 1_000_000)
    b = open_pair(store, BOB, NODE_A, 1_000_000)
    c = open_pair(store, ALICE, NODE_B, 1_000_000)
    vouchers = [a.use(prompt=1000, completion=2000), b.use(prompt=500), c.use(completion=10)]
    results = store.submit(hexkey(NODE_A), vouchers[:2]) + store.submit(hexkey(NODE_B), vouchers[2:])
    assert [r.status for r in results] == ["queued"] * 3
    assert store.pending_count() == 3
    out = settle(store)
    assert store.pending_count() == 0
    paid = {r.lane: r.paid for r in out.rows}
    assert paid == {v.lane: v.cum_cost for v in vouchers}
    total = sum(paid.values())
    node_a_share = sum(r.operator_amount for r in out.rows if r.node == hexkey(NODE_A))
    assert store.balance(hexkey(NODE_A)) == (node_a_share, 0)
    assert store.balance(NETWORK_ACCOUNT)[0] == sum(r.network_amount for r in out.rows)
    assert store.balance(hexkey(ALICE))[1] == 2_000_000 - paid[a.reservation.lane] - paid[c.reservation.lane]
    assert out.summary.total_paid == total
    stats = {s.node: s for s in out.summary.nodes}
    assert stats[hexkey(NODE_A)].paying_consumers == 2
    assert stats[hexkey(NODE_A)].prompt_tokens == 1500 and stats[hexkey(NODE_B)].completion_tokens == 10
    assert_conserved(store)
    # every row's proof checks out against the signed root; the chain links the rows
    summary = store.summary(1)
    assert summary == store.summary() == out.summary
    verify(summary, LEDGER_KEY)
    prev = ZERO_HASH
    for row in store.rows(1):
        assert row.prev_hash == prev
        prev = row_hash(row)
        proved, path, proof_summary = store.proof(1, row.index)
        assert proved == row and proof_summary == dataclasses.replace(summary, nodes=())  # stats stay out of proofs
        verify(proof_summary, LEDGER_KEY)
        assert merkle.verify_inclusion(row_hash(row), path, summary.root)
    assert summary.head == prev
    # the next epoch continues the chains
    more = a.use(completion=10)
    store.submit(hexkey(NODE_A), [more])
    second = settle(store, now_ms=20_000)
    assert second.rows[0].prev_hash == summary.head
    assert second.summary.prev_summary == summary_hash(summary)
    assert second.rows[0].paid == expected_cost(1000, 2010) - expected_cost(1000, 2000)


def test_replays_old_vouchers_and_foreign_lanes_are_refused_with_reasons(store):
    store.deposit(hexkey(ALICE), 10_000_000, now_ms=1)
    a = open_pair(store, ALICE, NODE_A, 1_000_000)
    v1 = a.use(prompt=100)
    v2 = a.use(completion=100)
    assert store.submit(hexkey(NODE_A), [v2])[0].status == "queued"
    # an older voucher than the one queued, and the same one again
    r_old, r_same = store.submit(hexkey(NODE_A), [v1, v2])
    assert (r_old.status, r_old.code) == ("rejected", "ReceiptReplay")
    assert r_same.status == "duplicate"
    # another node submitting NODE_A's lane
    r_foreign = store.submit(hexkey(NODE_B), [v2])[0]
    assert (r_foreign.status, r_foreign.code) == ("rejected", "VoucherRejected") and "another node" in r_foreign.reason
    # unknown lane
    ghost = dataclasses.replace(v2, lane="ee" * 16)
    assert store.submit(hexkey(NODE_A), [ghost])[0].code == "UnknownLane"
    before = store.balance(hexkey(NODE_A))
    settle(store)
    after_first = store.balance(hexkey(NODE_A))
    # after settlement: same voucher is a no-op, an older one is refused
    assert store.submit(hexkey(NODE_A), [v2])[0].status == "duplicate"
    assert store.submit(hexkey(NODE_A), [v1])[0].code == "ReceiptReplay"
    settle(store, now_ms=20_000)
    assert store.balance(hexkey(NODE_A)) == after_first != before
    assert_conserved(store)


def test_settlement_refuses_forged_signatures_and_records_why(store):
    store.deposit(hexkey(ALICE), 10_000_000, now_ms=1)
    a = open_pair(store, ALICE, NODE_A, 1_000_000)
    b = open_pair(store, ALICE, NODE_A, 1_000_000)
    va = a.use(prompt=100)
    vb = b.use(prompt=100)
    forged_node = dataclasses.replace(va, node_sig=sign_voucher(MALLORY, va, "node").node_sig)
    forged_consumer = dataclasses.replace(vb, consumer_sig=sign_voucher(MALLORY, vb, "consumer").consumer_sig)
    store.submit(hexkey(NODE_A), [forged_node, forged_consumer])
    out = settle(store)
    assert out.rows == [] and sorted(r.code for r in out.rejected) == ["InvalidSignature", "InvalidSignature"]
    assert {r[2] for r in store.rejections(1)} == {"InvalidSignature"}
    assert store.balance(hexkey(NODE_A)) == (0, 0)
    assert_conserved(store)
    # the genuine voucher still settles later
    store.submit(hexkey(NODE_A), [va])
    assert settle(store, now_ms=20_000).rows[0].paid == va.cum_cost


def test_decreasing_totals_are_refused_by_the_ledger(store):
    store.deposit(hexkey(ALICE), 10_000_000, now_ms=1)
    a = open_pair(store, ALICE, NODE_A, 1_000_000)
    v = a.use(prompt=100, completion=100)
    store.submit(hexkey(NODE_A), [v])
    settle(store)
    lower = dataclasses.replace(v, seq=v.seq + 1, cum_prompt_tokens=50, cum_cost=expected_cost(50, 100), consumer_sig=b"", node_sig=b"")
    lower = sign_voucher(NODE_A, sign_voucher(ALICE, lower, "consumer"), "node")
    result = store.submit(hexkey(NODE_A), [lower])[0]
    assert result.code == "VoucherRejected" and "decreased" in result.reason


def test_expiry_releases_the_unused_reserve_and_closes_the_lane(store):
    store.deposit(hexkey(ALICE), 10_000, now_ms=1)
    a = open_pair(store, ALICE, NODE_A, 4_000, now_ms=1000, ttl_ms=5_000)
    v = a.use(completion=5000)  # costs 2000
    store.submit(hexkey(NODE_A), [v])
    out = settle(store, now_ms=1000 + 5_000 + GRACE)
    assert out.summary.released == 2_000
    assert store.balance(hexkey(ALICE)) == (8_000, 0)
    assert not store.lane(a.reservation.lane).open
    late = a.use(completion=1)
    assert store.submit(hexkey(NODE_A), [late])[0].reason.endswith("expired and closed")
    with pytest.raises(VoucherRejected):
        store.top_up(top_up_request(ALICE, a.reservation.lane, 9_000), ledger=LEDGER, now_ms=10**9, ttl_ms=HOUR_MS)
    assert_conserved(store)


def test_a_lane_to_oneself_is_refused(store):
    store.deposit(hexkey(ALICE), 10_000, now_ms=1)
    with pytest.raises(LedgerError, match="itself"):
        store.open_lane(open_request(ALICE, ALICE, 10), ledger=LEDGER, now_ms=1, ttl_ms=HOUR_MS)
    assert store.balance(hexkey(ALICE)) == (10_000, 0)


def test_postgres_connection_problems_are_typed_errors(pg_url):
    from darkbloom.errors import ConfigError
    from darkbloom.ledger.pgstore import PostgresStore

    import psycopg

    with pytest.raises(ConfigError, match="cannot connect"):
        PostgresStore(pg_url.rsplit("/", 1)[0] + "/no_such_database")
    store = PostgresStore(pg_url)
    with psycopg.connect(pg_url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (pg_url.rsplit("/", 1)[1],))
    with pytest.raises(LedgerError, match="unavailable"):
        store.deposit(hexkey(ALICE), 10, now_ms=1)
    store.close()


def test_close_lane_shortens_the_expiry_only_for_its_consumer_and_releases_after_grace(store):
    from darkbloom.ledger.receipts import sign
    from darkbloom.wire.ledger import CloseLane

    store.deposit(hexkey(ALICE), 10_000, now_ms=1)
    a = open_pair(store, ALICE, NODE_A, 4_000, now_ms=1000, ttl_ms=24 * HOUR_MS)
    v = a.use(completion=5000)  # costs 2000
    lane = a.reservation.lane
    with pytest.raises(InvalidSignature):
        store.close_lane(sign(MALLORY, CloseLane(lane=lane, time_ms=2000)), ledger=LEDGER, now_ms=2000, keep_ms=GRACE)
    with pytest.raises(UnknownLane):
        store.close_lane(sign(ALICE, CloseLane(lane="00" * 16, time_ms=2000)), ledger=LEDGER, now_ms=2000, keep_ms=GRACE)
    closed = store.close_lane(sign(ALICE, CloseLane(lane=lane, time_ms=2000)), ledger=LEDGER, now_ms=2000, keep_ms=GRACE)
    verify(closed, LEDGER_KEY)
    assert closed.expires_ms == 2000 + GRACE and store.lane(lane).expires_ms == closed.expires_ms
    again = store.close_lane(sign(ALICE, CloseLane(lane=lane, time_ms=9000)), ledger=LEDGER, now_ms=9000, keep_ms=GRACE)
    assert again.expires_ms == closed.expires_ms  # never lengthened
    store.submit(hexkey(NODE_A), [v])
    out = settle(store, now_ms=2000 + GRACE + 1)  # expired, within the grace: the voucher settles, nothing released
    assert [r.paid for r in out.rows] == [2_000] and out.summary.released == 0
    out = settle(store, now_ms=2000 + 2 * GRACE)
    assert out.summary.released == 2_000
    assert store.balance(hexkey(ALICE)) == (8_000, 0)
    assert_conserved(store)
