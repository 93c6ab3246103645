"""The shim side of `/darkbloom/infer/1.0.0`: one `InferRequest` over one PeerNetwork stream.

With a `ConsumerLane` (paid serving, see `darkbloom.api.metering` and `darkbloom.ledger.lanes`)
the call also meters: it counts the prompt at `Accepted` and each `Delta`'s tokens as they
arrive, sends a signed `Voucher` whenever an interval's worth is unvouched and a final one at
`Done`, and keeps the node's countersigned copies (Voucher frames interleaved by the node).

`open_infer(network, peer_id, request)` opens the stream, sends the request and reads the
node's answer up to `Accepted`; an `ErrorFrame` becomes the matching typed error
(`InvalidRequest`, `ModelNotFound`, `NoCapacity`, ...). Then `receive()` returns `Delta`,
`ChoiceEnd`, `Embeddings` frames and `Done`, and None after `Done`. A stream that ends
before `Done` is a `StreamClosed`, never a silent end. `aclose()` before `Done` resets the
stream, which cancels the generation on the node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from darkbloom.errors import (
    ApiError,
    DarkbloomError,
    EngineFailed,
    InvalidRequest,
    LaneBusy,
    LedgerError,
    MalformedMessage,
    ModelNotFound,
    NoCapacity,
    ProtocolMismatch,
    StreamClosed,
)
from darkbloom.api.timeline import timeline
from darkbloom.wire.codec import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode, encode_frame, read_frame
from darkbloom.wire.ledger import LaneReservation, Voucher
from darkbloom.wire.trust import ScoreAttestation
from darkbloom.wire.infer import (
    INFER_PROTOCOL,
    Accepted,
    ChoiceEnd,
    Delta,
    Done,
    Embeddings,
    ErrorFrame,
    InferRequest,
)

__all__ = ["InferCall", "error_from_frame", "is_final", "open_infer"]

log = logging.getLogger(__name__)
_tl = timeline("shim")

_REPLY = (Accepted, ErrorFrame)
_FRAMES = (Delta, ChoiceEnd, Embeddings, Done, ErrorFrame, Voucher, ScoreAttestation)
FINAL_VOUCHER_WAIT_S = 2.0  # after Done: how long aclose waits for the node's countersigned copy
RELEASE_WAIT_S = 2.0  # how long aclose waits for the release hook's work (closing a dropped lane at the ledger)


def error_from_frame(frame: ErrorFrame, peer_id: str, model: str = "") -> DarkbloomError:
    """Translate a node's ErrorFrame into the exception the shim acts on (once, here)."""
    code = frame.code
    if code == "bad_request":
        return InvalidRequest(frame.message, param=frame.param)
    if code == "context_length_exceeded":
        return ApiError(400, frame.message, code="context_length_exceeded", param=frame.param or "messages")
    if code == "model_not_found":
        return ModelNotFound(model or frame.message)
    if code == "no_capacity":
        return NoCapacity(frame.message, retry_after_s=frame.retry_after_s or 1.0)
    if code == "version_mismatch":
        return ProtocolMismatch(peer_id, INFER_PROTOCOL, frame.message)
    if code == "payment_required" and frame.param == "darkbloom.session":
        return LaneBusy("")  # the node still serves another request on the lane this one carried
    if code == "payment_required":
        return ApiError(402, frame.message, type="insufficient_quota", code="payment_required")
    if code == "cancelled":
        return StreamClosed(peer_id, "the node cancelled the request")
    return EngineFailed(f"node {peer_id[-8:]} failed: {frame.message}")


def is_final(exc: BaseException) -> bool:
    """True when another peer would refuse the request too (bad input): do not fail over."""
    if isinstance(exc, ApiError):
        return 400 <= exc.status < 500 and exc.status != 402  # 402: this node wants payment; others may not
    if isinstance(exc, LaneBusy):  # our lane was still busy on that node: another lane or node works
        return False
    return isinstance(exc, (InvalidRequest, LedgerError))  # bad input, or our own account cannot pay


class InferCall:
    """One request on one stream, after `Accepted`."""

    def __init__(
        self,
        stream: Any,
        request: InferRequest,
        accepted: Accepted,
        decoder: FrameDecoder,
        *,
        lane: Any | None = None,
        on_release: Callable[[str], None] | None = None,
        refill: Callable[[Any], Awaitable[LaneReservation | None]] | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.stream = stream
        self._refill = refill  # tops the lane up when it runs low: the new reservation, or None
        self.request = request
        self.accepted = accepted
        self._decoder = decoder
        self.lane = lane  # a darkbloom.ledger.lanes.ConsumerLane, or None when serving is free
        self._on_release = on_release
        self._max_frame_bytes = max_frame_bytes
        self.done: Done | None = None
        self.began = False  # the request was begun on the lane
        self._closed = False
        self._delta_tokens: dict[int, int] = {}  # choice -> completion tokens its Deltas carried
        # A voucher may be due (checked by `_voucher`): sent at the start of the next `receive()` once a
        # frame was handed on, so the frame that made it due reaches the client first.
        self._owed = False
        self._handed_on = False  # receive() has returned a content frame

    @property
    def peer_id(self) -> str:
        return self.stream.peer_id

    @property
    def route(self) -> str:
        return getattr(self.stream, "route", "direct")

    async def start_metering(self) -> None:
        """Begin the request on the lane and pay for the prompt (called once, after Accepted).

        For generation the prompt's voucher is owed, not sent: it goes out with the next
        `receive()` after the first frame was handed on (the node streams its first tokens
        without waiting for it, see `darkbloom.node.serve._Metered.gate`), so signing and
        writing it is off the first token's path. An embedding or a score waits for it at the
        node, so it goes at once.
        """
        if self.lane is None:
            return
        self.lane.begin_request(encode(self.request), self.accepted.digest)
        self.began = True
        self.lane.add_usage(prompt_tokens=self.accepted.prompt_tokens)
        if self.request.kind in ("chat", "completion"):
            self._owed = True
        else:
            await self._voucher(final=False)

    async def _voucher(self, *, final: bool) -> None:
        if self.lane is None:
            return
        if self._refill is not None and (reservation := await self._refill(self.lane)) is not None:
            # the node must hold the raised cap before it sees a voucher above the old one
            await self.stream.write(encode_frame(reservation, self._max_frame_bytes))
        now_ms = int(time.time() * 1000)
        if final:
            voucher = self.lane.final_voucher(now_ms=now_ms)
        elif self.lane.due():
            voucher = self.lane.next_voucher(now_ms=now_ms)
        else:
            return
        if voucher is not None:
            await self.stream.write(encode_frame(voucher, self._max_frame_bytes))

    def _countersigned(self, voucher: Voucher) -> None:
        try:
            self.lane.countersigned(voucher)
        except DarkbloomError as exc:  # a node that signs something else is misbehaving; stop here
            raise MalformedMessage(f"countersigned voucher refused: {exc}") from None

    async def receive(self) -> Delta | ChoiceEnd | Embeddings | ScoreAttestation | Done | None:
        """The next frame; None after Done. Typed errors for ErrorFrame, EOF or garbage."""
        if self.done is not None:
            return None
        if self._owed and self._handed_on:
            self._owed = False
            await self._voucher(final=False)
        while True:
            try:
                frame = await read_frame(self.stream.read, self._decoder, _FRAMES)
            except MalformedMessage:
                await self._reset()
                raise
            if frame is None:
                raise StreamClosed(self.peer_id, "stream ended before done")
            if isinstance(frame, ErrorFrame):
                raise error_from_frame(frame, self.peer_id, self.request.model)
            if isinstance(frame, Voucher):
                if self.lane is None:
                    raise MalformedMessage("a voucher on a free stream")
                self._countersigned(frame)
                continue
            if isinstance(frame, ScoreAttestation):  # the answer to a `score` request (spot check)
                if self.request.kind != "score":
                    raise MalformedMessage("a score attestation on a generation stream")
                return frame
            if frame.request_id != self.request.request_id:
                await self._reset()
                raise MalformedMessage(f"frame for request {frame.request_id!r} on the stream of {self.request.request_id!r}")
            if isinstance(frame, Delta) and self.lane is not None:
                self._delta_tokens[frame.index] = self._delta_tokens.get(frame.index, 0) + frame.tokens
                self.lane.add_usage(completion_tokens=frame.tokens)
                self._owed = True  # sent when the app asks for the next frame, after handing this one on
            if isinstance(frame, ChoiceEnd) and self.lane is not None:
                # Tokens the node counted without sending text for them (an end-of-sequence token, a
                # held-back stop string) come only in ChoiceEnd's total: pay for them as the node counts
                # them, or its unvouched count grows with every such request on this lane.
                folded = frame.completion_tokens - self._delta_tokens.get(frame.index, 0)
                if folded > 0:
                    self._delta_tokens[frame.index] = frame.completion_tokens
                    self.lane.add_usage(completion_tokens=folded)
                    self._owed = True
            if isinstance(frame, Done):
                self.done = frame
                self._owed = False  # the final voucher covers everything
                await self._voucher(final=True)
            self._handed_on = True
            return frame

    async def aclose(self) -> None:
        """Close after Done; reset before (the node stops generating). Idempotent, shielded."""
        if self._closed:
            return
        self._closed = True
        outcome = "unclean"
        with trio.move_on_after(FINAL_VOUCHER_WAIT_S + 2, shield=True):
            try:
                if self.done is not None:
                    if self.lane is not None:
                        outcome = await self._await_final_countersign()
                    await self.stream.close()
                else:
                    await self.stream.reset()
            except DarkbloomError:
                pass  # the stream is already gone, which is all we wanted
        if self.lane is not None and self._on_release is not None:
            await _released(self._on_release, outcome)

    async def _await_final_countersign(self) -> str:
        """After Done and the final voucher: read until the node's countersigned copy arrives.

        "clean" when it did; "unmetered" when the node closed without ever countersigning on
        this lane (it serves free); "unclean" otherwise.
        """
        with trio.move_on_after(FINAL_VOUCHER_WAIT_S):
            while self.lane.countersigned_latest is not self.lane.latest:
                frame = await read_frame(self.stream.read, self._decoder, (Voucher,))
                if frame is None:
                    if self.lane.countersigned_latest is None:
                        return "unmetered"
                    break
                self._countersigned(frame)
        return "clean" if self.lane.countersigned_latest is self.lane.latest else "unclean"

    async def _reset(self) -> None:
        self.done = None
        await self.aclose()


async def _released(on_release: Callable[[str], Any], outcome: str) -> None:
    pending = on_release(outcome)
    if pending is not None:
        with trio.move_on_after(RELEASE_WAIT_S, shield=True):
            await pending


async def open_infer(
    network: Any,
    peer_id: str,
    request: InferRequest,
    *,
    addrs: Sequence[str] = (),
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    lane: Any | None = None,
    on_release: Callable[[str], None] | None = None,
    refill: Callable[[Any], Awaitable[LaneReservation | None]] | None = None,
) -> InferCall:
    """Open a stream to `peer_id`, send `request`, return once the node has accepted it.

    Raises PeerUnreachable / ProtocolMismatch (from the network), StreamClosed or
    MalformedMessage (broken answer), or the error the node answered. With `lane`, the
    request must carry that lane's reservation in `session`; `on_release(outcome)` is called
    (and awaited, bounded, when it returns an awaitable, e.g. closing a dropped lane at the ledger)
    once the call is closed ("clean", "unclean" or "unmetered", see `InferCall.aclose`), or
    "busy" when the node refused the lane as still serving another request (LaneBusy).
    `refill(lane)`, when given, is asked before each voucher; a reservation it returns (the
    lane topped up at the ledger) is sent to the node ahead of the voucher.
    """
    decoder = FrameDecoder(max_frame_bytes)
    stream = None
    call: InferCall | None = None
    ok = False
    busy = False
    try:
        # The request rides with the protocol negotiation: the node starts on it one round trip sooner.
        _tl.mark(request.request_id, "stream_opening", lane=int(lane is not None))
        stream = await network.open_stream(peer_id, INFER_PROTOCOL, addrs=addrs,
                                           first=encode_frame(request, max_frame_bytes))
        _tl.mark(request.request_id, "stream_open")
        reply = await read_frame(stream.read, decoder, _REPLY)
        _tl.mark(request.request_id, "accepted")
        if reply is None:
            raise StreamClosed(peer_id, "stream ended before the node answered")
        if isinstance(reply, ErrorFrame):
            error = error_from_frame(reply, peer_id, request.model)
            if isinstance(error, LaneBusy) and lane is not None:
                busy = True
                raise LaneBusy(lane.lane)
            raise error
        if reply.request_id != request.request_id:
            raise MalformedMessage(f"accepted frame for another request {reply.request_id!r}")
        call = InferCall(stream, request, reply, decoder, lane=lane, on_release=on_release, refill=refill,
                         max_frame_bytes=max_frame_bytes)
        await call.start_metering()
        ok = True
        return call
    finally:
        if not ok:
            if stream is not None:
                with trio.move_on_after(2, shield=True):
                    try:
                        await stream.reset()
                    except DarkbloomError:
                        pass  # already closed by the node after its error frame
            if lane is not None and on_release is not None:
                # Untouched unless the request began on the lane (then the two chains may differ).
                await _released(on_release, "busy" if busy else "clean" if call is None or not call.began else "unclean")
