"""Host factory: a libp2p host from a Darkbloom identity, Noise only, Yamux, no dial stall.

The Ed25519 key pair comes from the identity's 32-byte seed, so the peer id is stable
across restarts and matches `darkbloom.p2p.keys.peer_id_from_public_key`.

Per-frame and per-stream costs of py-libp2p 0.8.1 worked around here (tests/p2p/test_yamux.py):
the muxer class actually used (defect 17: our `darkbloom.p2p.yamux.DarkbloomYamux`, with
queued frame writes and one flusher per connection, defects 16 and 18), Noise reads in large
pieces, and inbound multistream-select answered in one frame (the opener side, which
pipelines header and protocol, is `LibP2PNetwork._new_stream`). QUIC: docs/P2P-QUIC.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import multiaddr
import trio
from libp2p import new_swarm
from libp2p.abc import IRawConnection
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.host.basic_host import BasicHost
from libp2p.io.exceptions import ConnectionClosedError, IOException
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID

from darkbloom.errors import ConfigError, MalformedMessage
from darkbloom.identity import Identity
from darkbloom.p2p import multistream
from darkbloom.p2p.yamux import DarkbloomYamux, QuickLock

__all__ = ["DarkbloomHost", "DarkbloomNoise", "DarkbloomYamux", "QuickLock", "build_host", "key_pair_from_identity",
           "quick_state_lock", "tcp_sockets"]

log = logging.getLogger(__name__)


def key_pair_from_identity(identity: Identity) -> KeyPair:
    return create_new_key_pair(identity.seed)


class DarkbloomHost(BasicHost):
    """BasicHost whose advertised addresses we control.

    Workaround for 0.8.1 defect 4: `BasicHost.get_addrs()` strips everything after the
    first `/p2p/` component, so `<relay>/p2p/<relay-id>/p2p-circuit` became the relay's
    own direct address. We build the list ourselves and append `/p2p/<self>` correctly.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.advertised: list[multiaddr.Multiaddr] | None = None  # None: listen addrs
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    async def _swarm_stream_handler(self, net_stream: object) -> None:  # type: ignore[override]
        """Inbound multistream-select with answers written together (stream open, server side).

        0.8.1 reads each message one byte at a time and writes each answer as its own Yamux
        frame (header echo, then protocol). We read whatever arrived, answer every complete
        message, and write the answers in one frame before waiting for more: a pipelined
        opener (ours, go-libp2p, js-libp2p) gets its two answers in one frame, an
        interactive one gets them one by one as before. Bytes that follow the protocol
        (a lazy opener's first data) are handed to the handler ahead of the stream.
        """
        quick_state_lock(net_stream)
        handlers = self.multiselect.handlers
        buf = b""
        out = b""
        chosen: str | None = None
        hello = False
        try:
            with trio.fail_after(INBOUND_NEGOTIATE_S):
                while chosen is None:
                    msgs, buf = multistream.take(buf, 1)
                    if not msgs:
                        if out:
                            await net_stream.write(out)  # type: ignore[attr-defined]
                            out = b""
                        chunk = await net_stream.read(4096)  # type: ignore[attr-defined]
                        if not chunk:
                            raise StreamEOF("closed during negotiation")
                        buf += chunk
                        continue
                    msg = msgs[0]
                    if not hello:
                        if msg != multistream.HELLO:
                            raise MalformedMessage(f"multistream: expected the header, got {msg[:40]!r}")
                        hello = True
                        out += multistream.encode(multistream.HELLO)
                    elif msg == "ls":
                        out += multistream.encode("\n".join(str(p) for p in handlers if p) + "\n")
                    elif msg and handlers.get(msg) is not None:  # type: ignore[call-overload]
                        chosen = msg
                        out += multistream.encode(msg)
                    else:
                        out += multistream.encode("na")
                await net_stream.write(out)  # type: ignore[attr-defined]
        except (trio.TooSlowError, MalformedMessage, IOException, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("inbound negotiation failed: %s", exc)
            with trio.move_on_after(2, shield=True):
                try:
                    await net_stream.reset()  # type: ignore[attr-defined]
                except (IOException, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            return
        net_stream.set_protocol(chosen)  # type: ignore[attr-defined]
        handler = handlers[chosen]  # type: ignore[index]
        await handler(_Prefixed(net_stream, buf) if buf else net_stream)  # type: ignore[misc]

    def get_addrs(self) -> list[multiaddr.Multiaddr]:
        own = f"/p2p/{self.get_id()!s}"
        base = self.advertised if self.advertised is not None else self.get_transport_addrs()
        out = []
        for addr in base:
            text = str(addr)
            if text.endswith(own):
                out.append(addr)
            elif "/p2p-circuit" in text or "/p2p/" not in text:
                out.append(multiaddr.Multiaddr(text + own))
        return out


class _Prefixed:
    """A net stream whose first reads return bytes already read during negotiation."""

    def __init__(self, stream: object, early: bytes) -> None:
        self._stream = stream
        self._early = early

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)

    async def read(self, n: int | None = None) -> bytes:
        if self._early:
            n = len(self._early) if n is None else n
            data, self._early = self._early[:n], self._early[n:]
            return data
        return await self._stream.read(n)  # type: ignore[attr-defined, no-any-return]


INBOUND_NEGOTIATE_S = 10.0  # as py-libp2p's inbound negotiation timeout


def quick_state_lock(net_stream: object) -> None:
    """0.8.1's NetStream takes its state lock (a checkpoint) on every read and write, only
    around synchronous state checks and updates: the same lock, without the yield when free."""
    lock = getattr(net_stream, "_state_lock", None)
    if isinstance(lock, trio.Lock):
        net_stream._state_lock = QuickLock(lock)  # type: ignore[attr-defined]


_READ_AHEAD = 65536  # bytes asked of the connection below Noise per receive
_QUICK_READS = 16  # non-blocking receives in a row before one through trio (which yields)


class _ReadAhead(IRawConnection):
    """A raw connection read in large pieces, served to Noise in the small ones it asks for.

    0.8.1's Noise reader takes each message as two reads (2-byte length, then body), and
    each read of the layer below is a socket receive (TCP: a syscall, a lock and a trio
    checkpoint) or, on a relayed connection, a Yamux stream read on the circuit (locks,
    window bookkeeping). Found here: at 50 tokens/s x 200 streams the readers spent most of
    their CPU on these small reads. Here one receive takes whatever arrived (up to 64 KiB),
    and the following reads are served from it: Noise messages that arrived together cost
    one receive, and never more than two as before. Nothing is held back: a read returns
    what is buffered at once, and only waits when nothing is.
    """

    def __init__(self, conn: IRawConnection) -> None:
        self._conn = conn
        self._buf = b""
        self._pos = 0
        self.is_initiator = conn.is_initiator
        tcp = getattr(conn, "stream", None)  # 0.8.1's TrioTCPStream on a TCP connection
        sock = getattr(getattr(tcp, "stream", None), "socket", None)
        locks = (getattr(tcp, "write_lock", None), getattr(tcp, "read_lock", None))
        self._tcp = ((sock, *locks) if isinstance(sock, trio.socket.SocketType)
                     and all(isinstance(lock, trio.Lock) for lock in locks) else None)
        self._quick_reads = 0

    async def read(self, n: int | None = None) -> bytes:
        if self._pos < len(self._buf):
            end = len(self._buf) if n is None or n < 0 else min(len(self._buf), self._pos + n)
            data = self._buf[self._pos:end]
            self._pos = end
            return data
        chunk = self._read_now(max(n or 0, _READ_AHEAD))
        if chunk is None:
            chunk = await self._conn.read(max(n or 0, _READ_AHEAD))
        if n is None or n < 0 or len(chunk) <= n:
            return chunk
        self._buf, self._pos = chunk, n
        return chunk[:n]

    def _read_now(self, size: int) -> bytes | None:
        """On TCP, what the kernel already holds, without a trio checkpoint (found here): 0.8.1's
        read takes a trio lock and trio's receive yields after receiving, two waits behind every
        runnable task per receive. None: nothing there (or every `_QUICK_READS`th time, so a
        reader fed without pause still lets other tasks run): the library's awaiting read."""
        if self._tcp is None or self._tcp[2].locked() or self._quick_reads >= _QUICK_READS:
            self._quick_reads = 0
            return None
        fd = self._tcp[0].fileno()
        if fd == -1:  # closed: never read a number the kernel may have given to another file
            return None
        try:
            data = os.read(fd, size)
        except BlockingIOError:
            return None
        except OSError as exc:  # reset: as 0.8.1's TCP stream reports it
            raise ConnectionClosedError(f"TCP read failed: {exc}", transport="tcp") from exc
        self._quick_reads += 1
        return data

    async def write(self, data: bytes) -> None:
        """On TCP, first a non-blocking send (found here): 0.8.1's write takes a trio lock and
        trio's `send_all` yields after sending, two checkpoints per Noise message, each a wait
        behind every runnable task. When no write is in flight (its lock is free) the kernel
        takes the bytes at once and nothing yields; what it does not take goes the library's
        way (waiting for the socket), in order."""
        fd = self._tcp[0].fileno() if self._tcp is not None and not self._tcp[1].locked() else -1
        if fd != -1:  # -1: closed (never write to a number the kernel may have given to another file)
            try:
                sent = os.write(fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:  # reset, broken pipe, closed: as 0.8.1's TCP stream reports it
                raise ConnectionClosedError(f"TCP write failed: {exc}", transport="tcp") from exc
            if sent == len(data):
                return
            data = data[sent:]
        await self._conn.write(data)

    async def close(self) -> None:
        await self._conn.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._conn.get_remote_address()

    def get_transport_addresses(self) -> list[multiaddr.Multiaddr]:
        return self._conn.get_transport_addresses()

    def get_connection_type(self) -> object:  # type: ignore[override]
        return self._conn.get_connection_type()

    def __getattr__(self, name: str) -> object:  # conn_state(), stream, ... of the wrapped connection
        return getattr(self._conn, name)


class DarkbloomNoise(NoiseTransport):
    """Noise whose sessions read the connection below through `_ReadAhead` (TCP and circuits)."""

    async def secure_inbound(self, conn: IRawConnection) -> object:  # type: ignore[override]
        return await super().secure_inbound(_ReadAhead(conn))

    async def secure_outbound(self, conn: IRawConnection, peer_id: object) -> object:  # type: ignore[override]
        return await super().secure_outbound(_ReadAhead(conn), peer_id)  # type: ignore[arg-type]


def drop_closed_connections(host: BasicHost, peer: object) -> int:
    """Remove connections to `peer` that are closed but still listed by the swarm; return how
    many were dropped.

    Defect 20 (found here): a closed connection can stay in 0.8.1's connection table for a
    while (a relay that restarted, and the circuits through it). While it is listed,
    `BasicHost.connect` returns at once without dialling and `new_stream` filters it out and
    fails with "No valid connections available": the peer looks connected and unreachable at
    the same time. Dropping the closed entries lets the next dial happen."""
    table = getattr(host.get_network(), "connections", None)
    if not isinstance(table, dict) or peer not in table:
        return 0
    conns = table[peer]
    live = [c for c in conns if not getattr(c, "is_closed", False)]
    dropped = len(conns) - len(live)
    if dropped:
        if live:
            table[peer] = live
        else:
            del table[peer]
    return dropped


def tcp_sockets(host: BasicHost) -> list[object]:
    """The TCP sockets under a host's live connections (relayed ones run inside these)."""
    out = []
    for conns in host.get_network().get_connections_map().values():
        for conn in conns:
            raw = getattr(getattr(getattr(conn, "muxed_conn", None), "secured_conn", None), "conn", None)
            raw = getattr(raw, "read_writer", raw)  # the Noise reader/writer holds the raw connection
            raw = getattr(raw, "read_write_closer", raw)
            raw = getattr(raw, "_conn", raw)  # _ReadAhead
            sock = getattr(getattr(getattr(raw, "stream", None), "stream", None), "socket", None)
            if sock is not None:
                out.append(sock)
    return out


class _OnDemandOnly(AutoConnector):
    """The swarm's auto-connector dials toward a target of ~150 connections to every peer
    the peerstore ever heard of (NATed peers included); Darkbloom dials on demand."""

    async def maybe_connect(self) -> None:
        return None


def build_host(
    identity: Identity,
    *,
    listen_addrs: Sequence[str],
    quic: bool = False,
) -> DarkbloomHost:
    """A host offering Noise only and Yamux, with one connection per peer."""
    if quic:
        # Evaluated and refused, see docs/P2P-QUIC.md: QUIC in 0.8.1 ignores sec_opt (own
        # TLS), moves ~1 MB/s, and 200 concurrent streams on one connection all failed.
        raise ConfigError(
            "QUIC is not supported with py-libp2p 0.8.1 (measured: ~1 MB/s per stream, and 200 "
            "concurrent streams on one connection all failed; see docs/P2P-QUIC.md)",
            key="p2p.quic", hint="set p2p.quic = false (TCP + Noise + Yamux is used)",
        )
    # Defect 14 (found here): py-libp2p's Yamux sends a WINDOW_UPDATE after every read
    # (PY_YAMUX_RELEASE_ON_READ defaults to on), more frames than data for streamed
    # tokens; through a relay that tripled the per-token work. Off gives go-yamux's
    # batching (update at half the window). The knob is the library's own, read per call.
    os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")
    key_pair = key_pair_from_identity(identity)
    noise = DarkbloomNoise(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    try:
        addrs = [multiaddr.Multiaddr(a) for a in listen_addrs]
    except Exception as exc:  # multiaddr raises several kinds for bad text
        raise ConfigError(f"bad listen address: {exc}", key="p2p.listen_addrs") from None
    swarm = new_swarm(
        key_pair=key_pair,
        # Defect 1: a default host also offers TLS, SECIO and plaintext; Noise only here.
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={YAMUX_PROTOCOL_ID: DarkbloomYamux},  # defect 16: queued frame writes, one flusher
        listen_addrs=addrs,
        # Defect 2: with fewer than max_connections_per_peer connections the swarm
        # waits the full 250 ms happy-eyeballs delay after a successful dial.
        connection_config=ConnectionConfig(
            max_connections_per_peer=1,
            min_connections=0,
            low_watermark=0,
        ),
    )
    swarm.auto_connector = _OnDemandOnly(swarm=swarm)
    _use_our_yamux(swarm)
    slow_new_stream = swarm.new_stream

    async def new_stream(peer_id: object) -> object:  # every outbound stream (inbound: _swarm_stream_handler)
        stream = await slow_new_stream(peer_id)  # type: ignore[arg-type]
        quick_state_lock(stream)
        return stream

    swarm.new_stream = new_stream  # type: ignore[method-assign]
    return DarkbloomHost(network=swarm)


def _use_our_yamux(swarm: object) -> None:
    """Make the upgrader build DarkbloomYamux connections.

    Defect 17 (found here): `MuxerMultistream.new_conn` ignores the class given in
    `muxer_opt` for the Yamux protocol id and always builds the library's `Yamux`, so a
    Yamux subclass never runs. We replace `new_conn` on this swarm's muxer selector only:
    negotiate as before, then build the class we registered.
    """
    selector = swarm.upgrader.muxer_multistream  # type: ignore[attr-defined]

    async def new_conn(conn: object, peer_id: object) -> object:
        protocol, transport_class = await selector._selector.select(
            conn, conn.is_initiator, selector.negotiate_timeout  # type: ignore[attr-defined]
        )
        if protocol == YAMUX_PROTOCOL_ID:
            muxed = DarkbloomYamux(conn, peer_id, is_initiator=conn.is_initiator)  # type: ignore[arg-type, attr-defined]
        else:
            muxed = transport_class(conn, peer_id)
        return selector._annotate_connection(muxed, conn, protocol)

    selector.new_conn = new_conn
