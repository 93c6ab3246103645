"""The client end of `/darkbloom/ledger/1.0.0`: open and top up lanes, submit vouchers, query.

Used by the shim (consumer: `open_lane`, `top_up`, `balance`) and the node (`submit`,
`submit_unsettled` from its VoucherBook). Works on any stream with `read(n)`, `write(data)`
and `close()`. Error replies become the typed errors they name. Every reservation and
summary the ledger returns is checked against the ledger's key when the client knows it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from darkbloom.errors import (
    DarkbloomError,
    InsufficientFunds,
    InvalidSignature,
    LedgerError,
    StreamClosed,
    UnknownLane,
    VoucherRejected,
)
from darkbloom.identity import Identity
from darkbloom.ledger.book import VoucherBook
from darkbloom.ledger.merkle import check_proof
from darkbloom.ledger.receipts import sign, verify
from darkbloom.ledger.service import MAX_BATCH, MAX_FRAME_BYTES, LedgerStream
from darkbloom.wire.codec import FrameDecoder, encode_frame, read_frame
from darkbloom.wire.ledger import (
    BalanceQuery,
    BalanceReply,
    CloseLane,
    EpochQuery,
    EpochReply,
    EpochSummary,
    LaneReply,
    LaneReservation,
    LedgerErrorReply,
    OpenLane,
    ProofQuery,
    ProofReply,
    SubmitReply,
    SubmitResult,
    SubmitVouchers,
    TopUp,
    Voucher,
)

__all__ = ["LedgerClient", "SubmitSummary", "run_submitter", "submit_unsettled"]

log = logging.getLogger(__name__)


class LedgerClient:
    """Requests to the ledger over one stream, one at a time."""

    def __init__(self, stream: LedgerStream, identity: Identity, *, ledger_key: str = "", clock: Callable[[], float] = time.time) -> None:
        self.stream = stream
        self.identity = identity
        self.account = identity.public_key.hex()
        self.ledger_key = ledger_key  # "" trusts the first key seen (and then holds to it)
        self.clock = clock
        self._decoder = FrameDecoder(MAX_FRAME_BYTES)
        self._lock = trio.Lock()

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def _ask(self, request: Any, expect: type) -> Any:
        async with self._lock:
            await self.stream.write(encode_frame(request, MAX_FRAME_BYTES))
            reply = await read_frame(self.stream.read, self._decoder, (expect, LedgerErrorReply))
        if reply is None:
            raise StreamClosed(self.stream.peer_id, "the ledger closed the stream")
        if isinstance(reply, LedgerErrorReply):
            raise _error(reply)
        return reply

    def _check_ledger(self, msg: LaneReservation | EpochSummary) -> None:
        if not self.ledger_key:
            self.ledger_key = msg.ledger
        if msg.ledger != self.ledger_key:
            raise InvalidSignature(f"{type(msg).TYPE} (another ledger)", msg.ledger)
        verify(msg, self.ledger_key)

    async def open_lane(self, node: str, cap: int, *, price_input_per_m: int, price_output_per_m: int) -> LaneReservation:
        request = sign(
            self.identity,
            OpenLane(
                consumer=self.account,
                node=node,
                cap=cap,
                price_input_per_m=price_input_per_m,
                price_output_per_m=price_output_per_m,
                nonce=os.urandom(16),
                time_ms=self._now_ms(),
            ),
        )
        reply: LaneReply = await self._ask(request, LaneReply)
        self._check_lane(reply.reservation, node=node, cap=cap)
        return reply.reservation

    async def top_up(self, lane: str, cap: int) -> LaneReservation:
        """Raise the lane's total cap to `cap` (absolute)."""
        reply: LaneReply = await self._ask(sign(self.identity, TopUp(lane=lane, cap=cap, time_ms=self._now_ms())), LaneReply)
        self._check_lane(reply.reservation, lane=lane)
        return reply.reservation

    async def close_lane(self, lane: str) -> LaneReservation:
        """Tell the ledger this lane will not be used again: its unused reserve is released about an epoch later."""
        reply: LaneReply = await self._ask(sign(self.identity, CloseLane(lane=lane, time_ms=self._now_ms())), LaneReply)
        self._check_lane(reply.reservation, lane=lane)
        return reply.reservation

    def _check_lane(self, r: LaneReservation, *, node: str = "", cap: int = 0, lane: str = "") -> None:
        self._check_ledger(r)
        if r.consumer != self.account or (node and r.node != node) or (lane and r.lane != lane) or r.cap < cap:
            raise VoucherRejected(r.lane, "the ledger answered with a reservation we did not ask for")

    async def submit(self, vouchers: Sequence[Voucher]) -> list[SubmitResult]:
        """Queue countersigned vouchers for settlement (as the node); at most MAX_BATCH per call."""
        request = sign(self.identity, SubmitVouchers(node=self.account, vouchers=tuple(vouchers), time_ms=self._now_ms()))
        reply: SubmitReply = await self._ask(request, SubmitReply)
        return list(reply.results)

    async def balance(self) -> tuple[int, int]:
        """(balance, reserved) of this client's account."""
        reply: BalanceReply = await self._ask(sign(self.identity, BalanceQuery(account=self.account, time_ms=self._now_ms())), BalanceReply)
        return reply.balance, reply.reserved

    async def epoch(self, epoch: int = 0) -> EpochSummary | None:
        reply: EpochReply = await self._ask(EpochQuery(epoch=epoch), EpochReply)
        if reply.summary is not None:
            self._check_ledger(reply.summary)
        return reply.summary

    async def proof(self, epoch: int, index: int) -> ProofReply:
        """A row with its inclusion proof, checked against the ledger-signed root."""
        reply: ProofReply = await self._ask(ProofQuery(epoch=epoch, index=index), ProofReply)
        self._check_ledger(reply.summary)
        check_proof(reply, self.ledger_key)
        return reply

    async def close(self) -> None:
        await self.stream.close()


def _error(reply: LedgerErrorReply) -> LedgerError:
    if reply.code == "InsufficientFunds":
        return InsufficientFunds(reply.account, reply.needed, reply.available)
    if reply.code == "UnknownLane":
        return UnknownLane(reply.lane)
    if reply.code == "VoucherRejected":
        return VoucherRejected(reply.lane, reply.message)
    if reply.code == "InvalidSignature":
        return InvalidSignature(reply.message)
    return LedgerError(f"ledger refused: {reply.message}")


@dataclass(frozen=True, slots=True)
class SubmitSummary:
    queued: int = 0
    duplicate: int = 0
    rejected: int = 0


async def submit_unsettled(book: VoucherBook, client: LedgerClient, *, batch: int = 500) -> SubmitSummary:
    """Submit every voucher in `book` the ledger does not have yet; mark what it took.

    Idempotent: a voucher the ledger already has comes back "duplicate". A rejected voucher
    is logged and marked too (resubmitting it cannot change the answer).
    """
    batch = min(batch, MAX_BATCH)
    counts = {"queued": 0, "duplicate": 0, "rejected": 0}
    while True:
        vouchers = await trio.to_thread.run_sync(book.unsettled, batch, limiter=book.limiter)
        if not vouchers:
            return SubmitSummary(**counts)
        results = await client.submit(vouchers)
        for result in results:
            counts[result.status] += 1
            if result.status == "rejected":
                log.warning("ledger refused voucher lane %s seq %d: %s", result.lane[:8], result.seq, result.reason)
            await trio.to_thread.run_sync(book.mark_settled, result.lane, result.seq, limiter=book.limiter)


async def run_submitter(
    book: VoucherBook,
    connect: Callable[[], Awaitable[LedgerStream]],
    identity: Identity,
    *,
    interval_s: float,
    ledger_key: str = "",
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The node's submit loop: every `interval_s`, submit what is unsettled; retry with backoff on failure."""
    task_status.started()
    backoff = 1.0
    while True:
        try:
            stream = await connect()
            client = LedgerClient(stream, identity, ledger_key=ledger_key)
            try:
                summary = await submit_unsettled(book, client)
            finally:
                with trio.move_on_after(1, shield=True):
                    await client.close()
            if summary.queued or summary.rejected:
                log.info("submitted vouchers: %d queued, %d duplicate, %d rejected", summary.queued, summary.duplicate, summary.rejected)
            backoff = 1.0
            await trio.sleep(interval_s)
        except (DarkbloomError, OSError) as exc:  # the ledger is unreachable or refused: retry later, nothing is lost
            log.warning("voucher submission failed (%s); retrying in %.0fs", exc, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, max(interval_s, 1.0))

