"""The status protocol `/darkbloom/status/1.0.0`: ask a peer for its live load and version.

One exchange per stream: `StatusRequest` -> `StatusReply` (or `ErrorFrame` with
`version_mismatch`). A peer that speaks another major version, or does not serve the
protocol at all, is a `ProtocolMismatch`, never a hang; a peer that opens a stream and
never writes is cut off after `READ_TIMEOUT_S`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from darkbloom.errors import ProtocolMismatch, StreamClosed
from darkbloom.p2p.api import PeerNetwork, Stream, recv_message, send_message
from darkbloom.wire.infer import PROTOCOL_VERSION, STATUS_PROTOCOL, ErrorFrame, StatusReply, StatusRequest

__all__ = ["READ_TIMEOUT_S", "major", "query_status", "serve_status"]

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 10.0


def major(version: str) -> str:
    return version.split(".", 1)[0]


def serve_status(network: PeerNetwork, reply: Callable[[], StatusReply]) -> None:
    """Answer status requests with `reply()` (called per request; must be cheap)."""

    async def handle(stream: Stream) -> None:
        with trio.move_on_after(READ_TIMEOUT_S) as scope:
            request = await recv_message(stream, StatusRequest)
        if scope.cancelled_caught:
            raise StreamClosed(stream.peer_id, "no request within the read timeout")
        if request is None:
            return
        if major(request.version) != major(PROTOCOL_VERSION):
            await send_message(
                stream,
                ErrorFrame(
                    request_id="",
                    code="version_mismatch",
                    message=f"this peer speaks status {PROTOCOL_VERSION}, not {request.version}",
                ),
            )
            return
        await send_message(stream, reply())

    network.serve(STATUS_PROTOCOL, handle)


async def query_status(network: PeerNetwork, peer_id: str, *, version: str = PROTOCOL_VERSION) -> StatusReply:
    """The peer's StatusReply. Callers bound the time with fail_after.

    ProtocolMismatch when the peer does not speak our version, StreamClosed when it hangs
    up early, MalformedMessage when it answers garbage, PeerUnreachable when no path exists.
    """
    stream = await network.open_stream(peer_id, STATUS_PROTOCOL)
    try:
        await send_message(stream, StatusRequest(version=version))
        await stream.close()
        answer = await recv_message(stream, (StatusReply, ErrorFrame))
    except BaseException:
        with trio.move_on_after(1, shield=True):
            await stream.reset()
        raise
    if answer is None:
        raise StreamClosed(peer_id, "no status reply")
    if isinstance(answer, ErrorFrame):
        if answer.code == "version_mismatch":
            raise ProtocolMismatch(peer_id, f"{STATUS_PROTOCOL} version {version}", answer.message)
        raise StreamClosed(peer_id, f"status error {answer.code}")
    if major(answer.protocol) != major(version):
        raise ProtocolMismatch(peer_id, f"protocol {version}", answer.protocol)
    return answer


