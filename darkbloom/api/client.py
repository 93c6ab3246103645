"""The shim side of `/darkbloom/infer/1.0.0`: one `InferRequest` over one PeerNetwork stream.

`open_infer(network, peer_id, request)` opens the stream, sends the request and reads the
node's answer up to `Accepted`; an `ErrorFrame` becomes the matching typed error
(`InvalidRequest`, `ModelNotFound`, `NoCapacity`, ...). Then `receive()` returns `Delta`,
`ChoiceEnd`, `Embeddings` frames and `Done`, and None after `Done`. A stream that ends
before `Done` is a `StreamClosed`, never a silent end. `aclose()` before `Done` resets the
stream, which cancels the generation on the node.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import trio

from darkbloom.errors import (
    ApiError,
    DarkbloomError,
    EngineFailed,
    InvalidRequest,
    MalformedMessage,
    ModelNotFound,
    NoCapacity,
    ProtocolMismatch,
    StreamClosed,
)
from darkbloom.wire.codec import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode_frame, read_frame
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

_REPLY = (Accepted, ErrorFrame)
_FRAMES = (Delta, ChoiceEnd, Embeddings, Done, ErrorFrame)


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
    if code == "payment_required":
        return ApiError(402, frame.message, type="insufficient_quota", code="payment_required")
    if code == "cancelled":
        return StreamClosed(peer_id, "the node cancelled the request")
    return EngineFailed(f"node {peer_id[-8:]} failed: {frame.message}")


def is_final(exc: BaseException) -> bool:
    """True when another peer would refuse the request too (bad input): do not fail over."""
    if isinstance(exc, ApiError):
        return 400 <= exc.status < 500
    return isinstance(exc, InvalidRequest)


class InferCall:
    """One request on one stream, after `Accepted`."""

    def __init__(self, stream: Any, request: InferRequest, accepted: Accepted, decoder: FrameDecoder) -> None:
        self.stream = stream
        self.request = request
        self.accepted = accepted
        self._decoder = decoder
        self.done: Done | None = None
        self._closed = False

    @property
    def peer_id(self) -> str:
        return self.stream.peer_id

    @property
    def route(self) -> str:
        return getattr(self.stream, "route", "direct")

    async def receive(self) -> Delta | ChoiceEnd | Embeddings | Done | None:
        """The next frame; None after Done. Typed errors for ErrorFrame, EOF or garbage."""
        if self.done is not None:
            return None
        try:
            frame = await read_frame(self.stream.read, self._decoder, _FRAMES)
        except MalformedMessage:
            await self._reset()
            raise
        if frame is None:
            raise StreamClosed(self.peer_id, "stream ended before done")
        if isinstance(frame, ErrorFrame):
            raise error_from_frame(frame, self.peer_id, self.request.model)
        if frame.request_id != self.request.request_id:
            await self._reset()
            raise MalformedMessage(f"frame for request {frame.request_id!r} on the stream of {self.request.request_id!r}")
        if isinstance(frame, Done):
            self.done = frame
        return frame

    async def aclose(self) -> None:
        """Close after Done; reset before (the node stops generating). Idempotent, shielded."""
        if self._closed:
            return
        self._closed = True
        with trio.move_on_after(2, shield=True):
            try:
                if self.done is not None:
                    await self.stream.close()
                else:
                    await self.stream.reset()
            except DarkbloomError:
                pass  # the stream is already gone, which is all we wanted

    async def _reset(self) -> None:
        self.done = None
        await self.aclose()


async def open_infer(
    network: Any,
    peer_id: str,
    request: InferRequest,
    *,
    addrs: Sequence[str] = (),
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> InferCall:
    """Open a stream to `peer_id`, send `request`, return once the node has accepted it.

    Raises PeerUnreachable / ProtocolMismatch (from the network), StreamClosed or
    MalformedMessage (broken answer), or the error the node answered.
    """
    stream = await network.open_stream(peer_id, INFER_PROTOCOL, addrs=addrs)
    decoder = FrameDecoder(max_frame_bytes)
    ok = False
    try:
        await stream.write(encode_frame(request, max_frame_bytes))
        reply = await read_frame(stream.read, decoder, _REPLY)
        if reply is None:
            raise StreamClosed(peer_id, "stream ended before the node answered")
        if isinstance(reply, ErrorFrame):
            raise error_from_frame(reply, peer_id, request.model)
        if reply.request_id != request.request_id:
            raise MalformedMessage(f"accepted frame for another request {reply.request_id!r}")
        ok = True
        return InferCall(stream, request, reply, decoder)
    finally:
        if not ok:
            with trio.move_on_after(2, shield=True):
                try:
                    await stream.reset()
                except DarkbloomError:
                    pass  # already closed by the node after its error frame
