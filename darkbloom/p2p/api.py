"""The `PeerNetwork` interface that api, relay, node and sim code use instead of libp2p.

Two implementations: `darkbloom.p2p.network` (libp2p) and `darkbloom.p2p.memory` (in one
process, for unit tests and the simulator). Both give the same semantics: streams that
read `b""` at EOF and raise `StreamClosed` on reset, `ProtocolMismatch` when the remote does
not serve a protocol, `PeerUnreachable` when no path exists, discovery filtered to peers
whose signed capability record is valid now.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar, runtime_checkable

from darkbloom.wire.caps import CapabilityRecord
from darkbloom.wire.codec import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode_frame, read_frame

__all__ = [
    "Handler",
    "PeerNetwork",
    "Provider",
    "Route",
    "Stream",
    "recv_message",
    "send_message",
]

Route = Literal["direct", "relayed", "hole-punched"]
T = TypeVar("T")


@runtime_checkable
class Stream(Protocol):
    """One bidirectional byte stream to a peer, speaking one protocol."""

    peer_id: str
    protocol: str
    route: Route
    decoder: FrameDecoder  # per-stream frame decoder for recv_message

    async def read(self, n: int = 65536) -> bytes:
        """Up to n bytes; b"" at EOF. StreamClosed when the stream was reset."""

    async def write(self, data: bytes) -> None:
        """All of `data`, waiting for the reader as long as it takes (bounded buffering).

        May return once the data is queued for the connection (libp2p: before it reaches the
        socket); if the connection then fails, a later write or `close` raises StreamClosed."""

    async def close(self) -> None:
        """Half-close: the remote reads EOF; reading on this side stays possible.

        Returns once everything written is on its way (libp2p: on the socket); StreamClosed
        when the connection failed before this stream's written data left."""

    async def reset(self) -> None:
        """Abort both directions at once."""


Handler = Callable[[Stream], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Provider:
    """A peer that provides a model, with its verified capability record."""

    peer_id: str
    addrs: tuple[str, ...]
    record: CapabilityRecord
    route_hint: Route = "direct"  # "relayed" when it is reachable only through a circuit


@runtime_checkable
class PeerNetwork(Protocol):
    """What the rest of Darkbloom needs from the peer-to-peer layer."""

    peer_id: str

    @property
    def listen_addrs(self) -> tuple[str, ...]:
        """The real multiaddrs this peer listens on (port 0 resolved), with /p2p/<id>."""

    @property
    def announce_addrs(self) -> tuple[str, ...]:
        """What others should dial: public addrs, or /p2p-circuit addrs when relayed."""

    def serve(self, protocol: str, handler: Handler) -> None:
        """Run `handler(stream)` for each inbound stream of `protocol` (bounded per peer)."""

    async def open_stream(self, peer_id: str, protocol: str, *, addrs: Sequence[str] = (),
                          first: bytes = b"") -> Stream:
        """A new stream to `peer_id`, dialling `addrs` or known/recorded addresses.

        `first`: bytes to send at once, as if written right after the open; an implementation
        may send them along with the protocol negotiation (saving the round trip before them)."""

    async def provide(self, model_id: str) -> None:
        """Advertise `model_id` now and re-provide it before expiry until `unprovide`."""

    def unprovide(self, model_id: str) -> None:
        """Stop re-providing `model_id` (it vanishes from discovery within one expiry)."""

    async def find_providers(self, model_id: str, *, fresh: bool = False) -> list[Provider]:
        """Peers with a valid record serving `model_id`, deduplicated; `fresh` skips caches."""

    async def put_record(self, template: CapabilityRecord) -> CapabilityRecord:
        """Sign `template` (seq, times, addrs, reachability filled in), store it, keep it fresh."""

    async def get_record(self, peer_id: str, *, fresh: bool = False) -> CapabilityRecord | None:
        """The peer's valid capability record, or None."""

    def peers(self) -> list[str]:
        """Peer ids with an open connection now."""


async def send_message(stream: Stream, msg: object, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
    """Write one framed darkbloom.wire message."""
    await stream.write(encode_frame(msg, max_frame_bytes))


async def recv_message(stream: Stream, expect: type[T] | tuple[type, ...] | None = None) -> T | None:
    """Read one framed message with the stream's decoder; None at a clean EOF.

    MalformedMessage for a bad or oversize frame, StreamClosed when reset.
    """
    return await read_frame(stream.read, stream.decoder, expect)

