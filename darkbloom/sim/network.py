"""The simulated wire: per-link latency, loss and bandwidth, NAT types and relays, in virtual time.

`SimWorld` holds every node's network facts (region, NAT type, alive, relay reservation) and
turns `dial(src, dst, protocol)` into a `SimStream` pair after the right delay, or into
`PeerUnreachable` (after a dial timeout when the far side is silent: dead, partitioned, or its
relay is gone). Streams deliver bytes at `send time + path latency + size / bandwidth +
retransmission delays`, in order; no task runs per node or per message: a reader sleeps until
the head frame's delivery time. Everything runs on trio's clock, which the simulator replaces
with `MockClock(autojump_threshold=0)`, so an hour of network time costs only the CPU of the
events in it.

NAT model: `public` nodes are dialled directly; `full-cone` nodes are reached through their
relay first and then directly when a DCUtR hole punch succeeds (probability per pair, then
remembered); `symmetric` nodes only ever through their relay. Dialling out is always direct.
Not modelled: shared bandwidth between concurrent streams, TCP slow start, packet reordering.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import trio

from darkbloom.errors import PeerUnreachable, ProtocolMismatch, StreamClosed
from darkbloom.p2p.api import Route
from darkbloom.wire.codec import DEFAULT_MAX_FRAME_BYTES, FrameDecoder

if TYPE_CHECKING:
    from darkbloom.sim.dht import DhtNode
    from darkbloom.sim.peer import SimPeer
    from darkbloom.wire.caps import CapabilityRecord

__all__ = ["LinkParams", "NatType", "SimNode", "SimStream", "SimWorld"]

log = logging.getLogger(__name__)

NatType = Literal["public", "full-cone", "symmetric"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkParams:
    """How the simulated internet behaves. Latencies are one-way, in milliseconds."""

    intra_region_ms: float = 10.0
    inter_region_ms: float = 60.0  # any pair of regions not in `region_ms`
    region_ms: Mapping[tuple[str, str], float] = field(default_factory=dict)  # ("eu", "us") -> ms, symmetric
    jitter: float = 0.2  # per-pair latency spread: base * (1 + jitter * u), u in [0, 1)
    loss: float = 0.0  # per-frame loss probability on every link (retransmitted after rto)
    bandwidth_bps: float = 100e6  # each node's access link
    relay_bandwidth_bps: float = 50e6  # per circuit through a relay (relays are CPU-bound)
    rto_s: float = 0.2  # first retransmission timeout; doubles per loss
    max_retransmits: int = 6  # more losses in a row break the stream
    dial_timeout_s: float = 5.0  # a silent dial fails after this long
    connect_rtts: float = 2.0  # TCP + Noise + Yamux on a new connection
    stream_rtts: float = 0.5  # multistream-select on an existing connection
    hole_punch_success: float = 0.7  # DCUtR success between non-symmetric NATs


@dataclass(slots=True, kw_only=True)
class SimNode:
    """One node's network facts; the world mutates these as the scenario unfolds."""

    index: int
    peer_id: str
    region: str
    nat: NatType
    is_relay: bool = False
    alive: bool = True
    relay: str | None = None  # peer id of the relay holding our reservation (non-public only)
    net: SimPeer | None = None  # its PeerNetwork
    scopes: set[trio.CancelScope] | None = None  # running inbound handlers (cancelled on death)

    @property
    def ip(self) -> str:
        i = self.index + 1
        return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"

    @property
    def public(self) -> bool:
        return self.nat == "public"


class _Pipe:
    """One direction of a stream: frames with delivery times, EOF and reset as timed markers."""

    __slots__ = ("frames", "eof", "reset", "last_at", "_lot")

    def __init__(self) -> None:
        self.frames: deque[tuple[float, bytes | None]] = deque()  # b"" = EOF, None = broken
        self.eof = False
        self.reset = False
        self.last_at = 0.0
        self._lot = trio.lowlevel.ParkingLot()

    def push(self, at: float, data: bytes | None) -> None:
        at = max(at, self.last_at)
        self.last_at = at
        self.frames.append((at, data))
        self._lot.unpark_all()

    def abort(self) -> None:
        self.reset = True
        self._lot.unpark_all()

    async def read(self, n: int, peer: str) -> bytes:
        while True:
            if self.reset:
                raise StreamClosed(peer, "reset")
            if self.frames:
                at, data = self.frames[0]
                if at > trio.current_time():
                    await trio.sleep_until(at)
                    continue
                if data is None:
                    self.frames.popleft()
                    self.reset = True
                    raise StreamClosed(peer, "connection broke (too many losses)")
                if not data:
                    self.eof = True
                    return b""
                if len(data) <= n:
                    self.frames.popleft()
                    await trio.lowlevel.checkpoint()
                    return data
                self.frames[0] = (at, data[n:])
                await trio.lowlevel.checkpoint()
                return data[:n]
            if self.eof:
                return b""
            await self._lot.park()


@dataclass(slots=True)
class _Path:
    route: Route
    latency_s: float  # one way
    bandwidth_bps: float
    loss: float


class SimStream:
    """One side of a simulated stream (implements darkbloom.p2p.api.Stream)."""

    __slots__ = ("peer_id", "protocol", "route", "decoder", "_in", "_out", "_path", "_world", "_closed")

    def __init__(self, world: SimWorld, peer_id: str, protocol: str, path: _Path, inbound: _Pipe, outbound: _Pipe) -> None:
        self.peer_id = peer_id
        self.protocol = protocol
        self.route: Route = path.route
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
        self._in = inbound
        self._out = outbound
        self._path = path
        self._world = world
        self._closed = False

    async def read(self, n: int = 65536) -> bytes:
        return await self._in.read(n, self.peer_id)

    async def write(self, data: bytes) -> None:
        if self._out.reset or self._in.reset:
            raise StreamClosed(self.peer_id, "reset")
        if self._closed:
            raise StreamClosed(self.peer_id, "write after close")
        at = self._world.delivery_time(self._path, len(data))
        self._out.push(at if at is not None else trio.current_time() + self._world.links.dial_timeout_s, data if at is not None else None)
        self._world.stats["bytes"] += len(data)
        await trio.lowlevel.checkpoint()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._out.push(trio.current_time() + self._path.latency_s, b"")
        await trio.lowlevel.checkpoint()

    async def reset(self) -> None:
        self._in.abort()
        self._out.abort()
        await trio.lowlevel.checkpoint()


class SimWorld:
    """Every node's network facts and the rules that connect them. One per simulation."""

    def __init__(self, links: LinkParams, *, seed: int, epoch_s: float = 1_767_225_600.0) -> None:
        self.links = links
        self.rng = random.Random(seed)
        self.epoch_s = epoch_s  # virtual time 0 is this unix time (records carry real-looking times)
        self.nodes: dict[str, SimNode] = {}
        self.cut: set[frozenset[str]] = set()  # region pairs that cannot reach each other
        self.relay_down_detect_s = 0.0
        self._punched: dict[tuple[str, str], bool] = {}
        self._connected: set[tuple[str, str]] = set()
        self.stats: Counter[str] = Counter()
        self.nursery: trio.Nursery | None = None
        # while non-empty (warm start), DHT stores go by direct calls to these servers' nodes
        self.warm_dhts: dict[str, DhtNode] = {}
        # (key, value) -> record whose decoding and signature were verified (expiry is not cached)
        self.verified: dict[tuple[str, bytes], CapabilityRecord] = {}

    # --- time -----------------------------------------------------------------------

    def clock(self) -> float:
        """Unix time in the simulation (for records' issue and expiry times)."""
        return self.epoch_s + trio.current_time()

    # --- membership -------------------------------------------------------------------

    def add(self, node: SimNode) -> None:
        self.nodes[node.peer_id] = node

    def kill(self, peer_id: str) -> None:
        """The node vanishes without a word: its inbound handlers stop, dials to it go silent."""
        node = self.nodes[peer_id]
        node.alive = False
        for scope in list(node.scopes or ()):
            scope.cancel()

    def is_dht_server(self, peer_id: str) -> bool:
        node = self.nodes.get(peer_id)
        return node is not None and node.public

    # --- paths ------------------------------------------------------------------------

    def one_way_s(self, a: SimNode, b: SimNode) -> float:
        links = self.links
        if a.region == b.region:
            base = links.intra_region_ms
        else:
            base = links.region_ms.get((a.region, b.region), links.region_ms.get((b.region, a.region), links.inter_region_ms))
        # a stable per-pair spread (the same pair always has the same distance)
        u = ((a.index * 2654435761) ^ (b.index * 2654435761)) % 1000 / 1000.0
        return base * (1.0 + links.jitter * u) / 1000.0

    def _leg_ok(self, a: SimNode, b: SimNode) -> bool:
        return a.alive and b.alive and (a.region == b.region or frozenset((a.region, b.region)) not in self.cut)

    def path(self, src: SimNode, dst: SimNode) -> tuple[_Path | None, str]:
        """The path a dial would take, or (None, reason) when it goes nowhere (silently)."""
        links = self.links
        if dst.public or self._punched.get((src.peer_id, dst.peer_id)):
            if not self._leg_ok(src, dst):
                return None, "no answer"
            route: Route = "direct" if dst.public else "hole-punched"
            return _Path(route, self.one_way_s(src, dst), links.bandwidth_bps, links.loss), ""
        relay = self.nodes.get(dst.relay) if dst.relay else None
        if relay is None:
            return None, "no relay reservation"
        if not (self._leg_ok(src, relay) and self._leg_ok(relay, dst)):
            return None, "relay or peer gives no answer"
        loss = 1.0 - (1.0 - links.loss) ** 2
        latency = self.one_way_s(src, relay) + self.one_way_s(relay, dst)
        return _Path("relayed", latency, min(links.bandwidth_bps, links.relay_bandwidth_bps), loss), ""

    def delivery_time(self, path: _Path, size: int) -> float | None:
        """When `size` bytes sent now arrive, or None when the stream breaks on the way."""
        delay = path.latency_s + size * 8.0 / path.bandwidth_bps
        if path.loss > 0.0:
            rto = self.links.rto_s
            tries = 0
            while self.rng.random() < path.loss:
                tries += 1
                if tries > self.links.max_retransmits:
                    return None
                delay += rto
                rto *= 2
        return trio.current_time() + delay

    # --- dialling -----------------------------------------------------------------------

    async def dial(self, src_id: str, dst_id: str, protocol: str) -> SimStream:
        """Open a stream from `src_id` to `dst_id`; runs dst's handler in the world's nursery."""
        src = self.nodes[src_id]
        dst = self.nodes.get(dst_id)
        if dst is None or dst.net is None:
            await trio.lowlevel.checkpoint()
            raise PeerUnreachable(dst_id, "unknown peer")
        if not src.alive:
            await trio.lowlevel.checkpoint()
            raise PeerUnreachable(dst_id, "we are offline")
        path, reason = self.path(src, dst)
        if path is None:
            self.stats["dial_failures"] += 1
            if reason == "no relay reservation":
                await trio.lowlevel.checkpoint()
            else:
                await trio.sleep(self.links.dial_timeout_s)
            raise PeerUnreachable(dst_id, reason)
        pair = (src_id, dst_id) if src_id < dst_id else (dst_id, src_id)
        rtts = self.links.stream_rtts
        if pair not in self._connected:
            rtts += self.links.connect_rtts
            self._connected.add(pair)
        await trio.sleep(2.0 * path.latency_s * rtts)
        if not self._leg_ok(src, dst) and path.route != "relayed":
            raise PeerUnreachable(dst_id, "went away while dialling")
        if protocol not in dst.net.served:
            raise ProtocolMismatch(dst_id, protocol, ", ".join(sorted(dst.net.served)))
        if path.route == "relayed" and dst.nat == "full-cone" and src.nat != "symmetric":
            # DCUtR: the next streams between this pair go direct when the punch works
            self._punched[(src_id, dst_id)] = self.rng.random() < self.links.hole_punch_success
        self.stats[f"streams_{path.route}"] += 1
        a_to_b, b_to_a = _Pipe(), _Pipe()
        mine = SimStream(self, dst_id, protocol, path, b_to_a, a_to_b)
        theirs = SimStream(self, src_id, protocol, path, a_to_b, b_to_a)
        assert self.nursery is not None, "SimWorld.run() is not running"
        self.nursery.start_soon(self._serve_inbound, dst, protocol, theirs)
        return mine

    async def _serve_inbound(self, node: SimNode, protocol: str, stream: SimStream) -> None:
        with trio.CancelScope() as scope:
            if not node.alive:
                return
            if node.scopes is None:
                node.scopes = set()
            node.scopes.add(scope)
            try:
                assert node.net is not None
                await node.net._dispatch(protocol, stream)
            finally:
                node.scopes.discard(scope)

    async def run(self, *, task_status: trio.TaskStatus[SimWorld] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery inbound handlers run in, until cancelled."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                task_status.started(self)
                await trio.sleep_forever()
            finally:
                self.nursery = None
