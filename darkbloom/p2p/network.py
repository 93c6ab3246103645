"""The libp2p `PeerNetwork`: host, DHT, bootstrap, discovery and streams for one role.

`open_network(config, identity, role=...)` owns its nursery and yields once listening;
`wait_joined()` returns once a bootstrap peer answered. Roles: "relay" (DHT server and
circuit relay hop, see darkbloom.p2p.relay), "node" (DHT server when publicly reachable,
client and relayed otherwise), "shim" (DHT client).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Literal

import multiaddr
import trio
from libp2p.abc import INotifee
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.tools.anyio_service import background_trio_service

from darkbloom.config import P2PConfig, RelayConfig, bundled_bootstrap_file, load_bootstrap_file
from darkbloom.errors import ConfigError, P2PError, PeerUnreachable, ProtocolMismatch, RecordRejected, StreamClosed
from darkbloom.identity import Identity
from darkbloom.log import short_id
from darkbloom.p2p import multistream
from darkbloom.p2p.api import Route, recv_message, send_message
from darkbloom.p2p.core import NetworkCore
from darkbloom.p2p.dht import CapsValidator, DarkbloomDHT, DHTMode
from darkbloom.p2p.host import DarkbloomHost, build_host, drop_closed_connections
from darkbloom.p2p.relay import DIALBACK_PROTOCOL, DarkbloomHop, RelayClient, relay_limits, serve_dialback
from darkbloom.p2p.yamux import QueuedWriteFailed, QuickLock
from darkbloom.wire.caps import DialBackReply, DialBackRequest
from darkbloom.wire.codec import FrameDecoder

__all__ = ["LibP2PNetwork", "LibP2PStream", "Role", "open_network", "open_relay_service"]

log = logging.getLogger(__name__)

Role = Literal["relay", "node", "shim"]
_WINDOW_POLL_S = 0.005
NEGOTIATE_TIMEOUT_S = 10.0  # as py-libp2p's outbound negotiation timeout
LAZY_FIRST_MAX = 64 * 1024  # first stream data sent with the negotiation, well inside Yamux's 256 KiB window
_MSS_HELLO = multistream.encode(multistream.HELLO)


class ProtocolRefused(Exception):
    """The remote answered something other than our protocol ("na"): internal to open_stream."""


def _route_of(conn: object) -> Route:
    try:
        addrs = conn.get_transport_addresses()  # type: ignore[attr-defined]
    except Exception:  # not every muxer exposes addresses
        return "direct"
    return "relayed" if any("/p2p-circuit" in str(a) for a in addrs) else "direct"


class LibP2PStream:
    """A libp2p stream behind the `darkbloom.p2p.api.Stream` interface."""

    def __init__(self, raw: object, peer_id: str, protocol: str, route: Route, max_frame: int) -> None:
        self.raw = raw
        self.peer_id = peer_id
        self.protocol = protocol
        self.route: Route = route
        self.decoder = FrameDecoder(max_frame)
        self._write_lock = QuickLock()  # free: no yield (a token write passes no checkpoint)
        self.early = b""  # bytes read with the negotiation answers, returned first

    async def read(self, n: int = 65536) -> bytes:
        if self.early:
            data, self.early = self.early[:n], self.early[n:]
            return data
        try:
            return await self.raw.read(n)  # type: ignore[attr-defined]
        except StreamEOF:
            return b""
        except (StreamError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise StreamClosed(self.peer_id, type(exc).__name__) from exc

    async def write(self, data: bytes) -> None:
        # Workaround for 0.8.1 defect 6: YamuxStream.write gives up (and the stream is
        # reset) when the peer's window stays shut for 5 s, i.e. when the reader pauses.
        # We never hand it more than the open window, and wait here for as long as the
        # reader needs: a slow reader only slows the writer. Buffering stays bounded by
        # the Yamux receive window on the reader's side.
        muxed = getattr(self.raw, "muxed_stream", None)
        view = memoryview(data)
        async with self._write_lock:
            try:
                while view:
                    window = getattr(muxed, "send_window", None)
                    if window is None:
                        await self.raw.write(bytes(view))  # type: ignore[attr-defined]
                        return
                    if window <= 0:
                        if getattr(muxed, "closed", False) or getattr(muxed, "send_closed", False):
                            raise StreamClosed(self.peer_id, "closed while waiting for the reader")
                        await trio.sleep(_WINDOW_POLL_S)
                        continue
                    n = min(window, len(view))
                    await self.raw.write(bytes(view[:n]))  # type: ignore[attr-defined]
                    view = view[n:]
            except (StreamError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise StreamClosed(self.peer_id, type(exc).__name__) from exc

    async def close(self) -> None:
        try:
            await self.raw.close()  # type: ignore[attr-defined]
        except QueuedWriteFailed as exc:  # written data never left: the caller must know
            raise StreamClosed(self.peer_id, "connection failed before queued data was sent") from exc
        except (StreamError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # already gone

    async def reset(self) -> None:
        try:
            await self.raw.reset()  # type: ignore[attr-defined]
        except (StreamError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # already gone


class _Watcher(INotifee):
    """Wakes the bootstrap loop when a connection closes, and remembers whose."""

    def __init__(self) -> None:
        self.changed = trio.Event()
        self.lost: set[str] = set()  # peer ids whose connection closed since the loop last looked

    async def opened_stream(self, network: object, stream: object) -> None:
        return None

    async def closed_stream(self, network: object, stream: object) -> None:
        return None

    async def connected(self, network: object, conn: object) -> None:
        return None

    async def disconnected(self, network: object, conn: object) -> None:
        peer = getattr(getattr(conn, "muxed_conn", None), "peer_id", None)
        if peer is not None:
            self.lost.add(str(peer))
        self.changed.set()

    async def listen(self, network: object, multiaddr: object) -> None:
        return None

    async def listen_close(self, network: object, multiaddr: object) -> None:
        return None


def bootstrap_addrs(config: P2PConfig, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """Bootstrap multiaddrs: --bootstrap, config, and the bootstrap file."""
    addrs = list(extra) + list(config.bootstrap)
    if config.bootstrap_file:
        addrs += load_bootstrap_file(config.bootstrap_file)
    elif config.use_bundled_bootstrap and bundled_bootstrap_file().exists():
        addrs += load_bootstrap_file(bundled_bootstrap_file())
    seen: dict[str, None] = {}
    for a in addrs:
        seen.setdefault(a, None)
    return tuple(seen)


class LibP2PNetwork(NetworkCore):
    """The libp2p implementation of `darkbloom.p2p.api.PeerNetwork`."""

    def __init__(
        self,
        config: P2PConfig,
        identity: Identity,
        *,
        role: Role = "node",
        bootstrap: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
        relay_config: RelayConfig | None = None,
    ) -> None:
        super().__init__(
            identity,
            record_ttl_s=config.record_ttl_s,
            announce_interval_s=config.announce_interval_s,
            max_record_bytes=config.max_record_bytes,
            max_streams_per_peer=config.max_streams_per_peer,
            providers_cache_s=config.providers_cache_s,
            clock=clock,
        )
        if config.announce_interval_s >= config.record_ttl_s:
            raise ConfigError(
                f"announce_interval_s ({config.announce_interval_s}) must be below record_ttl_s "
                f"({config.record_ttl_s}), or records expire between announcements",
                key="p2p.announce_interval_s", hint="lower p2p.announce_interval_s to about a fifth of p2p.record_ttl_s",
            )
        self.config = config
        self.role: Role = role
        self.bootstrap = bootstrap_addrs(config, bootstrap)
        self._bootstrap_infos = [self._parse_peer_addr(a) for a in self.bootstrap]
        if role == "shim":
            self.reachability = "public"  # a shim dials out; it is never dialled
        elif config.reachability == "private":
            self.reachability = "relayed"
        else:
            self.reachability = "public"
        self.host: DarkbloomHost = build_host(identity, listen_addrs=config.listen_addrs, quic=config.quic)
        if str(self.host.get_id()) != self.peer_id:
            raise AssertionError("libp2p peer id differs from darkbloom.p2p.keys")  # a bug, not input
        mode = DHTMode.SERVER if role == "relay" or (role == "node" and self.reachability == "public") else DHTMode.CLIENT
        self.dht = DarkbloomDHT(self.host, mode, CapsValidator(self.validate_value, self.select_value))
        self._joined = trio.Event()
        self.joins = 0  # times a bootstrap peer answered after none did
        self._join_changed = trio.Event()
        self._watcher = _Watcher()
        self._nursery: trio.Nursery | None = None
        self.relay_config = relay_config or RelayConfig()
        self.relay_client = RelayClient(self.host)
        self.hop: DarkbloomHop | None = None
        self.dcutr = DCUtRProtocol(self.host)
        self.hole_punched: set[str] = set()
        self.hole_punch_results: dict[str, bool] = {}  # peer id -> outcome of the last attempt
        self.reachability_known = trio.Event()
        self._reserve_now = trio.Event()
        self.relay_ready = trio.Event()  # a reservation holds and circuit addrs are advertised
        self._dial_locks: dict[str, trio.Lock] = {}
        self._circuit_dialed: set[str] = set()

    # --- addresses ------------------------------------------------------------------

    @staticmethod
    def _parse_peer_addr(addr: str) -> PeerInfo:
        try:
            return info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:  # multiaddr / InvalidAddrError
            raise ConfigError(f"bad peer address {addr!r}: {exc}", key="p2p.bootstrap",
                              hint="use /ip4/<ip>/tcp/<port>/p2p/<peer-id>") from None

    @property
    def listen_addrs(self) -> tuple[str, ...]:
        own = f"/p2p/{self.peer_id}"
        return tuple(str(a) + own for a in self.host.get_transport_addrs())

    def _raw_addrs(self) -> tuple[str, ...]:
        return tuple(str(a) for a in self.host.get_addrs())

    def set_advertised(self, addrs: Sequence[str] | None) -> None:
        """Addresses identify, provider records and our capability record carry."""
        self.host.advertised = None if addrs is None else [multiaddr.Multiaddr(a) for a in addrs]

    @property
    def dht_mode(self) -> str:
        return self.dht.mode.value.lower()

    def peers(self) -> list[str]:
        return [str(p) for p in self.host.get_connected_peers()]

    # --- streams --------------------------------------------------------------------

    def serve(self, protocol: str, handler: object) -> None:
        super().serve(protocol, handler)  # type: ignore[arg-type]

        async def on_stream(raw: object) -> None:
            conn = raw.muxed_conn  # type: ignore[attr-defined]
            stream = LibP2PStream(raw, str(conn.peer_id), protocol, _route_of(conn), self.config.max_frame_bytes)
            await self._dispatch(protocol, stream)

        self.host.set_stream_handler(protocol, on_stream)  # type: ignore[arg-type]

    async def connect(self, peer_id: str, addrs: Sequence[str] = ()) -> None:
        """Make sure a connection to `peer_id` exists (dialling `addrs` or known ones).

        Concurrent callers for one peer share one dial: without this, 100 requests to a
        relayed node opened 100 circuits and hit the per-peer connection limit.
        """
        pid = ID.from_base58(peer_id)
        if self._live_connection(pid):
            return
        lock = self._dial_locks.setdefault(peer_id, trio.Lock())
        try:
            async with lock:
                if self._live_connection(pid):
                    return
                await self._dial(pid, peer_id, addrs)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._dial_locks.pop(peer_id, None)

    def _live_connection(self, pid: ID) -> bool:
        """Whether the swarm holds a connection to `pid` that is not closed; closed ones still
        listed are dropped first (defect 20, `host.drop_closed_connections`)."""
        drop_closed_connections(self.host, pid)
        return bool(self.host.get_network().get_connections(pid))

    async def find_node(self, peer_id: str, key: bytes, *, addrs: Sequence[str] = ()) -> list[tuple[str, tuple[str, ...]]]:
        """One Kademlia FIND_NODE to one peer: the peers it knows closest to `key`, with addrs.

        For the crawler (read-only); PeerUnreachable when the peer cannot be dialled. An
        empty list when it answers nothing in libp2p's query timeout.
        """
        await self.connect(peer_id, addrs)
        pid = ID.from_base58(peer_id)
        try:
            found = await self.dht.peer_routing._query_peer_for_closest(pid, key)
        except Exception as exc:  # libp2p raises many kinds; translate once here
            raise P2PError(f"FIND_NODE to {peer_id[-8:]} failed: {exc}") from exc
        store = self.host.get_peerstore()
        out = []
        for other in found:
            try:
                other_addrs = tuple(str(a) for a in store.addrs(other))
            except Exception:  # the peerstore raises PeerStoreError for a peer without addrs
                other_addrs = ()
            out.append((str(other), other_addrs))
        return out

    async def _dial(self, pid: ID, peer_id: str, addrs: Sequence[str]) -> None:
        direct = [multiaddr.Multiaddr(a) for a in addrs if "/p2p-circuit" not in a]
        circuit = [a for a in addrs if "/p2p-circuit" in a]
        if not direct and not circuit:
            record = self._cache.get(peer_id, self.now_ms())
            if record is not None:
                direct = [multiaddr.Multiaddr(a) for a in record.addrs if "/p2p-circuit" not in a]
                circuit = [a for a in record.addrs if "/p2p-circuit" in a]
        known = [a for a in self.host.get_peerstore().addrs(pid) if "/p2p-circuit" not in str(a)] if self._known(pid) else []
        errors: list[str] = []
        if direct or known:
            self._forget_dial_failure(pid)
            try:
                with trio.fail_after(self.config.dial_timeout_s):
                    await self.host.connect(PeerInfo(pid, [_strip_p2p(a) for a in direct] + known))
                return
            except trio.TooSlowError:
                errors.append("direct dial timed out")
            except Exception as exc:  # libp2p raises SwarmException, OpenConnectionError, OSError...
                errors.append(f"direct: {exc}")
        if circuit:
            try:
                with trio.fail_after(self.config.dial_timeout_s):
                    await self.relay_client.dial(pid, circuit)  # defect 3: swarm cannot dial these
                self._circuit_dialed.add(peer_id)  # a later direct connection is a hole punch
            except trio.TooSlowError:
                raise PeerUnreachable(peer_id, "; ".join(errors + ["relay dial timed out"])) from None
            if self._nursery is not None and self.role != "relay" and self.config.hole_punch:
                self._nursery.start_soon(self._try_hole_punch, pid)
            return
        raise PeerUnreachable(peer_id, "; ".join(errors) or "no known address")

    async def _try_hole_punch(self, pid: ID) -> None:
        """DCUtR direct upgrade after a relayed dial; the relayed path stays if it fails."""
        ok = False
        with trio.move_on_after(self.config.dial_timeout_s):
            try:
                ok = await self.dcutr.initiate_hole_punch(pid)
            except Exception as exc:  # DCUtR raises many kinds; the circuit keeps working
                log.debug("hole punch to %s failed: %s", short_id(str(pid)), exc)
        self.hole_punch_results[str(pid)] = ok
        if ok:
            self.hole_punched.add(str(pid))
        log.info("hole punch to %s: %s", short_id(str(pid)), "direct" if ok else "failed, staying relayed")

    def _forget_dial_failure(self, pid: ID) -> None:
        # Workaround for 0.8.1 defect 15 (found here): after one failed dial the swarm
        # refuses every dial to that peer for 60 s ("negative cache"), so a relay that
        # restarts, or a node that comes back, stays unreachable for a minute. Our dials
        # are deliberate (bootstrap with backoff, a request to this peer): let them try.
        cache = getattr(self.host.get_network(), "_negative_peer_cache", None)
        if cache is not None:
            cache.evict(str(pid))

    def _known(self, pid: ID) -> bool:
        try:
            return bool(self.host.get_peerstore().addrs(pid))
        except Exception:  # PeerStoreError
            return False

    async def open_stream(self, peer_id: str, protocol: str, *, addrs: Sequence[str] = (),
                          first: bytes = b"") -> LibP2PStream:
        if peer_id == self.peer_id:
            raise PeerUnreachable(peer_id, "that is this peer")
        await self.connect(peer_id, addrs)
        pid = ID.from_base58(peer_id)
        lazy = first if len(first) <= LAZY_FIRST_MAX else b""
        try:
            try:
                raw, early = await self._new_stream(pid, protocol, lazy)
            except StreamError:
                if not lazy:
                    raise
                # A peer that refuses the protocol may read our early data as its next proposal
                # and reset the stream before its "na" reaches us: ask again without data, so
                # that a refusal is reported as one (a rare, failing path: one round trip more).
                lazy = b""
                raw, early = await self._new_stream(pid, protocol)
        except ProtocolRefused as exc:
            offered = ", ".join(_offered(self.host, pid, prefix="/darkbloom/"))
            raise ProtocolMismatch(peer_id, protocol, offered) from exc
        except trio.TooSlowError:
            raise PeerUnreachable(peer_id, f"stream: no protocol answer in {NEGOTIATE_TIMEOUT_S:.0f} s") from None
        except Exception as exc:  # StreamError, MuxedStreamError, SwarmException, MalformedMessage...
            if _is_protocol_refusal(exc):
                offered = ", ".join(_offered(self.host, pid, prefix="/darkbloom/"))
                raise ProtocolMismatch(peer_id, protocol, offered) from exc
            raise PeerUnreachable(peer_id, f"stream: {exc}") from exc
        conn = raw.muxed_conn
        route = _route_of(conn)
        if route == "direct" and (peer_id in self.hole_punched or peer_id in self._circuit_dialed):
            route = "hole-punched"
        stream = LibP2PStream(raw, peer_id, protocol, route, self.config.max_frame_bytes)
        stream.early = early
        if first and not lazy:
            await stream.write(first)  # too big to send ahead of the answer: within the peer's window
        return stream

    async def _new_stream(self, pid: ID, protocol: str, first: bytes = b"") -> tuple[object, bytes]:
        """A negotiated stream and any bytes the remote sent after its answer.

        Instead of `host.new_stream` (multistream-select header, wait, protocol, wait: two
        round trips, and the answers read one byte at a time), we send the header and the
        protocol in one write and read both answers together: one round trip. The remote
        side is unchanged (it reads one message at a time, as the spec allows pipelining).
        `first` (stream data) goes in the same write, ahead of the answers ("lazy" negotiation:
        our listener hands bytes that follow the protocol to the handler; a peer refusing the
        protocol reads them as a next proposal and the refusal still reaches us as "na").
        """
        raw = await self.host.get_network().new_stream(pid)
        ok = False
        try:
            with trio.fail_after(NEGOTIATE_TIMEOUT_S):
                await raw.write(_MSS_HELLO + multistream.encode(protocol) + first)
                buf = b""
                answers: list[str] = []
                while len(answers) < 2:
                    try:
                        chunk = await raw.read(4096)
                    except StreamEOF:
                        chunk = b""
                    if not chunk:
                        raise StreamError("stream closed during protocol negotiation")
                    buf += chunk
                    more, buf = multistream.take(buf, 2 - len(answers))
                    answers += more
            if answers[0] != multistream.HELLO:  # a peer that is not multistream-select
                raise StreamError(f"not a multistream-select answer: {answers[0][:40]!r}")
            if answers[1] != protocol:
                raise ProtocolRefused(answers[1])
            raw.set_protocol(protocol)  # type: ignore[attr-defined]
            ok = True
            return raw, buf  # bytes after the two answers are stream data (a server that speaks first)
        finally:
            if not ok:
                with trio.move_on_after(2, shield=True):
                    try:
                        await raw.reset()
                    except Exception:  # already gone
                        pass

    # --- DHT ------------------------------------------------------------------------

    async def _raw_provide(self, key: str) -> None:
        try:
            await self.dht.provide(key)
        except Exception as exc:  # libp2p's DHT raises many kinds
            raise P2PError(f"provide failed: {exc}") from exc

    async def _raw_find_providers(self, key: str, fresh: bool) -> list[tuple[str, tuple[str, ...]]]:
        keep_local = self.dht.mode == DHTMode.SERVER
        try:
            infos = await self.dht.fresh_providers(key, keep_local=keep_local)
        except Exception as exc:  # libp2p's DHT raises many kinds; translate once here
            raise P2PError(f"provider lookup failed: {exc}") from exc
        return [(str(i.peer_id), tuple(str(a) for a in i.addrs)) for i in infos]

    async def _raw_put_value(self, key: str, value: bytes) -> None:
        try:
            await self.dht.put_value(key, value)
        except RecordRejected:
            raise
        except ValueError as exc:  # "Refusing to replace newer value with the older one"
            raise RecordRejected(key, str(exc)) from exc

    async def _raw_get_value(self, key: str, fresh: bool) -> bytes | None:
        try:
            return await self.dht.fresh_value(key, keep_local=self.dht.mode == DHTMode.SERVER)
        except Exception as exc:  # libp2p's DHT raises many kinds; translate once here
            raise P2PError(f"record lookup failed: {exc}") from exc

    # --- bootstrap ------------------------------------------------------------------

    async def wait_joined(self) -> None:
        """Return once a bootstrap peer answered (at once when there is none)."""
        await self._joined.wait()

    @property
    def joined(self) -> bool:
        return self._joined.is_set()

    async def wait_joins(self, count: int) -> None:
        """Return once the network (re)joined through a bootstrap peer `count` times."""
        while self.joins < count:
            await self._join_changed.wait()

    async def _bootstrap_once(self) -> int:
        ok = 0
        for info in self._bootstrap_infos:
            if info.peer_id == self.host.get_id():
                continue
            self.dht.trust(info.peer_id)
            self._forget_dial_failure(info.peer_id)
            try:
                with trio.fail_after(self.config.dial_timeout_s):
                    await self.host.connect(info)
                    await self.dht.add_peer(info.peer_id)
                ok += 1
            except trio.TooSlowError:
                log.debug("bootstrap %s: timed out", short_id(str(info.peer_id)))
            except Exception as exc:  # dial failures come in many types
                log.debug("bootstrap %s: %s", short_id(str(info.peer_id)), exc)
        return ok

    def _bootstrap_connected(self) -> bool:
        net = self.host.get_network()
        return any(net.get_connections(i.peer_id) for i in self._bootstrap_infos if i.peer_id != self.host.get_id())

    async def _bootstrap_loop(self) -> None:
        bootstrap_ids = {str(i.peer_id) for i in self._bootstrap_infos if i.peer_id != self.host.get_id()}
        if not bootstrap_ids:
            self._joined.set()
            return
        delay = 0.25
        first = True
        rejoin = True
        while True:
            if rejoin or not self._bootstrap_connected():
                count = await self._bootstrap_once()
                if count:
                    log.info("%s joined the DHT through %d bootstrap peer(s)", short_id(self.peer_id), count)
                    self._joined.set()
                    rejoin = False
                    delay = 0.25
                    with trio.move_on_after(self.config.dial_timeout_s):
                        await self.dht.refresh_routing_table()
                    await self._on_joined(first)
                    first = False
                    self.joins += 1
                    self._join_changed.set()
                    self._join_changed = trio.Event()
                else:
                    if delay >= 2:
                        log.warning("no bootstrap peer answers; retrying in %.0f s", delay)
                    await trio.sleep(delay)
                    delay = min(delay * 2, self.config.bootstrap_retry_max_s)
                    continue
            self._watcher.changed = trio.Event()
            if self._bootstrap_connected() and not self._watcher.lost & bootstrap_ids:
                await self._watcher.changed.wait()
            # A bootstrap connection closed (the relay restarted): rejoin, re-reserve and re-announce
            # even when another part of this process (ledger client, a dial) reconnected first.
            rejoin = bool(self._watcher.lost & bootstrap_ids)
            self._watcher.lost.clear()

    async def _on_joined(self, first: bool) -> None:
        """Announce again after a (re)join; re-reserve when relayed."""
        self._reserve_now.set()
        if not first:
            self.request_announce()

    # --- reachability and reservations ------------------------------------------------

    async def _check_reachability(self) -> None:
        """Nodes: ask a relay to dial us back; unreachable nodes go relayed."""
        await self._joined.wait()
        if self.config.reachability == "auto":
            reachable = await self._dial_back()
            if reachable is not None and not reachable:
                self.reachability = "relayed"
        if self.reachability == "relayed":
            await self.dht.switch_mode(DHTMode.CLIENT)
            log.warning("%s is not reachable from outside: serving through relays", short_id(self.peer_id))
        self.reachability_known.set()
        if self.reachability == "relayed":
            await self._reservation_loop()

    async def _dial_back(self) -> list[str] | None:
        """Addresses a relay reached; None when no relay could answer."""
        listen = [a.split("/p2p/")[0] for a in self.listen_addrs]
        for info in self._bootstrap_infos:
            try:
                with trio.fail_after(self.config.dial_timeout_s):
                    stream = await self.open_stream(str(info.peer_id), DIALBACK_PROTOCOL)
                    await send_message(stream, DialBackRequest(addrs=tuple(listen)))
                    reply = await recv_message(stream, DialBackReply)
                    await stream.close()
            except (trio.TooSlowError, P2PError) as exc:
                log.debug("dial-back through %s failed: %s", short_id(str(info.peer_id)), exc)
                continue
            if reply is not None:
                return list(reply.reachable)
        return None

    async def _reservation_loop(self) -> None:
        while True:
            self._reserve_now = trio.Event()
            circuits: list[str] = []
            expiries: list[int] = []
            for info, addr in zip(self._bootstrap_infos, self.bootstrap):
                if not self.host.get_network().get_connections(info.peer_id):
                    continue
                try:
                    with trio.fail_after(self.config.dial_timeout_s):
                        expiry = await self.relay_client.reserve(info.peer_id)
                except (trio.TooSlowError, Exception) as exc:  # noqa: BLE001 - dial errors vary
                    log.warning("reservation on %s failed: %s", short_id(str(info.peer_id)), exc)
                    continue
                if expiry:
                    circuits.append(addr + "/p2p-circuit")
                    expiries.append(expiry)
            if circuits:
                # Defect 4: announce_addrs would mangle these; DarkbloomHost.get_addrs keeps them.
                self.set_advertised(circuits)
                log.info("%s reserved on %d relay(s); advertising %s", short_id(self.peer_id), len(circuits),
                         ", ".join(self.announce_addrs))
                self.request_announce()
                self.relay_ready.set()
            wait = max(5.0, (min(expiries) - time.time()) / 2) if expiries else 2.0
            with trio.move_on_after(wait):
                await self._reserve_now.wait()

    # --- lifecycle ------------------------------------------------------------------

    async def _extra_services(self, nursery: trio.Nursery) -> None:
        if self.role == "relay":
            self.hop = DarkbloomHop(self.host, limits=relay_limits(self.relay_config), allow_hop=True)  # type: ignore[arg-type]
            await nursery.start(_run_service, self.hop)
            serve_dialback(self)
        else:
            await nursery.start(_run_service, self.relay_client.stop_protocol)
            if self.config.hole_punch:
                await nursery.start(_run_service, self.dcutr)
            if self.role == "node":
                nursery.start_soon(self._check_reachability)
            else:
                self.reachability_known.set()

    async def run(self, *, task_status: trio.TaskStatus[LibP2PNetwork] = trio.TASK_STATUS_IGNORED) -> None:
        listen = [multiaddr.Multiaddr(a) for a in self.config.listen_addrs]
        async with self.host.run(listen_addrs=listen):
            if listen and not self.host.get_network().listeners:
                # py-libp2p 0.8.1 logs a failed listen (port in use, address not local) and
                # carries on with no address; a role that cannot be dialled must stop here.
                raise OSError(errno.EADDRINUSE, f"cannot listen on {', '.join(self.config.listen_addrs)}: address in use or not local")
            self.host.get_network().register_notifee(self._watcher)
            async with background_trio_service(self.dht):
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    if self.config.announce_addrs:
                        self.set_advertised(self.config.announce_addrs)
                    await self._extra_services(nursery)
                    nursery.start_soon(self._bootstrap_loop)
                    nursery.start_soon(self._announce_loop)
                    log.info(
                        "%s listening on %s (%s, DHT %s)",
                        short_id(self.peer_id), ", ".join(self.listen_addrs), self.role, self.dht_mode,
                    )
                    task_status.started(self)
                    try:
                        await trio.sleep_forever()
                    finally:
                        self._nursery = None
                        nursery.cancel_scope.cancel()
                        await self._close_connections()

    async def _close_connections(self) -> None:
        # Workaround for 0.8.1 defect 12 (found here): when a host stops, the sockets of
        # the connections it dialled stay open, so those peers never notice it left and
        # their next stream to it hangs for the 10 s negotiation timeout. Close them.
        network = self.host.get_network()
        with trio.move_on_after(2, shield=True):
            for conns in list(network.get_connections_map().values()):
                for conn in conns:
                    for closer in (conn, getattr(conn, "muxed_conn", None),
                                   getattr(getattr(conn, "muxed_conn", None), "secured_conn", None)):
                        try:
                            if closer is not None:
                                await closer.close()
                        except Exception:  # already broken; closing is best effort here
                            log.debug("closing a connection failed", exc_info=True)


async def _run_service(service: object, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async with background_trio_service(service):  # type: ignore[arg-type]
        await service.event_started.wait()  # type: ignore[attr-defined]
        task_status.started()
        await trio.sleep_forever()


def _strip_p2p(addr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    text = str(addr)
    if "/p2p/" in text:
        return multiaddr.Multiaddr(text[: text.index("/p2p/")])
    return addr


def _is_protocol_refusal(exc: BaseException) -> bool:
    """The remote answered "na" to our protocol (not: negotiation timed out or broke).

    Every multistream-select failure is a MultiselectClientError, including "response timed
    out after 10s" on an overloaded peer; only the "not supported" answer is a refusal.
    """
    seen = 0
    while exc is not None and seen < 6:
        name = type(exc).__name__
        text = str(exc).lower()
        if name == "ProtocolNotSupportedError" or "not supported" in text:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return False


def _offered(host: DarkbloomHost, pid: ID, *, prefix: str) -> list[str]:
    try:
        return sorted(str(p) for p in host.get_peerstore().get_protocols(pid) or [] if str(p).startswith(prefix))
    except Exception:  # PeerStoreError
        return []


@asynccontextmanager
async def open_network(
    config: P2PConfig,
    identity: Identity,
    *,
    role: Role = "node",
    bootstrap: Sequence[str] = (),
    clock: Callable[[], float] = time.time,
    relay_config: RelayConfig | None = None,
) -> AsyncIterator[LibP2PNetwork]:
    """A running LibP2PNetwork (listening) for the duration of the block.

    role="relay" is the relay service: DHT server, circuit relay hop with
    `relay_config` limits, dial-back; see also `open_relay_service`.
    """
    net = LibP2PNetwork(config, identity, role=role, bootstrap=bootstrap, clock=clock, relay_config=relay_config)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        try:
            yield net
        finally:
            nursery.cancel_scope.cancel()



def open_relay_service(
    config: P2PConfig, identity: Identity, relay_config: RelayConfig, *, bootstrap: Sequence[str] = ()
) -> AbstractAsyncContextManager[LibP2PNetwork]:
    """What `darkbloom relay` runs: DHT server + circuit relay hop + dial-back."""
    return open_network(config, identity, role="relay", bootstrap=bootstrap, relay_config=relay_config)
