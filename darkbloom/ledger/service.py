"""The ledger service inside the relay: the `/darkbloom/ledger/1.0.0` handler and the epoch loop.

The relay mounts `LedgerService.handle` on its P2P layer (`PeerNetwork.serve(LEDGER_PROTOCOL,
service.handle)`) and runs `LedgerService.run` in its nursery. A stream carries any number
of request/reply pairs, each one uvarint-framed message (see `darkbloom.wire.ledger`), until
the client closes it. Requests that act on an account are signed by that account's key;
balance queries must also be fresh (within `FRESH_MS`) so an old signed query cannot be
replayed to watch a balance. Store calls run on one worker thread (`AsyncLedger`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import trio

from darkbloom.config import LedgerConfig
from darkbloom.errors import InsufficientFunds, LedgerError, MalformedMessage, UnknownLane, VoucherRejected
from darkbloom.identity import Identity
from darkbloom.ledger.receipts import verify
from darkbloom.ledger.settlement import EpochOutcome, share_ppm
from darkbloom.ledger.store import LedgerStore
from darkbloom.wire.codec import FrameDecoder, encode_frame, read_frame
from darkbloom.wire.ledger import (
    BalanceQuery,
    BalanceReply,
    CloseLane,
    EpochQuery,
    EpochReply,
    LaneReply,
    LedgerErrorReply,
    OpenLane,
    ProofQuery,
    ProofReply,
    SubmitReply,
    SubmitVouchers,
    TopUp,
)

__all__ = ["AsyncLedger", "FRESH_MS", "LedgerService", "LedgerStream", "MAX_BATCH", "MAX_FRAME_BYTES", "REQUESTS"]

log = logging.getLogger(__name__)

FRESH_MS = 5 * 60 * 1000  # signed queries older or newer than this are refused
MAX_BATCH = 2000  # vouchers per SubmitVouchers
MAX_FRAME_BYTES = 1 << 20
REQUESTS = (OpenLane, TopUp, CloseLane, SubmitVouchers, BalanceQuery, EpochQuery, ProofQuery)

R = TypeVar("R")


class LedgerStream(Protocol):
    """What the handler needs from a stream (the P2P layer's streams provide it)."""

    peer_id: str

    async def read(self, n: int) -> bytes: ...  # b"" at EOF

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class AsyncLedger:
    """A LedgerStore driven from trio: every call on one worker thread, one at a time."""

    def __init__(self, store: LedgerStore) -> None:
        self.store = store
        self.limiter = trio.CapacityLimiter(1)

    async def call(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self.limiter)


class LedgerService:
    """Answers ledger requests and closes an epoch every `config.epoch_s`."""

    def __init__(
        self,
        store: LedgerStore,
        identity: Identity,
        config: LedgerConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = AsyncLedger(store)
        self.identity = identity
        self.config = config
        self.clock = clock
        self.operator_ppm = share_ppm(config.operator_share)
        self.epochs_closed = 0
        # Mounted by other relay services (darkbloom.relay.trust): request type -> handler, and
        # hooks awaited after each epoch closes.
        self.extra: dict[type, Callable[[Any], Awaitable[Any]]] = {}
        self.on_settled: list[Callable[[EpochOutcome], Awaitable[Any]]] = []

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # --- lifecycle -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close an epoch every `epoch_s` until cancelled."""
        log.info("ledger service up, key %s, epoch %ds", self.identity.public_key.hex()[:16], self.config.epoch_s)
        task_status.started()
        while True:
            await trio.sleep(self.config.epoch_s)
            try:
                await self.settle_now()
            except LedgerError as exc:  # e.g. the database is busy or unreachable: pending vouchers wait for the next epoch
                log.error("epoch settlement failed, retrying next epoch: %s", exc)

    async def settle_now(self) -> EpochOutcome:
        """Close the current epoch now (also what `darkbloom ledger settle` does on the store)."""
        outcome = await self.ledger.call(
            self.ledger.store.settle,
            ledger=self.identity,
            now_ms=self.now_ms(),
            operator_ppm=self.operator_ppm,
            grace_ms=self.config.epoch_s * 1000,
        )
        self.epochs_closed += 1
        for hook in self.on_settled:
            await hook(outcome)
        return outcome

    # --- protocol --------------------------------------------------------------------

    async def handle(self, stream: LedgerStream) -> None:
        """Serve one stream: request, reply, ... until the client closes it."""
        decoder = FrameDecoder(MAX_FRAME_BYTES)
        try:
            while True:
                try:
                    request = await read_frame(stream.read, decoder, REQUESTS + tuple(self.extra))
                except MalformedMessage as exc:  # tell the client why, then hang up: the framing is lost
                    log.info("ledger: malformed request from %s: %s", stream.peer_id[-8:], exc.reason)
                    await stream.write(encode_frame(LedgerErrorReply(code="MalformedMessage", message=str(exc))))
                    return
                if request is None:
                    return
                try:
                    reply = await self._dispatch(request)
                except LedgerError as exc:  # the request is refused with its reason; the stream goes on
                    reply = _error_reply(exc)
                await stream.write(encode_frame(reply, MAX_FRAME_BYTES))
        finally:
            with trio.move_on_after(1, shield=True):
                await stream.close()

    async def _dispatch(self, request: Any) -> Any:
        extra = self.extra.get(type(request))
        if extra is not None:
            return await extra(request)
        store = self.ledger.store
        ttl_ms = self.config.lane_ttl_s * 1000
        if isinstance(request, OpenLane):
            reservation = await self.ledger.call(store.open_lane, request, ledger=self.identity, now_ms=self.now_ms(), ttl_ms=ttl_ms)
            log.info("lane %s opened, cap %d", reservation.lane[:8], reservation.cap)
            return LaneReply(reservation=reservation)
        if isinstance(request, TopUp):
            reservation = await self.ledger.call(store.top_up, request, ledger=self.identity, now_ms=self.now_ms(), ttl_ms=ttl_ms)
            return LaneReply(reservation=reservation)
        if isinstance(request, CloseLane):
            # kept one epoch: the node's latest voucher is submitted and settles before the release
            reservation = await self.ledger.call(store.close_lane, request, ledger=self.identity, now_ms=self.now_ms(),
                                                 keep_ms=self.config.epoch_s * 1000)
            log.info("lane %s closed by its consumer, expires %d", reservation.lane[:8], reservation.expires_ms)
            return LaneReply(reservation=reservation)
        if isinstance(request, SubmitVouchers):
            if len(request.vouchers) > MAX_BATCH:
                raise LedgerError(f"a batch holds at most {MAX_BATCH} vouchers, got {len(request.vouchers)}", hint="split the batch")
            verify(request, request.node)
            results = await self.ledger.call(store.submit, request.node, request.vouchers)
            return SubmitReply(results=tuple(results))
        if isinstance(request, BalanceQuery):
            self._fresh(request.time_ms)
            verify(request, request.account)
            balance, reserved = await self.ledger.call(store.balance, request.account)
            return BalanceReply(account=request.account, balance=balance, reserved=reserved)
        if isinstance(request, EpochQuery):
            return EpochReply(summary=await self.ledger.call(store.summary, request.epoch))
        if isinstance(request, ProofQuery):
            row, path, summary = await self.ledger.call(store.proof, request.epoch, request.index)
            return ProofReply(row=row, path=path, summary=summary)
        raise AssertionError(f"unhandled request {type(request).__name__}")  # REQUESTS and this list disagree

    def _fresh(self, time_ms: int) -> None:
        if abs(self.now_ms() - time_ms) > FRESH_MS:
            raise LedgerError("the request's time is too far from the ledger's clock", hint="check the system clock")


def _error_reply(exc: LedgerError) -> LedgerErrorReply:
    fields: dict[str, Any] = {}
    if isinstance(exc, InsufficientFunds):
        fields = {"account": exc.account, "needed": exc.needed, "available": exc.available}
    elif isinstance(exc, (UnknownLane, VoucherRejected)):
        fields = {"lane": exc.lane}
    return LedgerErrorReply(code=type(exc).__name__, message=str(exc), **fields)
