"""An in-process `PeerNetwork`: same semantics as the libp2p one, for unit tests and the simulator.

A `MemoryHub` plays the wire and the DHT: it routes streams between networks, stores
provider entries (expiring after `provider_ttl_s`) and capability records (validated with
the same pure rules as on libp2p peers, older ones refused). Streams are pairs of bounded
pipes: a writer waits while the reader's buffer is full, never fails for being slow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import trio

from darkbloom.config import P2PConfig
from darkbloom.errors import PeerUnreachable, ProtocolMismatch, RecordRejected, StreamClosed
from darkbloom.identity import Identity
from darkbloom.p2p.api import Route
from darkbloom.p2p.core import NetworkCore
from darkbloom.p2p.keys import peer_id_from_public_key
from darkbloom.wire.codec import FrameDecoder

__all__ = ["MemoryHub", "MemoryNetwork", "MemoryStream", "open_memory_network"]

log = logging.getLogger(__name__)

DEFAULT_PIPE_BYTES = 256 * 1024  # like a Yamux receive window


class _Pipe:
    """One direction of a stream: bounded buffer, half-close, reset."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.eof = False
        self.reset = False
        self._lot = trio.lowlevel.ParkingLot()

    async def write(self, data: bytes, peer: str) -> None:
        view = memoryview(data)
        while view:
            if self.reset:
                raise StreamClosed(peer, "reset")
            if self.eof:
                raise StreamClosed(peer, "write after close")
            room = self.limit - len(self.buf)
            if room <= 0:
                await self._lot.park()
                continue
            self.buf += view[:room]
            view = view[room:]
            self._lot.unpark_all()
        await trio.lowlevel.checkpoint()

    async def read(self, n: int, peer: str) -> bytes:
        while True:
            if self.reset:
                raise StreamClosed(peer, "reset")
            if self.buf:
                out = bytes(self.buf[:n])
                del self.buf[:n]
                self._lot.unpark_all()
                await trio.lowlevel.checkpoint()
                return out
            if self.eof:
                await trio.lowlevel.checkpoint()
                return b""
            await self._lot.park()

    def close(self) -> None:
        self.eof = True
        self._lot.unpark_all()

    def abort(self) -> None:
        self.reset = True
        self.buf.clear()
        self._lot.unpark_all()


class MemoryStream:
    """A `darkbloom.p2p.api.Stream` over two `_Pipe`s."""

    def __init__(self, peer_id: str, protocol: str, route: Route, inbound: _Pipe, outbound: _Pipe, max_frame: int) -> None:
        self.peer_id = peer_id
        self.protocol = protocol
        self.route: Route = route
        self.decoder = FrameDecoder(max_frame)
        self._in = inbound
        self._out = outbound

    async def read(self, n: int = 65536) -> bytes:
        return await self._in.read(n, self.peer_id)

    async def write(self, data: bytes) -> None:
        await self._out.write(data, self.peer_id)

    async def close(self) -> None:
        self._out.close()
        await trio.lowlevel.checkpoint()

    async def reset(self) -> None:
        self._in.abort()
        self._out.abort()
        await trio.lowlevel.checkpoint()


class MemoryHub:
    """The shared medium: routes streams, stores providers and records. Clock injectable."""

    def __init__(self, *, clock: Callable[[], float] = time.time, provider_ttl_s: float | None = None) -> None:
        self.clock = clock
        self.provider_ttl_s = provider_ttl_s  # None: the record TTL of the providing network
        self.networks: dict[str, MemoryNetwork] = {}
        self.providers: dict[str, dict[str, tuple[float, tuple[str, ...]]]] = {}
        self.values: dict[str, bytes] = {}
        self.routes: dict[frozenset[str], Route] = {}  # optional per-pair route for simulations

    def route_between(self, a: str, b: str) -> Route:
        return self.routes.get(frozenset((a, b)), "direct")


class MemoryNetwork(NetworkCore):
    """A `PeerNetwork` living on a `MemoryHub`."""

    def __init__(self, hub: MemoryHub, identity: Identity, config: P2PConfig, *, reachability: str = "public") -> None:
        super().__init__(
            identity,
            record_ttl_s=config.record_ttl_s,
            announce_interval_s=config.announce_interval_s,
            max_record_bytes=config.max_record_bytes,
            max_streams_per_peer=config.max_streams_per_peer,
            providers_cache_s=0.0,
            clock=hub.clock,
        )
        self.hub = hub
        self.config = config
        self.reachability = "relayed" if reachability in ("private", "relayed") else "public"
        self._nursery: trio.Nursery | None = None
        self._connected: set[str] = set()

    @property
    def listen_addrs(self) -> tuple[str, ...]:
        return (f"/memory/{self.peer_id}/p2p/{self.peer_id}",)

    def _raw_addrs(self) -> tuple[str, ...]:
        return self.listen_addrs

    def peers(self) -> list[str]:
        return sorted(p for p in self._connected if p in self.hub.networks)

    async def open_stream(self, peer_id: str, protocol: str, *, addrs: Sequence[str] = (),
                          first: bytes = b"") -> MemoryStream:
        await trio.lowlevel.checkpoint()
        target = self.hub.networks.get(peer_id)
        if target is None or target._nursery is None:
            raise PeerUnreachable(peer_id, "not on the network")
        if protocol not in target._handlers:
            raise ProtocolMismatch(peer_id, protocol, ", ".join(sorted(target._handlers)))
        limit = DEFAULT_PIPE_BYTES
        a_to_b, b_to_a = _Pipe(limit), _Pipe(limit)
        route = self.hub.route_between(self.peer_id, peer_id)
        mine = MemoryStream(peer_id, protocol, route, b_to_a, a_to_b, self.config.max_frame_bytes)
        theirs = MemoryStream(self.peer_id, protocol, route, a_to_b, b_to_a, target.config.max_frame_bytes)
        self._connected.add(peer_id)
        target._connected.add(self.peer_id)
        target._nursery.start_soon(target._dispatch, protocol, theirs)
        if first:
            await mine.write(first)
        return mine

    # --- DHT operations on the hub ---------------------------------------------------

    async def _raw_provide(self, key: str) -> None:
        await trio.lowlevel.checkpoint()
        ttl = self.hub.provider_ttl_s if self.hub.provider_ttl_s is not None else self.record_ttl_s
        self.hub.providers.setdefault(key, {})[self.peer_id] = (self.hub.clock() + ttl, self.listen_addrs)

    async def _raw_find_providers(self, key: str, fresh: bool) -> list[tuple[str, tuple[str, ...]]]:
        await trio.lowlevel.checkpoint()
        now = self.hub.clock()
        entries = self.hub.providers.get(key, {})
        for peer in [p for p, (exp, _) in entries.items() if exp <= now]:
            del entries[peer]
        return [(p, addrs) for p, (_, addrs) in entries.items()]

    async def _raw_put_value(self, key: str, value: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.validate_value(key, value)
        old = self.hub.values.get(key)
        if old is not None and old != value and self.select_value(key, [old, value]) == 0:
            raise RecordRejected(key, "older than the stored record")
        self.hub.values[key] = value

    async def _raw_get_value(self, key: str, fresh: bool) -> bytes | None:
        await trio.lowlevel.checkpoint()
        return self.hub.values.get(key)

    async def run(self, *, task_status: trio.TaskStatus[MemoryNetwork] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.hub.networks[self.peer_id] = self
            try:
                nursery.start_soon(self._announce_loop)
                task_status.started(self)
                await trio.sleep_forever()
            finally:
                self.hub.networks.pop(self.peer_id, None)
                self._nursery = None


@asynccontextmanager
async def open_memory_network(
    hub: MemoryHub, identity: Identity, config: P2PConfig | None = None, *, reachability: str = "public"
) -> AsyncIterator[MemoryNetwork]:
    """A MemoryNetwork joined to `hub` for the duration of the block."""
    net = MemoryNetwork(hub, identity, config or P2PConfig(), reachability=reachability)
    if peer_id_from_public_key(identity.public_key) in hub.networks:
        raise ValueError("this identity is already on the hub")
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        try:
            yield net
        finally:
            nursery.cancel_scope.cancel()
