"""NAT traversal: circuit relay v2 hop (relays), reservations and circuit dials (nodes, shims), dial-back.

Workarounds for py-libp2p 0.8.1, each named where it is applied:
- defect 3: the swarm drops `/p2p-circuit` addresses, so we dial circuits ourselves with
  `CircuitV2Transport.dial`; later `new_stream` reuses that connection;
- defect 5: the hop keyed active circuits by destination peer, so closing one client's
  circuit reset every other circuit to the same node; our forwarder only ever touches
  its own two streams;
- defect 6: the hop's writes failed after 5 s of a shut window (a slow reader) and reset
  the circuit; our forwarder waits for the window as long as the reader needs, so the
  relay buffers at most one Yamux window per direction;
- defect 7: default limits (4 reservations, 1 h / 1 GB per circuit) come from
  `darkbloom.config.RelayConfig` instead (1024 reservations, 6 h, 1 GiB by default);
- defect 10: a dialer configured with `RelayRole.CLIENT` reserves before every dial; our
  dialer uses `RelayRole.STOP` only.
Dial-back (`/darkbloom/dialback/1.0.0`): a relay tells a node whether its listen
addresses can be reached from outside; a node that cannot be reached becomes "relayed".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig as LibRelayConfig
from libp2p.relay.circuit_v2.config import RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.network.stream.exceptions import StreamEOF, StreamError

from darkbloom.config import RelayConfig
from darkbloom.errors import PeerUnreachable
from darkbloom.log import short_id
from darkbloom.p2p.api import Stream, recv_message, send_message
from darkbloom.p2p.host import drop_closed_connections
from darkbloom.p2p.yamux import DarkbloomYamux, when_on_socket
from darkbloom.wire.caps import DialBackReply, DialBackRequest

__all__ = [
    "DIALBACK_PROTOCOL",
    "DarkbloomHop",
    "RelayClient",
    "relay_limits",
    "write_all",
]

log = logging.getLogger(__name__)

DIALBACK_PROTOCOL = "/darkbloom/dialback/1.0.0"
DIALBACK_TIMEOUT_S = 2.0
_MAX_READ = 64 * 1024
_WINDOW_POLL_S = 0.005


def relay_limits(cfg: RelayConfig) -> RelayLimits:
    """Our relay limits (0.8.1 defect 7: defaults are 4 reservations, 1 h, 1 GB)."""
    return RelayLimits(
        duration=cfg.circuit_duration_s,
        data=cfg.circuit_max_bytes,
        max_circuit_conns=cfg.max_circuits_per_peer,
        max_reservations=cfg.max_reservations,
        reservation_ttl=3600,
    )


async def write_all(raw: object, data: bytes) -> None:
    """Write to a libp2p stream without ever tripping Yamux's 5 s window timeout (defect 6)."""
    muxed = getattr(raw, "muxed_stream", None)
    view = memoryview(data)
    while view:
        window = getattr(muxed, "send_window", None)
        if window is None:
            await raw.write(bytes(view))  # type: ignore[attr-defined]
            return
        if window <= 0:
            if getattr(muxed, "closed", False) or getattr(muxed, "send_closed", False):
                raise StreamError("closed while waiting for the reader")
            await trio.sleep(_WINDOW_POLL_S)
            continue
        n = min(window, len(view))
        await raw.write(bytes(view[:n]))  # type: ignore[attr-defined]
        view = view[n:]


class _StampedBuffer(bytearray):
    """A Yamux stream's receive buffer that remembers when its oldest unread byte arrived.

    Only installed while `DarkbloomHop.forward_delays` is recording (benchmarks): the
    library's reader `extend`s the buffer as frames are decoded and `read_stream` drains
    it with `clear()` or `del buf[:n]`; `taken` is the arrival time of the oldest byte of
    the last chunk read (bytes left behind by a partial read keep the older stamp).
    """

    def __init__(self, data: bytes = b"") -> None:
        super().__init__(data)
        self.since = time.perf_counter()
        self.taken = self.since

    def extend(self, data: object) -> None:  # type: ignore[override]
        if not self:
            self.since = time.perf_counter()
        super().extend(data)  # type: ignore[arg-type]

    def clear(self) -> None:
        self.taken = self.since
        super().clear()

    def __delitem__(self, key: object) -> None:  # type: ignore[override]
        self.taken = self.since
        super().__delitem__(key)  # type: ignore[arg-type]


def _stamp_arrivals(stream: object) -> _StampedBuffer | None:
    """Install a `_StampedBuffer` under a relayed Yamux stream (None when not Yamux)."""
    muxed = getattr(stream, "muxed_stream", None)
    conn = getattr(muxed, "conn", None)
    buffers = getattr(conn, "stream_buffers", None)
    sid = getattr(muxed, "stream_id", None)
    if buffers is None or sid not in buffers:
        return None
    stamped = _StampedBuffer(bytes(buffers[sid]))
    buffers[sid] = stamped
    return stamped


def _record_delay(delays: list[tuple[float, float]], dst_stream: object, arrived: float, began: float) -> None:
    """Append (arrival -> on the socket, write began -> on the socket) once the forwarded chunk
    is on the socket (a write returns once its frame is queued; darkbloom.p2p.yamux)."""
    conn = getattr(getattr(dst_stream, "muxed_stream", None), "conn", None)
    if isinstance(conn, DarkbloomYamux):
        when_on_socket(conn, lambda now: delays.append((now - arrived, now - began)))
    else:
        done = time.perf_counter()
        delays.append((done - arrived, done - began))


class DarkbloomHop(CircuitV2Protocol):
    """Circuit relay v2 hop with our forwarder (defects 5 and 6) and limits (defect 7)."""

    circuits_open = 0
    circuits_total = 0
    # Benchmarks set a list here: each forwarded chunk then appends the relay's own delay
    # (seconds from its oldest byte's arrival in the relay's Yamux buffer to the forwarded
    # write reaching the socket) and the part of it spent writing (queued for the
    # connection's flusher, Noise, send()).
    # Off (None) in production: no per-chunk work.
    forward_delays: list[tuple[float, float]] | None = None

    async def _relay_data(  # type: ignore[override]
        self,
        src_stream: object,
        dst_stream: object,
        peer_id: ID,
        deadline: float | None = None,
        circuit_data_limit: list[int] | None = None,
    ) -> None:
        # One direction of one circuit. Unlike 0.8.1 we never look circuits up by
        # peer id (defect 5): we close or reset exactly the two streams we were given.
        type(self).circuits_open += 1
        type(self).circuits_total += 1
        clean = False
        delays = type(self).forward_delays
        stamped = _stamp_arrivals(src_stream) if delays is not None else None
        try:
            while True:
                if deadline is not None and time.monotonic() > deadline:
                    log.info("circuit to %s reached its duration limit", short_id(str(peer_id)))
                    break
                try:
                    data = await src_stream.read(_MAX_READ)  # type: ignore[attr-defined]
                except StreamEOF:
                    data = b""
                if not data:
                    clean = True
                    break
                if circuit_data_limit is not None:
                    circuit_data_limit[0] -= len(data)
                    if circuit_data_limit[0] < 0:
                        log.info("circuit to %s reached its data limit", short_id(str(peer_id)))
                        break
                began = time.perf_counter() if stamped is not None else 0.0
                await write_all(dst_stream, data)  # waits for a slow reader (defect 6)
                if stamped is not None and delays is not None:
                    _record_delay(delays, dst_stream, stamped.taken, began)
        except (StreamError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("circuit direction ended: %s", exc)
        finally:
            type(self).circuits_open -= 1
            with trio.move_on_after(2, shield=True):
                try:
                    if clean:
                        await dst_stream.close()  # type: ignore[attr-defined]
                    else:
                        await src_stream.reset()  # type: ignore[attr-defined]
                        await dst_stream.reset()  # type: ignore[attr-defined]
                except Exception:  # the other side is gone already
                    pass


class RelayClient:
    """Accepts inbound circuits (STOP), dials through relays, holds a reservation."""

    def __init__(self, host: object) -> None:
        self.host = host
        self.stop_protocol = CircuitV2Protocol(host, allow_hop=False)  # type: ignore[arg-type]
        # Defect 10: RelayRole.CLIENT would RESERVE before every dial; STOP only here.
        self.dialer = CircuitV2Transport(host, self.stop_protocol, LibRelayConfig(roles=RelayRole.STOP))  # type: ignore[arg-type]
        self.reserver = CircuitV2Transport(host, self.stop_protocol, LibRelayConfig(roles=RelayRole.STOP | RelayRole.CLIENT))  # type: ignore[arg-type]
        self.reservations: dict[str, int] = {}  # relay peer id -> expiry (unix s)

    async def dial(self, peer: ID, circuit_addrs: Sequence[str]) -> None:
        """Connect to `peer` through one of its circuit addresses (defect 3)."""
        errors = []
        for addr in circuit_addrs:
            text = addr if addr.endswith(f"/p2p/{peer}") else addr + f"/p2p/{peer}"
            for attempt in (1, 2):
                try:
                    await self._reach_relay(addr)
                    await self.dialer.dial(multiaddr.Multiaddr(text))
                    return
                except Exception as exc:  # ConnectionError, RelayConnectionError, SwarmException...
                    # A connection to a relay that just restarted may only now be seen closed
                    # (defect 20): the second attempt drops it and dials the relay afresh.
                    if attempt == 2 or "No valid connections" not in str(exc):
                        errors.append(f"{text}: {exc}")
                        break
        raise PeerUnreachable(str(peer), "; ".join(errors) or "no circuit address")

    async def _reach_relay(self, circuit_addr: str) -> None:
        """Make sure the relay of a circuit address is connected by a live connection: one that
        closed when the relay restarted can stay listed (defect 20), and the library's circuit
        dial would then fail with "No valid connections available" instead of dialling it."""
        relay_part = circuit_addr.split("/p2p-circuit", 1)[0]
        if "/p2p/" not in relay_part:
            return
        relay_addr, relay_id = relay_part.rsplit("/p2p/", 1)
        relay = ID.from_base58(relay_id)
        drop_closed_connections(self.host, relay)  # type: ignore[arg-type]
        if not self.host.get_network().get_connections(relay):  # type: ignore[attr-defined]
            await self.host.connect(PeerInfo(relay, [multiaddr.Multiaddr(relay_addr)]))  # type: ignore[attr-defined]

    async def reserve(self, relay: ID) -> int:
        """Reserve a slot on `relay`; the expiry (unix s), or 0 when refused."""
        stream = await self.host.new_stream(relay, [HOP_PROTOCOL_ID])  # type: ignore[attr-defined]
        try:
            ok = await self.reserver._make_reservation(stream, relay)
        finally:
            with trio.move_on_after(2, shield=True):
                try:
                    await stream.close()
                except Exception:  # best effort
                    pass
        if not ok:
            return 0
        expiry = int(self.reserver._reservations.get(relay, 0))
        self.reservations[str(relay)] = expiry
        return expiry


def serve_dialback(network: object) -> None:
    """Relays: test whether a node's addresses accept TCP connections from here."""

    async def handle(stream: Stream) -> None:
        with trio.move_on_after(5) as scope:
            request = await recv_message(stream, DialBackRequest)
        if scope.cancelled_caught or request is None:
            return
        observed = _observed_ip(network, stream.peer_id)
        candidates: list[tuple[str, int]] = []
        for addr in request.addrs[:8]:
            ip, port = _ip_port(addr)
            if port:
                for host in dict.fromkeys([ip, observed]):
                    if host:
                        candidates.append((host, port))
        reachable: list[str] = []
        for host, port in dict.fromkeys(candidates):
            if await _tcp_open(host, port):
                reachable.append(f"/ip4/{host}/tcp/{port}")
        await send_message(stream, DialBackReply(reachable=tuple(reachable), observed_ip=observed or ""))

    network.serve(DIALBACK_PROTOCOL, handle)  # type: ignore[attr-defined]


def _observed_ip(network: object, peer_id: str) -> str:
    try:
        conns = network.host.get_network().get_connections(ID.from_base58(peer_id))  # type: ignore[attr-defined]
        remote = conns[0].muxed_conn.get_remote_address() if conns else None
        return remote[0] if remote else ""
    except Exception:  # no connection or no address: nothing observed
        return ""


def _ip_port(addr: str) -> tuple[str, int]:
    parts = addr.split("/")
    try:
        return parts[parts.index("ip4") + 1], int(parts[parts.index("tcp") + 1])
    except (ValueError, IndexError):
        return "", 0


async def _tcp_open(host: str, port: int) -> bool:
    with trio.move_on_after(DIALBACK_TIMEOUT_S):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return False
        await stream.aclose()
        return True
    return False
