"""Settlement decisions: check a voucher against its lane, settle an epoch, split payments (pure).

Money model (all integers, micro-credits). An account has `balance` (spendable) and
`reserved` (held by its open lanes). Opening or topping up a lane moves credits from
balance to reserved; settling a voucher moves the delta from the consumer's reserve to the
node (operator share, rounded down) and the network account (the rest, so the two parts
always add up to the delta); expiry moves the unused reserve back to balance. Nothing else
changes a total, so sum(balance + reserved) over all accounts equals the sum of deposits.

The store loads state, calls these functions, and writes what they return in one
transaction.
"""

from __future__ import annotations

import hashlib
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgpack

from darkbloom.errors import LedgerError, MalformedMessage, ReceiptReplay, UnknownLane, VoucherRejected
from darkbloom.identity import Identity
from darkbloom.ledger import merkle
from darkbloom.ledger.receipts import ZERO_HASH, cost_of, decode_strict, row_hash, sign, stats_hash, verify_voucher, voucher_hash
from darkbloom.wire.ledger import (
    NETWORK_ACCOUNT,
    EpochSummary,
    NodeEpochStats,
    SettlementRow,
    Voucher,
    body_and_encoding,
    encode_flat,
)

__all__ = [
    "DUPLICATE",
    "QUEUED",
    "EpochOutcome",
    "LaneState",
    "Rejection",
    "check_voucher",
    "settle_epoch",
    "share_ppm",
    "split",
]

_ROW_PREFIX = SettlementRow.DOMAIN + b"\x00"  # type: ignore[attr-defined]  # signed_bytes(row) = this + body
QUEUED = "queued"
DUPLICATE = "duplicate"
PPM = 1_000_000


@dataclass(slots=True, kw_only=True)
class LaneState:
    """A lane as the ledger keeps it. `paid` never exceeds `cap`."""

    lane: str
    consumer: str
    node: str
    cap: int
    price_input_per_m: int
    price_output_per_m: int
    opened_ms: int
    expires_ms: int
    open: bool = True
    paid: int = 0  # moved out of the reserve so far
    seq: int = 0  # highest settled seq (0: none)
    prompt_tokens: int = 0  # cumulative totals of the settled voucher
    completion_tokens: int = 0
    cost: int = 0  # cum_cost of the settled voucher (may exceed cap; the excess is never paid)
    voucher_hash: bytes = ZERO_HASH

    def clone(self) -> LaneState:
        return LaneState(
            lane=self.lane, consumer=self.consumer, node=self.node, cap=self.cap,
            price_input_per_m=self.price_input_per_m, price_output_per_m=self.price_output_per_m,
            opened_ms=self.opened_ms, expires_ms=self.expires_ms, open=self.open, paid=self.paid, seq=self.seq,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens, cost=self.cost,
            voucher_hash=self.voucher_hash,
        )


@dataclass(frozen=True, slots=True)
class Rejection:
    lane: str
    seq: int
    code: str  # error class name
    reason: str


@dataclass(slots=True, kw_only=True)
class EpochOutcome:
    """What settling one epoch changes; the store writes all of it in one transaction."""

    summary: EpochSummary
    rows: list[SettlementRow] = field(default_factory=list)
    row_hashes: list[bytes] = field(default_factory=list)
    row_data: list[bytes] = field(default_factory=list)  # encode_flat of each row
    lanes: dict[str, LaneState] = field(default_factory=dict)  # lanes that changed, new state
    deltas: dict[str, list[int]] = field(default_factory=dict)  # account -> [d_balance, d_reserved]
    rejected: list[Rejection] = field(default_factory=list)


def share_ppm(operator_share: float) -> int:
    """The operator share as parts per million (0.95 -> 950000)."""
    if not 0.0 <= operator_share <= 1.0:
        raise ValueError("operator_share must be within 0..1")
    return round(operator_share * PPM)


def split(amount: int, operator_ppm: int) -> tuple[int, int]:
    """(operator, network): operator rounded down, network gets the remainder; they sum to `amount`."""
    operator = amount * operator_ppm // PPM
    return operator, amount - operator


def check_voucher(voucher: Voucher, lane: LaneState | None, *, node: str | None = None, signatures: bool = True) -> str:
    """Decide whether `voucher` may settle on `lane`: QUEUED (new), DUPLICATE (already settled), or raise.

    Raises UnknownLane, VoucherRejected (wrong node, closed lane, decreasing totals, wrong
    cost, conflicting voucher), ReceiptReplay (older than what is settled) or
    InvalidSignature. `node`, when given, is the submitter, who must be the lane's node.
    """
    if lane is None:
        raise UnknownLane(voucher.lane)
    if node is not None and lane.node != node:
        raise VoucherRejected(voucher.lane, "the lane belongs to another node")
    if voucher.seq <= lane.seq:
        if voucher.seq == lane.seq and voucher_hash(voucher) == lane.voucher_hash:
            return DUPLICATE
        if voucher.seq == lane.seq:
            raise VoucherRejected(voucher.lane, f"a different voucher with seq {voucher.seq} is already settled")
        raise ReceiptReplay(voucher.lane, voucher.seq, lane.seq)
    if not lane.open:
        raise VoucherRejected(voucher.lane, "the lane has expired and closed")
    for name, new, old in (
        ("cum_prompt_tokens", voucher.cum_prompt_tokens, lane.prompt_tokens),
        ("cum_completion_tokens", voucher.cum_completion_tokens, lane.completion_tokens),
        ("cum_cost", voucher.cum_cost, lane.cost),
    ):
        if new < old:
            raise VoucherRejected(voucher.lane, f"{name} decreased from {old} to {new}")
    expected = cost_of(voucher.cum_prompt_tokens, voucher.cum_completion_tokens, lane.price_input_per_m, lane.price_output_per_m)
    if voucher.cum_cost != expected:
        raise VoucherRejected(voucher.lane, f"cum_cost {voucher.cum_cost} does not match {expected} at the lane's prices")
    if signatures:
        verify_voucher(voucher, lane.consumer, lane.node)
    return QUEUED


def settle_epoch(
    *,
    epoch: int,
    now_ms: int,
    pending: Iterable[bytes | tuple[bytes, bytes]],
    lanes: dict[str, LaneState],
    prev_row_hash: bytes,
    prev_summary_hash: bytes,
    operator_ppm: int,
    grace_ms: int,
    ledger: Identity,
) -> EpochOutcome:
    """Settle every pending voucher (encoded), then release expired lanes; sign the epoch.

    `pending` items are encoded vouchers, or (encoded voucher, its sha256 as `submit` recorded
    it): a blob that still matches its recorded hash is the canonical encoding submit wrote,
    so it is not re-encoded to check. `lanes` holds every lane a pending voucher names and every open lane that may expire.
    A voucher that fails any check is left out with its reason; the rest become rows.
    """
    outcome_lanes: dict[str, LaneState] = {}
    deltas: dict[str, list[int]] = {}
    rows: list[SettlementRow] = []
    hashes: list[bytes] = []
    row_data: list[bytes] = []  # each row's encoding (what the store keeps)
    rejected: list[Rejection] = []
    stats: dict[str, list] = {}  # node -> [prompt, completion, consumers set, paid]
    prev = prev_row_hash
    total_paid = 0

    def delta(account: str, d_balance: int, d_reserved: int) -> None:
        entry = deltas.setdefault(account, [0, 0])
        entry[0] += d_balance
        entry[1] += d_reserved

    decoded: list[tuple[Voucher, bytes]] = []  # (voucher, sha256 of its canonical encoding)
    for item in pending:
        blob, recorded = item if isinstance(item, tuple) else (item, None)
        try:
            digest = hashlib.sha256(blob).digest()
            decoded.append((_load_voucher(blob, canonical=digest == recorded), digest))
        except MalformedMessage as exc:  # stored by an older build or corrupted: refuse, keep going
            rejected.append(Rejection("", 0, "MalformedMessage", exc.reason))
    decoded.sort(key=lambda item: (item[0].lane, item[0].seq))

    for voucher, digest in decoded:
        state = outcome_lanes.get(voucher.lane) or lanes.get(voucher.lane)
        try:
            if check_voucher(voucher, state, signatures=True) == DUPLICATE:
                continue
        except LedgerError as exc:  # refused with its reason; the epoch goes on
            rejected.append(Rejection(voucher.lane, voucher.seq, type(exc).__name__, str(exc)))
            continue
        assert state is not None
        new = state.clone()
        pay = max(0, min(voucher.cum_cost, new.cap) - new.paid)
        operator, network = split(pay, operator_ppm)
        d_prompt = voucher.cum_prompt_tokens - new.prompt_tokens
        d_completion = voucher.cum_completion_tokens - new.completion_tokens
        new.paid += pay
        new.seq = voucher.seq
        new.prompt_tokens = voucher.cum_prompt_tokens
        new.completion_tokens = voucher.cum_completion_tokens
        new.cost = voucher.cum_cost
        new.voucher_hash = digest
        outcome_lanes[voucher.lane] = new
        delta(new.consumer, 0, -pay)
        delta(new.node, operator, 0)
        delta(NETWORK_ACCOUNT, network, 0)
        total_paid += pay
        node_stats = stats.setdefault(new.node, [0, 0, set(), 0])
        node_stats[0] += d_prompt
        node_stats[1] += d_completion
        if pay > 0:
            node_stats[2].add(new.consumer)
        node_stats[3] += operator
        row = SettlementRow(
            epoch=epoch,
            index=len(rows),
            lane=voucher.lane,
            consumer=new.consumer,
            node=new.node,
            seq=voucher.seq,
            cum_prompt_tokens=voucher.cum_prompt_tokens,
            cum_completion_tokens=voucher.cum_completion_tokens,
            cum_cost=voucher.cum_cost,
            paid=pay,
            operator_amount=operator,
            network_amount=network,
            voucher_hash=new.voucher_hash,
            prev_hash=prev,
        )
        body, encoded = body_and_encoding(row)
        prev = hashlib.sha256(_ROW_PREFIX + body).digest()  # == row_hash(row), fields read once
        rows.append(row)
        hashes.append(prev)
        row_data.append(encoded)

    released = 0
    for lane_key in sorted(lanes):
        state = outcome_lanes.get(lane_key) or lanes[lane_key]
        if state.open and state.expires_ms + grace_ms <= now_ms:
            new = state.clone()
            new.open = False
            unused = new.cap - new.paid
            delta(new.consumer, unused, -unused)
            released += unused
            outcome_lanes[lane_key] = new

    node_stats = tuple(
        NodeEpochStats(node=n, prompt_tokens=s[0], completion_tokens=s[1], paying_consumers=len(s[2]), paid=s[3])
        for n, s in sorted(stats.items())
    )
    summary = sign(
        ledger,
        EpochSummary(
            epoch=epoch,
            closed_ms=now_ms,
            row_count=len(rows),
            root=merkle.merkle_root(hashes),
            head=prev,
            prev_summary=prev_summary_hash,
            total_paid=total_paid,
            released=released,
            nodes=node_stats,
            stats_hash=stats_hash(node_stats),
            ledger=ledger.public_key.hex(),
        ),
    )
    return EpochOutcome(summary=summary, rows=rows, row_hashes=hashes, row_data=row_data, lanes=outcome_lanes,
                        deltas=deltas, rejected=rejected)


_VOUCHER_TYPES = {name: hint for name, hint in typing.get_type_hints(Voucher).items() if name in Voucher.__dataclass_fields__}
_VOUCHER_FIELDS = frozenset(_VOUCHER_TYPES) | {"type"}


def _load_voucher(blob: bytes, *, canonical: bool = False) -> Voucher:
    """Decode a pending voucher; only byte strings that re-encode identically are accepted.

    Pending blobs are written by `submit` from decoded vouchers, so this direct path (build,
    validate in __post_init__, re-encode, compare) is as strict as `decode_strict` but faster.
    `canonical`: the caller knows these are the bytes submit wrote (their recorded hash
    matches), so the re-encoding is skipped.
    """
    try:
        data = msgpack.unpackb(blob, raw=False)
        if not isinstance(data, dict) or data.get("type") != Voucher.TYPE or set(data) != _VOUCHER_FIELDS:  # type: ignore[attr-defined]
            raise ValueError("not a voucher")
        del data["type"]
        # (bytes submit wrote came from a strictly decoded voucher: their types are right)
        if not canonical and any(type(data[name]) is not hint for name, hint in _VOUCHER_TYPES.items()):
            raise ValueError("a field has the wrong type")
        voucher = Voucher(**data)
    except Exception:  # noqa: BLE001 - msgpack and __post_init__ raise many kinds; the strict decoder says why
        return decode_strict(blob, Voucher)
    if not canonical and encode_flat(voucher) != blob:
        return decode_strict(blob, Voucher)
    return voucher
