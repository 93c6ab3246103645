"""Our Yamux connection: queued frame writes drained by one flusher task, batched credit, lock-free fast paths.

Works around py-libp2p 0.8.1's per-frame costs (defects 16 and 18, found here) and takes the
socket write off the writing task's path (docs/P2P-RELAY-CAPACITY.md, finding 7):

- A stream write returns once its frame is queued on the connection. One flusher task per
  connection, started in the connection's own nursery (the one `Yamux.start` opens for its
  reader), drains the queue into one Noise write per pass. The writer passes no trio
  checkpoint: with 200 token tasks runnable, every checkpoint used to cost a full pass of the
  run queue (Noise write, TCP write lock, send_all), several per token and per Yamux layer.
- On a relayed connection the circuit's flusher, having queued its batch on the relay
  connection (the Yamux below), writes that connection's queue itself when its flusher is
  not mid-write: one task wake per token batch instead of two.
- Bounded: a DATA frame waits while the connection holds `max_queued_bytes` not yet on the
  socket (the batch being written counts), unless the queue is empty; so queued bytes never
  exceed the bound plus one frame. Control frames (12 bytes: credit, ACK, ping) never wait,
  because the library's reader task writes some of them and must not block on the socket.
- Order: one FIFO per connection, so a stream's frames (and its FIN after its data) reach the
  socket in the order they were written. FIN, RST and GO_AWAY wait until they are on the
  socket, so `close()` returns after the stream's data left, as before.
- Errors: when a socket write fails (or stalls `_WRITE_STALL_S`), or the connection's tasks
  end, the connection is marked failed: queued frames are dropped, waiting writers raise
  `QueuedWriteFailed`, every later write raises it, and a stream's `close()` raises it when
  any of that stream's frames never reached the socket (never silently lost, never a hang).
  The connection below is closed so the library's reader tears the connection down.
- Flow control is the library's: the send window is taken when a frame is built (before it
  is queued), exactly as before; a DATA frame whose writer is cancelled while waiting for
  room gives its window back.
"""

from __future__ import annotations

import collections
import logging
import struct
import time
from collections.abc import Callable

import trio
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.stream_muxer.yamux.yamux import Yamux

__all__ = ["DarkbloomYamux", "MAX_QUEUED_BYTES", "QueuedWriteFailed", "QuickLock", "when_on_socket"]

log = logging.getLogger(__name__)

MAX_QUEUED_BYTES = 512 * 1024  # per connection: bytes queued or being written before DATA writers wait
_WRITE_STALL_S = 30.0  # a socket write that makes no progress this long breaks the connection
_HEADER = struct.Struct("!BBHII")  # Yamux header: version, type, flags, stream id, length
_DATA, _WINDOW_UPDATE, _GO_AWAY = 0, 1, 3
_SYN, _FIN, _RST = 0x1, 0x4, 0x8
_MAX_FRAME_DATA = 64 * 1024 - 12  # as 0.8.1 splits writes: MAX_MESSAGE_SIZE minus the header


class QueuedWriteFailed(ConnectionClosedError):
    """The connection failed before queued frames reached the socket.

    A `ConnectionClosedError` on purpose: 0.8.1 treats that as "connection gone" where that
    is harmless (a read's credit update, a connection's GO_AWAY), and our stream `close()`
    re-raises it when the stream's own frames were lost.
    """


class QuickLock:
    """A trio lock whose uncontended acquire does not yield to the scheduler (found here).

    `async with trio.Lock()` is a checkpoint even when the lock is free: the task goes to the
    back of the run queue, behind every runnable task (200 token tasks on a busy node). Where a
    lock is free it is taken at once; where it is held, the caller waits on it as before.
    """

    __slots__ = ("_lock",)

    def __init__(self, lock: trio.Lock | None = None) -> None:
        self._lock = lock if lock is not None else trio.Lock()

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


class DarkbloomYamux(Yamux):
    """Yamux whose frame writes are queued and written by one flusher task per connection."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # The reader takes this lock for every frame it decodes, around synchronous updates
        # only (`close` holds it across its GO_AWAY write): a checkpoint per frame read.
        self.streams_lock = QuickLock(self.streams_lock)  # type: ignore[assignment]
        self.max_queued_bytes = MAX_QUEUED_BYTES
        self._queue: list[bytes] = []
        self._queued_bytes = 0  # queued + being written
        self.peak_queued_bytes = 0  # highest `_queued_bytes` seen (tests check the bound)
        self.room_waits = 0  # DATA frames that waited for the queue to drain
        self._enqueued_seq = 0  # frames queued so far
        self._written_seq = 0  # frames handed to the socket so far
        self._wake = trio.Event()  # set: the flusher has frames to write
        self._progress = trio.Event()  # set (and replaced) after each write or on failure
        self._flusher_on = False
        self._writing = False  # a batch is being written (by our flusher or a circuit's above)
        self._below_cache: DarkbloomYamux | None | bool = False  # False: not looked up yet
        self._error: QueuedWriteFailed | None = None
        self._flushed_callbacks: collections.deque[tuple[int, Callable[[float], None]]] = collections.deque()

    async def open_stream(self) -> object:  # type: ignore[override]
        stream = await super().open_stream()
        _batch_credit(stream)
        return stream

    async def accept_stream(self) -> object:  # type: ignore[override]
        stream = await super().accept_stream()
        _batch_credit(stream)
        return stream

    async def _handle_incoming_with_ready_signal(self, task_status: object = trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[override]
        # `Yamux.start` runs this in the connection's nursery: the flusher lives (and is
        # cancelled) with the reader, owned by that nursery.
        if self._nursery is not None and not self._flusher_on and self._error is None:
            self._flusher_on = True
            self._nursery.start_soon(self._flusher)
        await super()._handle_incoming_with_ready_signal(task_status)  # type: ignore[arg-type]

    def when_flushed(self, callback: Callable[[float], None]) -> None:
        """Call `callback(time.perf_counter())` once every frame queued so far is on the socket
        (at once if it already is; never if the connection fails first). Benchmarks only."""
        if self._written_seq >= self._enqueued_seq:
            callback(time.perf_counter())
        else:
            self._flushed_callbacks.append((self._enqueued_seq, callback))

    async def _write_frame(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if not self._flusher_on:  # before start(): the library's serialised write
            async with self._write_lock:
                await self.secured_conn.write(data)
            return
        _, kind, flags, sid, _ = _HEADER.unpack_from(data)
        if kind == _DATA and self._queued_bytes and self._queued_bytes + len(data) > self.max_queued_bytes:
            await self._wait_for_room(data, sid)
        self._queue.append(data)
        self._queued_bytes += len(data)
        self.peak_queued_bytes = max(self.peak_queued_bytes, self._queued_bytes)
        self._enqueued_seq += 1
        seq = self._enqueued_seq
        stream = self.streams.get(sid)
        if stream is not None:
            stream._darkbloom_seq = seq  # type: ignore[attr-defined]  # its last frame (close checks it)
        if kind == _WINDOW_UPDATE and flags == _SYN:
            # A new outbound stream's SYN: every opener (multistream-select) writes its
            # header next, which wakes the flusher; the SYN rides in that write.
            return
        if not self._wake.is_set():
            self._wake.set()
        if flags & (_FIN | _RST) or kind == _GO_AWAY:
            await self._wait_written(seq)

    async def _wait_for_room(self, data: bytes, sid: int) -> None:
        """Backpressure for a DATA frame; gives the frame's window back if its writer is cancelled."""
        queued = False
        self.room_waits += 1
        try:
            while self._queued_bytes and self._queued_bytes + len(data) > self.max_queued_bytes:
                await self._progress.wait()
                if self._error is not None:
                    raise self._error
            queued = True
        finally:
            stream = self.streams.get(sid)
            if not queued and self._error is None and stream is not None:
                stream.send_window += len(data) - _HEADER.size  # the frame never left: nor did its window

    async def _wait_written(self, seq: int) -> None:
        while self._written_seq < seq:
            if self._error is not None:
                raise self._error
            await self._progress.wait()

    async def _flusher(self) -> None:
        """Write queued frames, everything queued in one Noise write per pass, until cancelled."""
        try:
            while True:
                while (not self._queue or self._writing) and self._error is None:  # (a circuit above may be writing for us)
                    self._wake = trio.Event()
                    await self._wake.wait()
                if self._error is not None:
                    return
                await self._write_batch()
                below = self._below()
                if below is not None and below._queue and not below._writing and below._error is None:
                    # A relayed connection: our batch is now queued on the relay connection.
                    # Write it from here instead of waiting for that flusher's turn to run.
                    await below._write_batch()
        finally:
            self._fail("connection closed", None)

    def _below(self) -> DarkbloomYamux | None:
        if self._below_cache is False:
            self._below_cache = _yamux_below(self)
        return self._below_cache  # type: ignore[return-value]

    async def _write_batch(self) -> None:
        """Write everything queued as one Noise write; on failure mark the connection failed and
        close it (the library's reader then tears it down)."""
        self._writing = True
        frames, self._queue = self._queue, []
        last = self._enqueued_seq
        data = b"".join(frames) if len(frames) > 1 else frames[0]
        try:
            # Shielded: cut short, it would leave half a Noise message on the wire (and a
            # circuit's flusher may be writing the relay connection's batch). Bounded, so a
            # peer that stops reading cannot pin this task forever.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + _WRITE_STALL_S) as stall:
                if self._write_lock.locked():  # a write from before start() still in flight
                    await self._write_lock.acquire()
                else:
                    self._write_lock.acquire_nowait()
                try:
                    await self.secured_conn.write(data)
                finally:
                    self._write_lock.release()
            if stall.cancelled_caught:
                raise trio.BrokenResourceError(f"Yamux write stalled for {_WRITE_STALL_S:.0f} s")
            if self.event_shutting_down.is_set():
                # The reader tore the connection down while this write was in flight: 0.8.1's
                # TCP write returns as if it succeeded on a socket closed meanwhile, so the
                # bytes may never have left. Report them lost rather than sent.
                raise trio.ClosedResourceError("connection shut down during the write")
        except Exception as exc:  # the socket write failed: fail every queued and later write, then close
            self._writing = False
            self._fail(f"connection write failed: {exc}", exc)
            log.debug("Yamux write to %s failed: %s", str(self.peer_id)[-8:], exc)
            with trio.move_on_after(2, shield=True):
                try:
                    await self.secured_conn.close()
                except Exception:  # already closed or broken: nothing more to do
                    pass
            return
        self._writing = False
        self._written_seq = last
        self._queued_bytes -= len(data)
        progress, self._progress = self._progress, trio.Event()
        progress.set()
        if self._flushed_callbacks:
            now = time.perf_counter()
            while self._flushed_callbacks and self._flushed_callbacks[0][0] <= last:
                self._flushed_callbacks.popleft()[1](now)
        if self._queue:
            self._wake.set()  # frames queued meanwhile (our flusher may have been waiting for us)

    def _fail(self, reason: str, cause: Exception | None) -> None:
        if self._error is not None:
            return
        error = QueuedWriteFailed(f"Yamux: {reason}; {len(self._queue)} queued frames not sent")
        error.__cause__ = cause
        self._error = error
        self._queue.clear()
        self._flushed_callbacks.clear()
        self._progress.set()
        self._wake.set()


_PATH = ("muxed_stream", "conn", "read_writer", "read_write_closer", "_conn", "_wrapped", "stream")


def _yamux_below(conn: DarkbloomYamux) -> DarkbloomYamux | None:
    """The Yamux connection a relayed connection's bytes travel in (the relay connection
    under a circuit), or None on a direct (TCP) connection."""
    todo, seen = [conn.secured_conn], set()
    while todo:
        obj = todo.pop()
        if id(obj) in seen or len(seen) > 32:
            continue
        seen.add(id(obj))
        if isinstance(obj, DarkbloomYamux) and obj is not conn:
            return obj
        todo.extend(getattr(obj, name) for name in _PATH if getattr(obj, name, None) is not None)
    return None


def when_on_socket(conn: DarkbloomYamux, callback: Callable[[float], None]) -> None:
    """Call `callback(time.perf_counter())` once every frame queued on `conn` so far is on
    the TCP socket: through every Yamux layer below it on a relayed connection (benchmarks)."""
    below = conn._below()

    def done(now: float) -> None:
        if below is None:
            callback(now)
        else:  # the circuit's bytes are now queued on the relay connection: wait for that one
            when_on_socket(below, callback)

    conn.when_flushed(done)


def _batch_credit(stream: object) -> None:
    """Defect 18 (found here): a YamuxStream returns receive credit after every small read.

    In 0.8.1 a read of a few bytes on a stream whose window is nearly full takes the
    "partial slack" branch of `_auto_tune_and_send_window_update` and sends a WINDOW_UPDATE
    for those few bytes, whatever PY_YAMUX_RELEASE_ON_READ says: one extra frame per token
    read, which a relay forwards back to the sender. Here reads only add to the stream's
    pending release, and the library's own update runs with nothing newly read, so credit
    goes back (with auto-tuning) once half the window was consumed, as in go-yamux.

    Also here: the common case of a write or a read takes no lock (see `_fast_paths`), and
    `close()` reports frames of this stream that a failed connection never sent.
    """
    update = stream._auto_tune_and_send_window_update  # type: ignore[attr-defined]

    async def batched(*, bytes_read: int = 0) -> None:
        if bytes_read > 0:
            async with stream.window_lock:  # type: ignore[attr-defined]
                stream._pending_recv_release += bytes_read  # type: ignore[attr-defined]
        await update(bytes_read=0)

    stream._auto_tune_and_send_window_update = batched  # type: ignore[attr-defined]
    # Taken around synchronous window updates only (the reader per WINDOW_UPDATE frame).
    stream.window_lock = QuickLock(stream.window_lock)  # type: ignore[attr-defined]
    _fast_paths(stream)
    _checked_close(stream)


def _checked_close(stream: object) -> None:
    """A stream close that returns once this stream's frames (data and FIN) are on the socket
    and raises when the connection failed before they got there. 0.8.1's close swallows connection errors, which was
    right when a write returned only once its frame was on the socket; with queued writes
    it would hide lost data."""
    conn = stream.conn  # type: ignore[attr-defined]
    library_close = stream.close  # type: ignore[attr-defined]

    async def close() -> None:
        await library_close()
        # The stream's last frame (its FIN, or its data when the connection's reader already
        # marked the stream closed) must reach the socket; a failing connection raises here.
        await conn._wait_written(getattr(stream, "_darkbloom_seq", 0))

    stream.close = close  # type: ignore[attr-defined]


def _fast_paths(stream: object) -> None:
    """A Yamux stream write or read that takes no lock when nothing contends (found here).

    0.8.1's `YamuxStream.write` takes the stream's read-write lock and its window lock
    for every frame, and `read(n)` takes the connection's stream lock and the window lock:
    each `async with` on a trio lock is a scheduler checkpoint, so a token waits behind every
    other runnable task two or three times per layer. A relayed connection has two layers
    at each end (the circuit's own Yamux inside the relay connection's), and a node with 200
    streams has many runnable tasks: these waits were most of the latency a relay added.
    Here, when no library writer holds the stream's write lock (mid-message, e.g. waiting
    for window) and the data fits the send window (write) or is already buffered (read; an
    empty buffer is waited for on the library's own per-stream event, as its `read_stream`
    does), the same bookkeeping is done synchronously and the frame is queued at once
    (trio runs one task at a time, so no other task can interleave); otherwise the
    library's path runs unchanged. The window and stream locks are not checked: the library
    holds them only across their own acquire checkpoint (the guarded updates are
    synchronous), so a synchronous update here cannot interleave with one there. Frame order
    is kept: the library, too, queues a frame right after building it, with no checkpoint in
    between.
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
            await conn._write_frame(_HEADER.pack(0, _DATA, 0, sid, size) + data)
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
