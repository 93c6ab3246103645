"""Messages of the ledger: lane reservations, vouchers, settlement rows, epoch summaries, and `/darkbloom/ledger/1.0.0`.

Amounts are integers in micro-credits; token counts are integers; times are integer
milliseconds since the Unix epoch. Accounts are Ed25519 public keys, lower-case hex (64
characters); lane ids are 32 hex characters. Signatures are 64 raw bytes, or b"" while
unsigned. What each party signs is `signed_bytes(msg, role)`: the message type's domain
prefix, a role tag, then `canonical_bytes` of every field except the signatures, so a
signature made for one type or role never verifies as another.

Who signs what:
- `LaneReservation`: the ledger (`signature`).
- `Voucher`: the consumer (`consumer_sig`, role "consumer") and the node (`node_sig`, role
  "node"), over the same fields.
- `SettlementRow`: nobody; rows are hash-chained and their Merkle root is in the summary.
- `EpochSummary`: the ledger (`signature`).
- Requests that act on an account (`OpenLane`, `TopUp`, `CloseLane`, `SubmitVouchers`, `BalanceQuery`):
  that account's key (`signature`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from dataclasses import dataclass
from typing import Literal

import msgpack

from darkbloom.wire.codec import canonical_bytes, encode, message

__all__ = [
    "LEDGER_PROTOCOL",
    "NETWORK_ACCOUNT",
    "BalanceQuery",
    "BalanceReply",
    "CloseLane",
    "EpochQuery",
    "EpochReply",
    "EpochSummary",
    "LaneReply",
    "LaneReservation",
    "LedgerErrorReply",
    "NodeEpochStats",
    "OpenLane",
    "ProofQuery",
    "ProofReply",
    "ProofStep",
    "SettlementRow",
    "SubmitResult",
    "SubmitVouchers",
    "SubmitReply",
    "TopUp",
    "Voucher",
    "body_and_encoding",
    "encode_flat",
    "is_account",
    "is_lane_id",
    "signed_body",
    "signed_bytes",
]

LEDGER_PROTOCOL = "/darkbloom/ledger/1.0.0"
NETWORK_ACCOUNT = "network"  # receives the fee share; the only account that is not a key

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_SIGNATURE_FIELDS = ("signature", "consumer_sig", "node_sig")
_UNSIGNED = {"ledger.epoch": ("nodes",)}  # covered through a hash field instead


def is_account(value: str) -> bool:
    """True for a lower-case hex Ed25519 public key, or the network account."""
    return value == NETWORK_ACCOUNT or bool(_HEX64.fullmatch(value))


def is_lane_id(value: str) -> bool:
    return bool(_HEX32.fullmatch(value))


def signed_bytes(msg: object, role: str = "") -> bytes:
    """The bytes a signature covers: domain, role tag, every non-signature field."""
    return type(msg).DOMAIN + role.encode() + b"\x00" + signed_body(msg)  # type: ignore[attr-defined]


def signed_body(msg: object) -> bytes:
    """`canonical_bytes(msg)` without the signature fields (so one body serves both roles).

    Settlement computes this for every voucher and row, so flat messages (every field a
    scalar) take a direct path that yields exactly the same bytes as `canonical_bytes`.
    """
    names = _flat_fields(type(msg))
    if names is None:
        return canonical_bytes(msg, exclude=_SIGNATURE_FIELDS + _UNSIGNED.get(type(msg).TYPE, ()))  # type: ignore[attr-defined]
    return type(msg).DOMAIN + msgpack.packb([getattr(msg, n) for n in names if n not in _SIGNATURE_FIELDS], use_bin_type=True)  # type: ignore[attr-defined]


def body_and_encoding(msg: object) -> tuple[bytes, bytes]:
    """(`signed_body(msg)`, `encode_flat(msg)`) of a flat message, reading its fields once (settlement rows)."""
    names = _flat_fields(type(msg))
    if names is None:
        return signed_body(msg), encode(msg)
    values = [getattr(msg, n) for n in names]
    body = type(msg).DOMAIN + msgpack.packb(  # type: ignore[attr-defined]
        [v for n, v in zip(names, values) if n not in _SIGNATURE_FIELDS], use_bin_type=True)
    data = dict(zip(names, values))
    data["type"] = type(msg).TYPE  # type: ignore[attr-defined]
    return body, msgpack.packb(data, use_bin_type=True)


def encode_flat(msg: object) -> bytes:
    """`codec.encode(msg)` for a flat message, by the direct path (same bytes)."""
    names = _flat_fields(type(msg))
    if names is None:
        return encode(msg)
    data = {n: getattr(msg, n) for n in names}
    data["type"] = type(msg).TYPE  # type: ignore[attr-defined]
    return msgpack.packb(data, use_bin_type=True)


@functools.cache
def _flat_fields(cls: type) -> tuple[str, ...] | None:
    """Field names in order when every field is int, str, bytes or bool; else None."""
    hints = typing.get_type_hints(cls)
    names = tuple(f.name for f in dataclasses.fields(cls))
    return names if all(hints[n] in (int, str, bytes, bool) for n in names) else None


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _sig_ok(sig: bytes) -> bool:
    return len(sig) in (0, 64)


def _nonneg(*values: int) -> bool:
    return all(v >= 0 for v in values)


# --- signed state -------------------------------------------------------------------


@message("ledger.reservation")
@dataclass(frozen=True, slots=True, kw_only=True)
class LaneReservation:
    """The ledger's promise: `consumer` may spend up to `cap` at `node` on this lane.

    Set and signed by the ledger at open; re-issued with a higher `cap` and later
    `expires_ms` on each top-up. Prices are the node's, per 1M tokens, fixed for the lane.
    """

    lane: str  # 32 hex chars, derived from consumer, node and the consumer's nonce
    consumer: str  # account (hex public key) that pays
    node: str  # account (hex public key) that serves and is paid
    cap: int  # micro-credits reserved in total (cumulative over top-ups)
    price_input_per_m: int  # micro-credits per 1M prompt tokens
    price_output_per_m: int  # micro-credits per 1M completion tokens
    opened_ms: int
    expires_ms: int  # after this (plus one epoch of grace) the unused reserve is released
    ledger: str  # the ledger's public key (hex)
    signature: bytes = b""

    def __post_init__(self) -> None:
        _require(is_lane_id(self.lane), "lane must be 32 lower-case hex characters")
        _require(is_account(self.consumer) and self.consumer != NETWORK_ACCOUNT, "consumer must be a hex public key")
        _require(is_account(self.node) and self.node != NETWORK_ACCOUNT, "node must be a hex public key")
        _require(is_account(self.ledger) and self.ledger != NETWORK_ACCOUNT, "ledger must be a hex public key")
        _require(_nonneg(self.cap, self.price_input_per_m, self.price_output_per_m, self.opened_ms), "negative amount")
        _require(self.expires_ms >= self.opened_ms, "expires before it opens")
        _require(_sig_ok(self.signature), "signature must be 64 bytes")


@message("ledger.voucher")
@dataclass(frozen=True, slots=True, kw_only=True)
class Voucher:
    """Cumulative usage on a lane, signed by the consumer and countersigned by the node.

    Each new voucher has a higher `seq` and totals that never decrease; it replaces the
    previous one. `cum_cost` must equal `cost_of(...)` at the lane's prices.
    """

    lane: str
    seq: int  # 1, 2, ... per lane
    cum_prompt_tokens: int
    cum_completion_tokens: int
    cum_cost: int  # micro-credits
    chain: bytes  # 32 bytes: sha256 hash chain over the hashes of the lane's requests
    model_digest: str  # weights digest of the model that served the latest request
    time_ms: int  # when the consumer signed
    consumer_sig: bytes = b""
    node_sig: bytes = b""

    def __post_init__(self) -> None:
        _require(is_lane_id(self.lane), "lane must be 32 lower-case hex characters")
        _require(self.seq >= 1, "seq starts at 1")
        _require(_nonneg(self.cum_prompt_tokens, self.cum_completion_tokens, self.cum_cost, self.time_ms), "negative total")
        _require(len(self.chain) == 32, "chain must be 32 bytes")
        _require(len(self.model_digest) <= 128, "model_digest too long")
        _require(_sig_ok(self.consumer_sig) and _sig_ok(self.node_sig), "signatures must be 64 bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeEpochStats:
    """What one node settled in one epoch: input to reputation."""

    node: str
    prompt_tokens: int  # settled this epoch (deltas)
    completion_tokens: int
    paying_consumers: int  # distinct consumers whose vouchers paid this node more than 0
    paid: int  # micro-credits credited to the node (its share)


@message("ledger.row")
@dataclass(frozen=True, slots=True, kw_only=True)
class SettlementRow:
    """One settled voucher. Set by the ledger; `prev_hash` chains every row ever written."""

    epoch: int
    index: int  # position in the epoch, from 0; also the Merkle leaf index
    lane: str
    consumer: str
    node: str
    seq: int
    cum_prompt_tokens: int
    cum_completion_tokens: int
    cum_cost: int
    paid: int  # delta paid this time (capped at the reservation)
    operator_amount: int  # paid to the node
    network_amount: int  # paid to the network account; operator + network == paid
    voucher_hash: bytes  # sha256 of the voucher's encoding (both signatures included)
    prev_hash: bytes  # hash of the previous row (32 zero bytes for the very first)


@message("ledger.epoch")
@dataclass(frozen=True, slots=True, kw_only=True)
class EpochSummary:
    """The close of an epoch, signed by the ledger. Anyone can check a row against `root`."""

    epoch: int
    closed_ms: int
    row_count: int
    root: bytes  # Merkle root of the epoch's row hashes (32 zero bytes when empty)
    head: bytes  # hash of the last row ever written (the chain head)
    prev_summary: bytes  # sha256 of the previous summary's encoding (zeros for epoch 1)
    total_paid: int
    released: int  # unused reserve returned to consumers from expired lanes
    # Per-node stats (input to reputation). Not signed directly: the signature covers
    # `stats_hash`, so a proof can carry the summary without them and stay small.
    nodes: tuple[NodeEpochStats, ...] = ()
    stats_hash: bytes = b""  # sha256 of the node stats (see darkbloom.ledger.receipts.stats_hash)
    ledger: str = ""
    signature: bytes = b""


# --- requests (client -> ledger) and replies ---------------------------------------


@message("ledger.open")
@dataclass(frozen=True, slots=True, kw_only=True)
class OpenLane:
    """Consumer -> ledger: reserve `cap` for use at `node`. Same nonce again returns the same lane."""

    consumer: str
    node: str
    cap: int
    price_input_per_m: int
    price_output_per_m: int
    nonce: bytes  # 16 random bytes chosen by the consumer
    time_ms: int
    signature: bytes = b""

    def __post_init__(self) -> None:
        _require(len(self.nonce) == 16, "nonce must be 16 bytes")
        _require(_nonneg(self.cap, self.price_input_per_m, self.price_output_per_m), "negative amount")
        _require(_sig_ok(self.signature), "signature must be 64 bytes")


@message("ledger.topup")
@dataclass(frozen=True, slots=True, kw_only=True)
class TopUp:
    """Consumer -> ledger: raise the lane's total cap to `cap` (absolute, so a replay is a no-op)."""

    lane: str
    cap: int
    time_ms: int
    signature: bytes = b""

    def __post_init__(self) -> None:
        _require(self.cap >= 0, "negative cap")
        _require(_sig_ok(self.signature), "signature must be 64 bytes")


@message("ledger.close_lane")
@dataclass(frozen=True, slots=True, kw_only=True)
class CloseLane:
    """Consumer -> ledger: this lane will not be used again; release its unused reserve soon.

    The ledger shortens the lane's expiry to about one epoch from now (the node's latest
    voucher still settles in that time), and answers the shortened reservation. A lane that
    already expires sooner is unchanged, so a replay is a no-op.
    """

    lane: str
    time_ms: int
    signature: bytes = b""

    def __post_init__(self) -> None:
        _require(_sig_ok(self.signature), "signature must be 64 bytes")


@message("ledger.reservation_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class LaneReply:
    """Ledger -> consumer: the (new) signed reservation, encoded."""

    reservation: LaneReservation


@message("ledger.submit")
@dataclass(frozen=True, slots=True, kw_only=True)
class SubmitVouchers:
    """Node -> ledger: its latest countersigned voucher per lane, for the next settlement."""

    node: str
    vouchers: tuple[Voucher, ...]
    time_ms: int
    signature: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class SubmitResult:
    lane: str
    seq: int
    status: Literal["queued", "duplicate", "rejected"]
    reason: str = ""  # why, when rejected
    code: str = ""  # the error class name, when rejected


@message("ledger.submit_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class SubmitReply:
    results: tuple[SubmitResult, ...]


@message("ledger.balance")
@dataclass(frozen=True, slots=True, kw_only=True)
class BalanceQuery:
    account: str
    time_ms: int
    signature: bytes = b""


@message("ledger.balance_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class BalanceReply:
    account: str
    balance: int  # spendable
    reserved: int  # held by open lanes


@message("ledger.epoch_query")
@dataclass(frozen=True, slots=True, kw_only=True)
class EpochQuery:
    epoch: int = 0  # 0: the latest closed epoch


@message("ledger.epoch_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class EpochReply:
    summary: EpochSummary | None  # None when no epoch has closed yet


@message("ledger.proof_query")
@dataclass(frozen=True, slots=True, kw_only=True)
class ProofQuery:
    epoch: int
    index: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ProofStep:
    sibling: bytes  # 32 bytes
    left: bool  # True when the sibling is on the left


@message("ledger.proof_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class ProofReply:
    row: SettlementRow
    path: tuple[ProofStep, ...]
    summary: EpochSummary


@message("ledger.error")
@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerErrorReply:
    """Ledger -> client: the request failed; `code` names the error class (e.g. "InsufficientFunds")."""

    code: str
    message: str
    lane: str = ""
    account: str = ""
    needed: int = 0
    available: int = 0
