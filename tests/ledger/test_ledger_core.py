"""Pure ledger core: prices, splits, signatures, Merkle proofs, both lane ends, epoch settlement."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from darkbloom.errors import InsufficientFunds, InvalidSignature, MalformedMessage, ReceiptReplay, VoucherRejected
from darkbloom.ledger import merkle
from darkbloom.ledger.lanes import ConsumerLane, NodeLane
from darkbloom.ledger.receipts import (
    ZERO_HASH,
    cost_of,
    decode_strict,
    row_hash,
    sign,
    sign_voucher,
    verify,
    verify_voucher,
)
from darkbloom.ledger.settlement import LaneState, settle_epoch, share_ppm, split
from darkbloom.wire.codec import encode
from darkbloom.wire.ledger import NETWORK_ACCOUNT, LaneReservation, Voucher

from .helpers import LEDGER, LEDGER_KEY, PPM, PRICE_IN, PRICE_OUT, Pair, make_reservation, seeded

CONSUMER, NODE, OTHER = seeded(2), seeded(3), seeded(4)


def pair(cap: int = 1_000_000) -> Pair:
    return Pair(CONSUMER, NODE, make_reservation(CONSUMER, NODE, cap))


# --- prices and splits -----------------------------------------------------------


def test_cost_rounds_up_to_a_whole_micro_credit():
    assert cost_of(0, 0, PRICE_IN, PRICE_OUT) == 0
    assert cost_of(1, 0, PRICE_IN, PRICE_OUT) == 1  # 0.1 micro-credit rounds up
    assert cost_of(10, 0, PRICE_IN, PRICE_OUT) == 1
    assert cost_of(11, 0, PRICE_IN, PRICE_OUT) == 2
    assert cost_of(1_000_000, 1_000_000, PRICE_IN, PRICE_OUT) == PRICE_IN + PRICE_OUT


@given(st.integers(0, 10**15), st.floats(0.0, 1.0))
def test_split_adds_up_exactly(amount, share):
    operator, network = split(amount, share_ppm(share))
    assert operator + network == amount
    assert 0 <= operator <= amount


def test_share_outside_0_1_is_refused():
    with pytest.raises(ValueError):
        share_ppm(1.5)


# --- signatures and encodings ----------------------------------------------------


def test_voucher_signatures_are_role_and_type_separated():
    p = pair()
    v = p.use(prompt=100)
    verify_voucher(v, CONSUMER.public_key.hex(), NODE.public_key.hex())
    swapped = dataclasses.replace(v, consumer_sig=v.node_sig, node_sig=v.consumer_sig)
    # the node's signature is not a consumer signature even when the keys are swapped too
    with pytest.raises(InvalidSignature):
        verify_voucher(swapped, NODE.public_key.hex(), CONSUMER.public_key.hex())
    # a reservation signature does not verify as anything else
    fake = dataclasses.replace(v, consumer_sig=p.reservation.signature)
    with pytest.raises(InvalidSignature):
        verify_voucher(fake, LEDGER_KEY, None)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_flipped_bit_in_a_voucher_is_refused(data):
    p = pair()
    v = p.use(prompt=123, completion=45)
    blob = bytearray(encode(v))
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises((MalformedMessage, InvalidSignature)):
        tampered = decode_strict(bytes(blob), Voucher)
        verify_voucher(tampered, CONSUMER.public_key.hex(), NODE.public_key.hex())


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_flipped_bit_in_a_reservation_is_refused(data):
    blob = bytearray(encode(make_reservation(CONSUMER, NODE, 5000)))
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises((MalformedMessage, InvalidSignature)):
        verify(decode_strict(bytes(blob), LaneReservation), LEDGER_KEY)


def test_non_canonical_encoding_is_refused():
    import msgpack

    v = pair().use(prompt=5)
    data = msgpack.unpackb(encode(v))
    reordered = msgpack.packb(dict(reversed(list(data.items()))), use_bin_type=True)
    with pytest.raises(MalformedMessage, match="canonical"):
        decode_strict(reordered, Voucher)


# --- Merkle ----------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 8, 9, 16, 33])
def test_every_row_has_a_valid_inclusion_proof(count):
    hashes = [bytes([i]) * 32 for i in range(count)]
    root = merkle.merkle_root(hashes)
    for i in range(count):
        path = merkle.inclusion_proof(hashes, i)
        assert merkle.verify_inclusion(hashes[i], path, root)
        assert not merkle.verify_inclusion(b"\xff" * 32, path, root)
        if path:
            bad = (dataclasses.replace(path[0], left=not path[0].left),) + path[1:]
            if path[0].sibling != merkle._leaf(hashes[i]):
                assert not merkle.verify_inclusion(hashes[i], bad, root)


def test_empty_epoch_root_is_zero():
    assert merkle.merkle_root([]) == ZERO_HASH
    with pytest.raises(IndexError):
        merkle.inclusion_proof([], 0)


# --- the node's checks -----------------------------------------------------------


def test_forged_consumer_signature_is_refused_by_the_node():
    p = pair()
    p.n.served(prompt_tokens=10)
    p.c.add_usage(prompt_tokens=10)
    forged = sign_voucher(OTHER, p.c.next_voucher(now_ms=2000), "consumer")
    with pytest.raises(InvalidSignature):
        p.n.accept(forged, now_ms=2000)


def test_forged_node_countersignature_is_refused_by_the_consumer():
    p = pair()
    p.n.served(prompt_tokens=10)
    p.c.add_usage(prompt_tokens=10)
    v = p.c.next_voucher(now_ms=2000)
    with pytest.raises(InvalidSignature):
        p.c.countersigned(sign_voucher(OTHER, v, "node"))


def test_voucher_for_another_lane_is_refused():
    p = pair()
    other = Pair(CONSUMER, NODE, make_reservation(CONSUMER, NODE, 1000, lane="cd" * 16))
    other.n.served(prompt_tokens=10)
    other.c.add_usage(prompt_tokens=10)
    with pytest.raises(VoucherRejected, match="another lane"):
        p.n.accept(other.c.next_voucher(now_ms=2000), now_ms=2000)


def test_replay_and_out_of_order_seq_are_refused():
    p = pair()
    first = p.use(prompt=10)
    p.use(completion=10)
    with pytest.raises(ReceiptReplay):
        p.n.accept(first, now_ms=2000)
    stale = dataclasses.replace(first, consumer_sig=b"", node_sig=b"")
    with pytest.raises(ReceiptReplay):
        p.n.accept(sign_voucher(CONSUMER, stale, "consumer"), now_ms=2000)


def test_decreasing_totals_are_refused():
    p = pair()
    v = p.use(prompt=100, completion=50)
    lower = dataclasses.replace(
        v, seq=v.seq + 1, cum_completion_tokens=10, cum_cost=cost_of(100, 10, PRICE_IN, PRICE_OUT), consumer_sig=b"", node_sig=b""
    )
    with pytest.raises(VoucherRejected, match="cum_completion_tokens decreased"):
        p.n.accept(sign_voucher(CONSUMER, lower, "consumer"), now_ms=2000)


def test_cost_not_matching_the_price_is_refused():
    p = pair()
    p.n.served(prompt_tokens=1000)
    p.c.add_usage(prompt_tokens=1000)
    v = dataclasses.replace(p.c.next_voucher(now_ms=2000), consumer_sig=b"")
    cheap = sign_voucher(CONSUMER, dataclasses.replace(v, cum_cost=v.cum_cost - 1), "consumer")
    with pytest.raises(VoucherRejected, match="does not match"):
        p.n.accept(cheap, now_ms=2000)


def test_spending_beyond_the_reservation_is_refused_on_both_sides():
    p = pair(cap=100)
    p.c.add_usage(completion_tokens=1000)  # costs 400 > 100
    with pytest.raises(InsufficientFunds) as info:
        p.c.next_voucher(now_ms=2000)
    assert info.value.needed == 400 and info.value.available == 100
    forced = Voucher(
        lane=p.reservation.lane, seq=1, cum_prompt_tokens=0, cum_completion_tokens=1000, cum_cost=400,
        chain=p.n.chain, model_digest="digest-1", time_ms=2000,
    )
    with pytest.raises(InsufficientFunds):
        p.n.accept(sign_voucher(CONSUMER, forced, "consumer"), now_ms=2000)


def test_request_chain_and_model_digest_must_match_what_was_served():
    p = pair()
    p.c.begin_request(b"request-that-never-reached-the-node", "digest-1")
    p.c.add_usage(prompt_tokens=5)
    with pytest.raises(VoucherRejected, match="chain"):
        p.n.accept(p.c.next_voucher(now_ms=2000), now_ms=2000)
    q = pair()
    q.c.begin_request(b"r2", "other-digest")
    q.n.begin_request(b"r2", "digest-2")
    q.c.add_usage(prompt_tokens=5)
    with pytest.raises(VoucherRejected, match="digest"):
        q.n.accept(q.c.next_voucher(now_ms=2000), now_ms=2000)


def test_reservation_checks_signer_node_and_expiry():
    forged = make_reservation(CONSUMER, NODE, 1000, signer=OTHER)
    with pytest.raises(InvalidSignature):
        NodeLane.open(NODE, forged, ledger_key=LEDGER_KEY, now_ms=1000, voucher_every_tokens=32)
    good = make_reservation(CONSUMER, NODE, 1000)
    with pytest.raises(VoucherRejected, match="another node"):
        NodeLane.open(OTHER, good, ledger_key=LEDGER_KEY, now_ms=1000, voucher_every_tokens=32)
    with pytest.raises(VoucherRejected, match="expired"):
        NodeLane.open(NODE, good, ledger_key=LEDGER_KEY, now_ms=good.expires_ms + 1, voucher_every_tokens=32)
    with pytest.raises(VoucherRejected, match="another consumer"):
        ConsumerLane(OTHER, good, voucher_every_tokens=32)


def test_node_pauses_then_ends_a_stream_whose_vouchers_lag():
    p = pair()
    p.n.served(prompt_tokens=10, completion_tokens=54)
    assert p.n.gate(5000) == "serve"  # 64 unvouched: one interval in flight is allowed
    p.n.served(completion_tokens=1)
    assert p.n.lag_tokens == 65
    assert p.n.gate(5000) == "pause"
    assert p.n.gate(5000 + 10_000) == "pause"
    assert p.n.gate(5000 + 10_001) == "end"
    p.c.add_usage(prompt_tokens=10, completion_tokens=55)
    assert p.c.due()
    p.c.countersigned(p.n.accept(p.c.next_voucher(now_ms=6000), now_ms=6000))
    assert p.n.lag_tokens == 0
    assert p.n.gate(20_000) == "serve"
    assert not p.c.due()


def test_top_up_raises_the_cap_the_node_accepts():
    p = pair(cap=100)
    bigger = make_reservation(CONSUMER, NODE, 10_000)
    p.n.update_reservation(bigger, now_ms=2000)
    p.c.update_reservation(bigger, LEDGER_KEY, now_ms=2000)
    v = p.use(completion=1000)
    assert v.cum_cost == 400
    with pytest.raises(InvalidSignature):
        p.n.update_reservation(make_reservation(CONSUMER, NODE, 10**9, signer=OTHER), now_ms=2000)


# --- epoch settlement (pure) -----------------------------------------------------


def _state(res: LaneReservation) -> LaneState:
    return LaneState(
        lane=res.lane, consumer=res.consumer, node=res.node, cap=res.cap, price_input_per_m=res.price_input_per_m,
        price_output_per_m=res.price_output_per_m, opened_ms=res.opened_ms, expires_ms=res.expires_ms,
    )


def _settle(lanes, blobs, *, epoch=1, now_ms=5000, prev=ZERO_HASH):
    return settle_epoch(
        epoch=epoch, now_ms=now_ms, pending=blobs, lanes=lanes, prev_row_hash=prev, prev_summary_hash=ZERO_HASH,
        operator_ppm=PPM, grace_ms=600_000, ledger=LEDGER,
    )


def test_settle_epoch_pays_deltas_refuses_forgeries_and_signs_the_root():
    good, forged_pair = pair(), Pair(CONSUMER, NODE, make_reservation(CONSUMER, NODE, 1000, lane="cd" * 16))
    v = good.use(prompt=1000, completion=1000)
    f = forged_pair.use(prompt=10)
    f = dataclasses.replace(f, node_sig=sign_voucher(OTHER, f, "node").node_sig)
    lanes = {s.lane: s for s in (_state(good.reservation), _state(forged_pair.reservation))}
    out = _settle(lanes, [encode(v), encode(f), b"\x93garbage"])
    assert [r.lane for r in out.rows] == [v.lane]
    assert sorted(r.code for r in out.rejected) == ["InvalidSignature", "MalformedMessage"]
    row = out.rows[0]
    assert row.paid == v.cum_cost == 500 and row.operator_amount + row.network_amount == 500
    assert out.deltas[CONSUMER.public_key.hex()] == [0, -500]
    assert out.deltas[NODE.public_key.hex()] == [475, 0]
    assert out.deltas[NETWORK_ACCOUNT] == [25, 0]
    verify(out.summary, LEDGER_KEY)
    assert out.summary.root == merkle.merkle_root([row_hash(row)])
    assert out.summary.nodes[0].paying_consumers == 1 and out.summary.nodes[0].completion_tokens == 1000
    # the same voucher again is a no-op
    again = _settle(out.lanes, [encode(v)], epoch=2, prev=out.summary.head)
    assert again.rows == [] and again.rejected == [] and again.deltas == {}


def test_settlement_pays_only_up_to_the_reservation():
    p = pair(cap=1000)
    p.reservation = make_reservation(CONSUMER, NODE, 10**9)  # node trusted a larger (forged) cap
    p.n.update_reservation(p.reservation, now_ms=2000)
    p.c.update_reservation(p.reservation, LEDGER_KEY, now_ms=2000)
    v = p.use(completion=100_000)  # costs 40_000
    lane = _state(make_reservation(CONSUMER, NODE, 1000))  # the ledger only reserved 1000
    out = _settle({lane.lane: lane}, [encode(v)])
    assert out.rows[0].paid == 1000
    assert out.lanes[lane.lane].paid == 1000 and out.lanes[lane.lane].cost == 40_000


def test_expired_lanes_release_their_unused_reserve():
    res = make_reservation(CONSUMER, NODE, 1000)
    state = dataclasses.replace(_state(res), paid=300)
    out = _settle({state.lane: state}, [], now_ms=res.expires_ms + 600_000)
    assert out.summary.released == 700
    assert out.deltas[CONSUMER.public_key.hex()] == [700, -700]
    assert not out.lanes[state.lane].open


@settings(max_examples=60, deadline=None)
@given(
    plan=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 300), st.integers(0, 300), st.booleans()), min_size=1, max_size=25
    ),
    caps=st.tuples(st.integers(1, 200), st.integers(1, 200), st.integers(1, 200)),
)
def test_settlement_conserves_credits_and_never_pays_twice(plan, caps):
    """Random usage on three lanes, settled at random points: totals conserved, paid == min(cost, cap)."""
    pairs = [Pair(CONSUMER, NODE, make_reservation(CONSUMER, NODE, caps[i], lane=f"{i:02x}" * 16)) for i in range(3)]
    for p in pairs:  # let the node and consumer accept any usage; the ledger enforces the cap
        big = dataclasses.replace(p.reservation, cap=10**12, signature=b"")
        p.n.reservation = p.c.reservation = sign(LEDGER, big)
    lanes = {p.reservation.lane: _state(make_reservation(CONSUMER, NODE, caps[i], lane=p.reservation.lane)) for i, p in enumerate(pairs)}
    reserved = sum(caps)
    balances = {CONSUMER.public_key.hex(): [0, reserved]}
    pending, epoch, prev, seen = {}, 1, ZERO_HASH, []
    for which, prompt, completion, close_epoch in plan:
        v = pairs[which].use(prompt=prompt, completion=completion)
        pending[v.lane] = encode(v)
        seen.append(encode(v))
        if close_epoch:
            # resubmitting an already-settled older voucher changes nothing
            blobs = list(pending.values()) + seen[:1]
            out = _settle(lanes, blobs, epoch=epoch, prev=prev)
            for account, (db, dr) in out.deltas.items():
                entry = balances.setdefault(account, [0, 0])
                entry[0] += db
                entry[1] += dr
            lanes.update(out.lanes)
            pending, epoch, prev = {}, epoch + 1, out.summary.head
            assert sum(b + r for b, r in balances.values()) == reserved
            assert all(b >= 0 and r >= 0 for b, r in balances.values())
    for i, p in enumerate(pairs):
        state = lanes[p.reservation.lane]
        assert state.paid == min(state.cost, caps[i])
        assert state.paid <= state.cap
    assert sum(b + r for b, r in balances.values()) == reserved


def test_fast_encodings_equal_the_codecs():
    from darkbloom.wire.codec import canonical_bytes
    from darkbloom.wire.ledger import SettlementRow, encode_flat, signed_body

    v = pair().use(prompt=7, completion=9)
    row = SettlementRow(
        epoch=1, index=0, lane=v.lane, consumer="a" * 64, node="b" * 64, seq=1, cum_prompt_tokens=7, cum_completion_tokens=9,
        cum_cost=5, paid=5, operator_amount=4, network_amount=1, voucher_hash=b"\x01" * 32, prev_hash=ZERO_HASH,
    )
    for msg in (v, row, make_reservation(CONSUMER, NODE, 9)):
        assert encode_flat(msg) == encode(msg)
        assert signed_body(msg) == canonical_bytes(msg, exclude=("signature", "consumer_sig", "node_sig"))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_settlement_refuses_any_flipped_bit_in_a_pending_voucher(data):
    """The fast path that loads pending vouchers is as strict as the codec: a flipped bit never pays."""
    p = pair()
    v = p.use(prompt=50, completion=50)
    blob = bytearray(encode(v))
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    lane = _state(p.reservation)
    out = _settle({lane.lane: lane}, [bytes(blob)])
    assert out.rows == [] and len(out.rejected) == 1


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_flipped_bit_in_an_exported_proof_is_refused(data):
    from darkbloom.wire.ledger import ProofReply

    pairs = [Pair(CONSUMER, NODE, make_reservation(CONSUMER, NODE, 10**6, lane=f"{i:02x}" * 16)) for i in range(5)]
    vouchers = [p.use(prompt=10 * (i + 1)) for i, p in enumerate(pairs)]
    lanes = {p.reservation.lane: _state(p.reservation) for p in pairs}
    out = _settle(lanes, [encode(v) for v in vouchers])
    index = data.draw(st.integers(0, len(out.rows) - 1))
    proof = ProofReply(row=out.rows[index], path=merkle.inclusion_proof(out.row_hashes, index), summary=out.summary)
    merkle.check_proof(proof, LEDGER_KEY)
    blob = bytearray(encode(proof))
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises((MalformedMessage, InvalidSignature)):
        merkle.check_proof(decode_strict(bytes(blob), ProofReply), LEDGER_KEY)


def test_node_stats_are_covered_by_the_signature_but_not_needed_in_proofs():
    from darkbloom.ledger.receipts import summary_hash

    p = pair()
    v = p.use(prompt=100, completion=100)
    lane = _state(p.reservation)
    summary = _settle({lane.lane: lane}, [encode(v)]).summary
    verify(summary, LEDGER_KEY)
    inflated = dataclasses.replace(summary, nodes=(dataclasses.replace(summary.nodes[0], paying_consumers=99),))
    with pytest.raises(InvalidSignature, match="node stats"):
        verify(inflated, LEDGER_KEY)
    stripped = dataclasses.replace(summary, nodes=())
    verify(stripped, LEDGER_KEY)
    assert summary_hash(stripped) == summary_hash(summary)
    with pytest.raises(InvalidSignature):
        verify(dataclasses.replace(stripped, stats_hash=bytes(32)), LEDGER_KEY)
