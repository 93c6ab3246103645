"""Host factory: a libp2p host from a Darkbloom identity, Noise only, Yamux, no dial stall.

The Ed25519 key pair comes from the identity's 32-byte seed, so the peer id is stable
across restarts and matches `darkbloom.p2p.keys.peer_id_from_public_key`.

Per-frame and per-stream costs of py-libp2p 0.8.1 worked around here (tests/p2p/test_yamux.py):
group-committed Yamux frame writes (defect 16), the muxer class actually used (defect 17),
receive credit returned in half-window batches (defect 18), a new stream's SYN sent with its
first write, and inbound multistream-select answered in one frame (the opener side, which
pipelines header and protocol, is `LibP2PNetwork._new_stream`). QUIC: docs/P2P-QUIC.md.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence

import multiaddr
import trio
from libp2p import new_swarm
from libp2p.abc import IRawConnection
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.host.basic_host import BasicHost
from libp2p.io.exceptions import IOException
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from darkbloom.errors import ConfigError, MalformedMessage
from darkbloom.identity import Identity
from darkbloom.p2p import multistream

__all__ = ["DarkbloomHost", "DarkbloomNoise", "DarkbloomYamux", "build_host", "key_pair_from_identity", "tcp_sockets"]

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


_WINDOW_UPDATE = b"\x01"  # Yamux frame type byte
_SYN = b"\x00\x01"  # Yamux flags field with only SYN set
INBOUND_NEGOTIATE_S = 10.0  # as py-libp2p's inbound negotiation timeout
_WRITE_STALL_S = 30.0  # a socket write that makes no progress this long breaks the connection


class _Batch:
    """Yamux frames queued while another task writes; written together in one Noise write."""

    __slots__ = ("done", "error", "frames", "written")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.done = trio.Event()
        self.written = False
        self.error: Exception | None = None


class DarkbloomYamux(Yamux):
    """Yamux whose frame writes are group-committed (0.8.1 defect 16, found here).

    0.8.1's `Yamux._write_frame` serialises every frame behind a lock and runs one Noise
    encryption and one socket send per frame (and formats a debug line per frame even with
    debug logging off). A token stream is one frame per token, so a relay carrying 200
    streams at 50 tokens/s did 10 000 encrypt+send rounds a second per side, and under CPU
    pressure every queued frame still paid the full cost. Here a frame that arrives while
    another task is writing joins a batch; the writing task then sends the whole batch as
    one Noise write (Noise chunks it at 65 519 bytes; Yamux frames need no alignment with
    Noise messages). Nothing waits for a timer: with no contention a frame goes out at once,
    and the busier the connection, the larger the batches. A writer returns once its frame
    was handed to the socket, as before, and sees the write's error if it failed.
    """

    _MAX_ROUNDS = 8  # batches one writer sends for others before handing the job on

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._batch = _Batch()
        self._flushing = False

    async def open_stream(self) -> object:  # type: ignore[override]
        stream = await super().open_stream()
        _batch_credit(stream)
        return stream

    async def accept_stream(self) -> object:  # type: ignore[override]
        stream = await super().accept_stream()
        _batch_credit(stream)
        return stream

    async def _write_frame(self, data: bytes) -> None:
        batch = self._batch
        batch.frames.append(data)
        if data[1:2] == _WINDOW_UPDATE and data[2:4] == _SYN:
            # A new outbound stream's SYN: every opener (multistream-select) writes its
            # header next, so the SYN rides in that write (one Noise message, one send).
            return
        while self._flushing:
            await batch.done.wait()
            if batch.error is not None:
                raise batch.error
            if batch.written:
                return
            # The writer left before sending this batch (cancelled): someone must take over.
        await self._flush()

    async def _flush(self) -> None:
        self._flushing = True
        rounds = 0
        try:
            while self._batch.frames and rounds < self._MAX_ROUNDS:
                if rounds:
                    await trio.lowlevel.checkpoint_if_cancelled()  # cancelled: hand on, below
                rounds += 1
                batch, self._batch = self._batch, _Batch()
                data = b"".join(batch.frames) if len(batch.frames) > 1 else batch.frames[0]
                # Shielded: the batch carries other tasks' frames, and a write cut short by
                # this task's cancellation would fail them all (and leave half a frame on the
                # wire). Bounded, so a peer that stops reading cannot pin this task forever.
                try:
                    with trio.CancelScope(shield=True, deadline=trio.current_time() + _WRITE_STALL_S):
                        await self.secured_conn.write(data)
                        batch.written = True
                except Exception as exc:  # the waiters of this batch get the write's error too
                    batch.error = exc
                if not batch.written and batch.error is None:
                    batch.error = trio.BrokenResourceError(f"Yamux write stalled for {_WRITE_STALL_S:.0f} s")
                batch.done.set()
                if batch.error is not None:
                    raise batch.error
        finally:
            self._flushing = False
            if self._batch.frames:  # hand the queued batch to one of its waiters
                waiting = self._batch.done
                self._batch.done = trio.Event()
                waiting.set()


def _batch_credit(stream: object) -> None:
    """Defect 18 (found here): a YamuxStream returns receive credit after every small read.

    In 0.8.1 a read of a few bytes on a stream whose window is nearly full takes the
    "partial slack" branch of `_auto_tune_and_send_window_update` and sends a WINDOW_UPDATE
    for those few bytes, whatever PY_YAMUX_RELEASE_ON_READ says: one extra frame per token
    read, which a relay forwards back to the sender. Here reads only add to the stream's
    pending release, and the library's own update runs with nothing newly read, so credit
    goes back (with auto-tuning) once half the window was consumed, as in go-yamux.

    Also here: the common case of a write or a read takes no lock (see `_fast_paths`).
    """
    update = stream._auto_tune_and_send_window_update  # type: ignore[attr-defined]

    async def batched(*, bytes_read: int = 0) -> None:
        if bytes_read > 0:
            async with stream.window_lock:  # type: ignore[attr-defined]
                stream._pending_recv_release += bytes_read  # type: ignore[attr-defined]
        await update(bytes_read=0)

    stream._auto_tune_and_send_window_update = batched  # type: ignore[attr-defined]
    _fast_paths(stream)


def _fast_paths(stream: object) -> None:
    """A Yamux stream write or read that takes no lock when nothing contends (found here).

    0.8.1's `YamuxStream.write` takes the stream's read-write lock and its window lock
    for every frame, and `read(n)` takes the connection's stream lock and the window lock:
    each `async with` on a trio lock is a scheduler checkpoint, so a token waits behind every
    other runnable task two or three times per layer. A relayed connection has two layers
    at each end (the circuit's own Yamux inside the relay connection's), and a node with 200
    streams has many runnable tasks: these waits were most of the latency a relay added.
    Here, when no task holds those locks and the data fits the send window (write) or is
    already buffered (read; an empty buffer is waited for on the library's own per-stream
    event, as its `read_stream` does), the same bookkeeping is done synchronously. The
    window and stream locks are not checked: the library holds them only across their own
    acquire checkpoint (the guarded updates are synchronous), so a synchronous update here
    cannot interleave with one there; a library writer holding the stream's write lock
    (mid-message, e.g. waiting for window) does send the fast path to the library's. (trio runs one task
    at a time, so no other task can interleave) and the frame is queued at once; otherwise
    the library's path runs unchanged. Frame order is kept: the library, too, queues a frame
    right after building it, with no checkpoint in between.
    """
    conn = stream.conn  # type: ignore[attr-defined]
    slow_write = stream.write  # type: ignore[attr-defined]
    slow_read = stream.read  # type: ignore[attr-defined]
    writer = stream.rw_lock._writer_lock  # type: ignore[attr-defined]
    sid = stream.stream_id  # type: ignore[attr-defined]

    async def write(data: bytes) -> None:
        size = len(data)
        if (0 < size <= stream.send_window and size <= _MAX_FRAME_DATA  # type: ignore[attr-defined]
                and not (stream.send_closed or stream.closed)  # type: ignore[attr-defined]
                and writer.value == 1):  # no library writer mid-message on this stream
            stream.send_window -= size  # type: ignore[attr-defined]
            await conn._write_frame(_DATA_HEADER.pack(0, 0, 0, sid, size) + data)
            return
        await slow_write(data)

    async def read(n: int | None = -1) -> bytes:
        while True:
            buffer = conn.stream_buffers.get(sid)
            if (n is None or n < 0 or buffer is None or stream.recv_closed or stream.closed  # type: ignore[attr-defined]
                    or stream.reset_received or conn.event_shutting_down.is_set()):  # type: ignore[attr-defined]
                return await slow_read(n)  # type: ignore[no-any-return]
            if buffer:
                break
            # Nothing buffered: wait for the reader task's signal, as read_stream does.
            event = conn.stream_events.get(sid)
            if event is None:
                return await slow_read(n)  # type: ignore[no-any-return]
            await event.wait()
            if conn.stream_events.get(sid) is event:
                conn.stream_events[sid] = trio.Event()
        data = bytes(buffer[:n])
        del buffer[:n]
        stream._pending_recv_release += len(data)  # type: ignore[attr-defined]
        threshold = stream._grow_threshold()  # type: ignore[attr-defined]
        grow = stream.target_recv_window - (stream.recv_window + len(buffer))  # type: ignore[attr-defined]
        if stream._pending_recv_release >= threshold or (grow > 0 and grow >= threshold):  # type: ignore[attr-defined]
            await stream._auto_tune_and_send_window_update(bytes_read=0)  # type: ignore[attr-defined]
        return data

    stream.write = write  # type: ignore[attr-defined]
    stream.read = read  # type: ignore[attr-defined]


_DATA_HEADER = struct.Struct("!BBHII")  # Yamux header: version, type (0 = DATA), flags, stream id, length
_MAX_FRAME_DATA = 64 * 1024 - 12  # as 0.8.1 splits writes: MAX_MESSAGE_SIZE minus the header


_READ_AHEAD = 65536  # bytes asked of the connection below Noise per receive


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

    async def read(self, n: int | None = None) -> bytes:
        if self._pos < len(self._buf):
            end = len(self._buf) if n is None or n < 0 else min(len(self._buf), self._pos + n)
            data = self._buf[self._pos:end]
            self._pos = end
            return data
        chunk = await self._conn.read(max(n or 0, _READ_AHEAD))
        if n is None or n < 0 or len(chunk) <= n:
            return chunk
        self._buf, self._pos = chunk, n
        return chunk[:n]

    async def write(self, data: bytes) -> None:
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
        muxer_opt={YAMUX_PROTOCOL_ID: DarkbloomYamux},  # defect 16: group-committed frame writes
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
