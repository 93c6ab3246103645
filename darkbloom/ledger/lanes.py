"""Both ends of a lane while serving: the consumer makes vouchers, the node checks and countersigns them (pure).

Flow on an inference stream (wired by the shim and the node):

1. The shim holds a `LaneReservation` from the ledger and sends it in `InferRequest.session`.
   The node builds `NodeLane.open(...)`, which checks the ledger's signature, the node key
   and the expiry, and refuses otherwise.
2. Both sides call `begin_request(encoded_request, model_digest)` so their request hash
   chains agree.
3. The node calls `served(...)` for the prompt (at `Accepted`) and for each delta it sends,
   and asks `gate(now_ms)` before sending more: "serve", "pause" (vouchers lag: wait for
   one), or "end" (they lagged for longer than the timeout: end the stream).
4. The consumer calls `add_usage(...)` for what it received; when `due()` (every
   `voucher_every_tokens`, and at the end) it sends `next_voucher(...)`. The node checks it
   with `accept(...)`, which returns the countersigned voucher to keep and send back; the
   consumer keeps it with `countersigned(...)`.

Tokens count prompt and completion alike; so the consumer signs right after `Accepted` when
the prompt alone reaches the interval. The node allows one interval in flight: it pauses
when more than `2 * voucher_every_tokens` tokens are unvouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from darkbloom.errors import InsufficientFunds, InvalidSignature, ReceiptReplay, VoucherRejected
from darkbloom.identity import Identity
from darkbloom.ledger.receipts import (
    CONSUMER,
    GENESIS_CHAIN,
    NODE,
    chain_next,
    cost_of,
    request_hash,
    sign_voucher,
    verify,
    verify_voucher,
)
from darkbloom.wire.ledger import LaneReservation, Voucher

__all__ = ["ConsumerLane", "NodeLane", "check_reservation"]

Gate = Literal["serve", "pause", "end"]


def check_reservation(reservation: LaneReservation, ledger_key: str, *, now_ms: int) -> None:
    """Raise unless the ledger signed `reservation` and it has not expired."""
    if reservation.ledger != ledger_key:
        raise InvalidSignature("lane reservation (another ledger)", reservation.ledger)
    verify(reservation, ledger_key)
    if now_ms > reservation.expires_ms:
        raise VoucherRejected(reservation.lane, "the lane reservation has expired; open a new lane")


@dataclass(slots=True)
class _Totals:
    prompt: int = 0
    completion: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt + self.completion


class ConsumerLane:
    """The paying side: counts what it received and signs cumulative vouchers for it."""

    def __init__(
        self,
        identity: Identity,
        reservation: LaneReservation,
        *,
        voucher_every_tokens: int,
        latest: Voucher | None = None,
    ) -> None:
        if reservation.consumer != identity.public_key.hex():
            raise VoucherRejected(reservation.lane, "this reservation is for another consumer")
        self.identity = identity
        self.reservation = reservation
        self.every = max(1, voucher_every_tokens)
        self.latest = latest  # last voucher signed (countersigned once the node answers)
        self.countersigned_latest: Voucher | None = latest if latest and latest.node_sig else None
        self.chain = latest.chain if latest else GENESIS_CHAIN
        self.received = _Totals(latest.cum_prompt_tokens, latest.cum_completion_tokens) if latest else _Totals()
        self.model_digest = latest.model_digest if latest else ""

    @property
    def lane(self) -> str:
        return self.reservation.lane

    def update_reservation(self, reservation: LaneReservation, ledger_key: str, *, now_ms: int) -> None:
        """Take a topped-up reservation for the same lane."""
        check_reservation(reservation, ledger_key, now_ms=now_ms)
        if reservation.lane != self.lane or reservation.consumer != self.reservation.consumer:
            raise VoucherRejected(self.lane, "the new reservation is for another lane")
        if reservation.cap >= self.reservation.cap:
            self.reservation = reservation

    def begin_request(self, encoded_request: bytes, model_digest: str) -> None:
        self.chain = chain_next(self.chain, request_hash(encoded_request))
        self.model_digest = model_digest

    def add_usage(self, *, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        if prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError("token counts are never negative")
        self.received.prompt += prompt_tokens
        self.received.completion += completion_tokens

    @property
    def unvouched_tokens(self) -> int:
        vouched = (self.latest.cum_prompt_tokens + self.latest.cum_completion_tokens) if self.latest else 0
        return self.received.tokens - vouched

    def due(self) -> bool:
        """True when a voucher should be sent now (an interval's worth of tokens is unvouched)."""
        return self.unvouched_tokens >= self.every

    def cost(self) -> int:
        r = self.reservation
        return cost_of(self.received.prompt, self.received.completion, r.price_input_per_m, r.price_output_per_m)

    def headroom(self) -> int:
        """Micro-credits left in the reservation after what has been received."""
        return self.reservation.cap - self.cost()

    def next_voucher(self, *, now_ms: int) -> Voucher:
        """Sign a voucher for everything received so far.

        Raises InsufficientFunds when that exceeds the reservation: top the lane up first.
        """
        cost = self.cost()
        if cost > self.reservation.cap:
            raise InsufficientFunds(self.reservation.consumer, cost, self.reservation.cap)
        voucher = Voucher(
            lane=self.lane,
            seq=(self.latest.seq + 1) if self.latest else 1,
            cum_prompt_tokens=self.received.prompt,
            cum_completion_tokens=self.received.completion,
            cum_cost=cost,
            chain=self.chain,
            model_digest=self.model_digest,
            time_ms=now_ms,
        )
        self.latest = sign_voucher(self.identity, voucher, CONSUMER)
        return self.latest

    def final_voucher(self, *, now_ms: int) -> Voucher | None:
        """At the end of a request: a voucher for whatever is still unvouched, or None when nothing is."""
        return self.next_voucher(now_ms=now_ms) if self.unvouched_tokens > 0 else None

    def countersigned(self, voucher: Voucher) -> None:
        """Keep the node's countersigned copy of a voucher we signed.

        Usually the last one; an earlier one (its copy crossed our next voucher on the stream)
        is kept as the latest countersigned one if it is newer than what we hold.
        """
        if self.latest is None or voucher.seq > self.latest.seq or voucher.lane != self.lane:
            raise VoucherRejected(self.lane, "the node returned a voucher we did not sign")
        if voucher.seq == self.latest.seq:
            if voucher.consumer_sig != self.latest.consumer_sig:
                raise VoucherRejected(self.lane, "the node returned a voucher we did not sign last")
            verify_voucher(voucher, self.reservation.consumer, self.reservation.node)
            self.latest = voucher
            self.countersigned_latest = voucher
            return
        verify_voucher(voucher, self.reservation.consumer, self.reservation.node)  # our signature on it, and the node's
        if self.countersigned_latest is None or voucher.seq > self.countersigned_latest.seq:
            self.countersigned_latest = voucher


class NodeLane:
    """The serving side: checks each incoming voucher, countersigns it, and gates the stream."""

    def __init__(
        self,
        identity: Identity,
        reservation: LaneReservation,
        *,
        ledger_key: str,
        voucher_every_tokens: int,
        voucher_timeout_ms: int,
        latest: Voucher | None = None,
    ) -> None:
        self.identity = identity
        self.reservation = reservation
        self.ledger_key = ledger_key
        self.max_unvouched = 2 * max(1, voucher_every_tokens)
        self.timeout_ms = voucher_timeout_ms
        self.latest = latest  # last countersigned voucher
        self.chain = latest.chain if latest else GENESIS_CHAIN
        self.model_digest = latest.model_digest if latest else ""
        self.served_totals = _Totals(latest.cum_prompt_tokens, latest.cum_completion_tokens) if latest else _Totals()
        self._paused_since: int | None = None

    @classmethod
    def open(
        cls,
        identity: Identity,
        reservation: LaneReservation,
        *,
        ledger_key: str,
        now_ms: int,
        voucher_every_tokens: int,
        voucher_timeout_ms: int = 10_000,
        latest: Voucher | None = None,
    ) -> NodeLane:
        """Check the reservation (ledger signature, this node, not expired) and start serving on it."""
        check_reservation(reservation, ledger_key, now_ms=now_ms)
        if reservation.node != identity.public_key.hex():
            raise VoucherRejected(reservation.lane, "this lane is reserved for another node")
        return cls(
            identity,
            reservation,
            ledger_key=ledger_key,
            voucher_every_tokens=voucher_every_tokens,
            voucher_timeout_ms=voucher_timeout_ms,
            latest=latest,
        )

    @property
    def lane(self) -> str:
        return self.reservation.lane

    def update_reservation(self, reservation: LaneReservation, *, now_ms: int) -> None:
        check_reservation(reservation, self.ledger_key, now_ms=now_ms)
        if reservation.lane != self.lane or reservation.node != self.reservation.node:
            raise VoucherRejected(self.lane, "the new reservation is for another lane")
        if reservation.cap >= self.reservation.cap:
            self.reservation = reservation

    def begin_request(self, encoded_request: bytes, model_digest: str) -> None:
        self.chain = chain_next(self.chain, request_hash(encoded_request))
        self.model_digest = model_digest

    def served(self, *, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        if prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError("token counts are never negative")
        self.served_totals.prompt += prompt_tokens
        self.served_totals.completion += completion_tokens

    @property
    def lag_tokens(self) -> int:
        """Tokens served that no voucher covers yet."""
        vouched = (self.latest.cum_prompt_tokens + self.latest.cum_completion_tokens) if self.latest else 0
        return max(0, self.served_totals.tokens - vouched)

    def gate(self, now_ms: int) -> Gate:
        """Whether to keep sending: "serve", "pause" until a voucher comes, or "end" the stream."""
        if self.lag_tokens <= self.max_unvouched:
            self._paused_since = None
            return "serve"
        if self._paused_since is None:
            self._paused_since = now_ms
        if now_ms - self._paused_since > self.timeout_ms:
            return "end"
        return "pause"

    def accept(self, voucher: Voucher, *, now_ms: int) -> Voucher:
        """Check a consumer's voucher and return it countersigned; raise with the reason otherwise."""
        r = self.reservation
        if voucher.lane != r.lane:
            raise VoucherRejected(voucher.lane, "voucher for another lane")
        verify_voucher(voucher, r.consumer, None)
        last_seq = self.latest.seq if self.latest else 0
        if voucher.seq <= last_seq:
            raise ReceiptReplay(voucher.lane, voucher.seq, last_seq)
        if self.latest is not None:
            for name, new, old in (
                ("cum_prompt_tokens", voucher.cum_prompt_tokens, self.latest.cum_prompt_tokens),
                ("cum_completion_tokens", voucher.cum_completion_tokens, self.latest.cum_completion_tokens),
                ("cum_cost", voucher.cum_cost, self.latest.cum_cost),
            ):
                if new < old:
                    raise VoucherRejected(voucher.lane, f"{name} decreased from {old} to {new}")
        expected = cost_of(voucher.cum_prompt_tokens, voucher.cum_completion_tokens, r.price_input_per_m, r.price_output_per_m)
        if voucher.cum_cost != expected:
            raise VoucherRejected(voucher.lane, f"cum_cost {voucher.cum_cost} does not match {expected} at the lane's prices")
        if voucher.cum_cost > r.cap:
            raise InsufficientFunds(r.consumer, voucher.cum_cost, r.cap)
        if voucher.chain != self.chain:
            raise VoucherRejected(voucher.lane, "the request hash chain does not match the requests served")
        if voucher.model_digest != self.model_digest:
            raise VoucherRejected(voucher.lane, "the model digest does not match the model that served")
        if now_ms > r.expires_ms:
            raise VoucherRejected(voucher.lane, "the lane reservation has expired")
        signed = sign_voucher(self.identity, voucher, NODE)
        self.latest = signed
        if self.lag_tokens <= self.max_unvouched:
            self._paused_since = None
        return signed
