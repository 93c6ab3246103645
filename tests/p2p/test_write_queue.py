"""Queued Yamux writes (darkbloom.p2p.yamux): one flusher per connection, order, FIN after data,
bounded queue, failures reported (never lost silently, never a hang), cancellation, circuits."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from darkbloom.errors import StreamClosed
from darkbloom.p2p.host import tcp_sockets
from darkbloom.p2p.testing import swarm
from darkbloom.p2p.yamux import DarkbloomYamux, QueuedWriteFailed, _yamux_below

from .test_yamux import muxer

TIMEOUT = 40
TOKENS = "/darkbloom/test-queue-tokens/1.0.0"
SINK = "/darkbloom/test-queue-sink/1.0.0"
ECHO = "/darkbloom/test-queue-echo/1.0.0"
COUNT = 300
TAIL = bytes(range(256)) * 400  # 100 KiB after the tokens: several frames, the library's split
MAX_FRAME = 64 * 1024 + 12  # largest Yamux frame 0.8.1 builds (header included)


def expected(stream_no: int) -> bytes:
    return b"".join(b"s%03d-t%05d;" % (stream_no, i) for i in range(COUNT)) + TAIL


async def tokens(stream) -> None:
    """The client names its stream number; we answer COUNT tokens and a tail, then close at once."""
    number = int(await stream.read(3))
    for i in range(COUNT):
        await stream.write(b"s%03d-t%05d;" % (number, i))
    await stream.write(TAIL)
    await stream.close()  # no checkpoint since the last write: the FIN must still follow the data


async def sink(stream) -> None:
    while await stream.read():
        pass


async def echo(stream) -> None:
    while data := await stream.read():
        await stream.write(data)
    await stream.close()


async def read_to_eof(stream) -> bytes:
    got = bytearray()
    while chunk := await stream.read():
        got.extend(chunk)
    return bytes(got)


async def fetch(client, node, number: int, addrs) -> None:
    stream = await client.open_stream(node.peer_id, TOKENS, addrs=addrs)
    await stream.write(b"%03d" % number)
    got = await read_to_eof(stream)
    assert got == expected(number), f"stream {number}: {len(got)} bytes, first difference at " \
        f"{next((i for i, (a, b) in enumerate(zip(got, expected(number))) if a != b), min(len(got), len(expected(number))))}"
    await stream.close()


def kill_with_reset(killer, victim) -> None:
    """`killer` closes its TCP socket to `victim` with SO_LINGER 0: the victim's socket gets an
    RST, so its next send fails (a connection that died under it)."""
    (port,) = {int(a.split("/tcp/")[1].split("/")[0]) for a in killer.listen_addrs}
    victim_ports = {s.getsockname()[1] for s in tcp_sockets(victim.host) if s.getpeername()[1] == port}
    doomed = [s for s in tcp_sockets(killer.host) if s.getpeername()[1] in victim_ports]
    assert doomed, "no TCP socket between the two networks"
    for sock in doomed:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


async def test_flusher_runs_in_the_connections_own_nursery():
    """No detached task: the flusher is a child of the nursery Yamux.start opened, and when the
    connection closes, later writes raise instead of queueing for nobody."""
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=0, clients=1) as s:
            node, client = s.nodes[0].net, s.clients[0].net
            node.serve(ECHO, echo)
            stream = await client.open_stream(node.peer_id, ECHO, addrs=node.listen_addrs)
            conn = muxer(client, node.peer_id)
            assert isinstance(conn, DarkbloomYamux)
            assert any(t.name.endswith("._flusher") for t in conn._nursery.child_tasks)
            await stream.write(b"hello")
            assert await stream.read() == b"hello"
            await conn.close()
            with pytest.raises(StreamClosed):
                await stream.write(b"after close")


async def test_many_writers_keep_order_fin_follows_data_and_queue_stays_bounded():
    """60 streams of 300 tokens and a 100 KiB tail each, written at once on one connection whose
    queue is bounded at 4 KiB: every stream arrives whole and in order, EOF after its data, and
    the connection never holds more than the bound plus one frame unsent."""
    streams, bound = 60, 4096
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=0, clients=1, node_config={"max_streams_per_peer": 128}) as s:
            node, client = s.nodes[0].net, s.clients[0].net
            node.serve(TOKENS, tokens)
            await client.connect(node.peer_id, node.listen_addrs)
            conn = muxer(node, client.peer_id)
            conn.max_queued_bytes = bound
            conn.peak_queued_bytes = conn.room_waits = 0
            async with trio.open_nursery() as n:
                for i in range(streams):
                    n.start_soon(fetch, client, node, i, node.listen_addrs)
            # Unbounded, one handler's 300 writes (no checkpoint between them) alone queue ~5 KB.
            assert conn.room_waits > 0
            assert conn.peak_queued_bytes <= bound + MAX_FRAME, conn.peak_queued_bytes
            assert conn._queued_bytes == 0 and not conn._queue  # everything went out


async def test_big_writes_respect_the_bound_and_arrive_intact():
    """16 streams each send 192 KiB in 16 KiB writes through a 32 KiB bound (the sink reads)."""
    streams, bound, piece = 16, 32 * 1024, bytes(range(256)) * 64
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=0, clients=1) as s:
            node, client = s.nodes[0].net, s.clients[0].net
            node.serve(ECHO, echo)
            await client.connect(node.peer_id, node.listen_addrs)
            conn = muxer(client, node.peer_id)
            conn.max_queued_bytes = bound

            async def one(number: int) -> None:
                stream = await client.open_stream(node.peer_id, ECHO, addrs=node.listen_addrs)
                sent = b"".join(bytes([number]) + piece[1:] for _ in range(12))
                back = bytearray()

                async def reader() -> None:
                    back.extend(await read_to_eof(stream))

                async with trio.open_nursery() as n:
                    n.start_soon(reader)
                    for i in range(12):
                        await stream.write(sent[i * len(piece):(i + 1) * len(piece)])
                    await stream.close()
                assert bytes(back) == sent

            async with trio.open_nursery() as n:
                for i in range(streams):
                    n.start_soon(one, i)
            assert conn.room_waits > 0  # unbounded, each writer's 12 writes (no checkpoint) queue 192 KiB
            assert conn.peak_queued_bytes <= bound + MAX_FRAME, conn.peak_queued_bytes


def tcp_write_lock(conn) -> trio.Lock:
    """0.8.1's TCP write lock under a direct connection: held, a socket write is in flight."""
    read_ahead = conn.secured_conn.conn.read_writer.read_write_closer
    return read_ahead._conn.stream.write_lock


async def two_sink_streams_written(s):
    """Node and client of a one-node swarm, two client streams to the node's sink that have each
    written a little, and the client's Yamux connection once both writes are on the socket."""
    node, client = s.nodes[0].net, s.clients[0].net
    node.serve(SINK, sink)
    first = await client.open_stream(node.peer_id, SINK, addrs=node.listen_addrs)
    second = await client.open_stream(node.peer_id, SINK, addrs=node.listen_addrs)
    await first.write(b"delivered")
    await second.write(b"delivered")
    conn = muxer(client, node.peer_id)
    await conn._wait_written(conn._enqueued_seq)  # both on the socket
    return node, client, first, second, conn


async def test_write_queued_on_a_dead_connection_is_reported_by_close():
    """Data is queued while a socket write is in flight; the peer resets the TCP connection
    before it goes out. The write itself returned (it only queued); the stream's close raises
    instead of reporting success (nothing lost silently), and so does the next write."""
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=0, clients=1) as s:
            node, client, first, second, conn = await two_sink_streams_written(s)
            lock = tcp_write_lock(conn)
            await lock.acquire()  # a send in flight: the flusher must wait behind it
            await first.write(b"x" * 1000)  # queued, returns at once
            kill_with_reset(node, client)
            await conn.event_shutting_down.wait()  # the reader saw the reset
            lock.release()
            with pytest.raises(StreamClosed):
                await first.close()
            with pytest.raises(StreamClosed):
                await second.write(b"y")
            assert isinstance(conn._error, QueuedWriteFailed)


async def test_writer_waiting_for_room_fails_when_the_connection_dies():
    """A writer held back by the bound is woken with an error, not left waiting forever."""
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=0, clients=1) as s:
            node, client, first, second, conn = await two_sink_streams_written(s)
            conn.max_queued_bytes = 1
            lock = tcp_write_lock(conn)
            await lock.acquire()
            await first.write(b"queued")  # the queue is not empty now, and cannot drain
            failed = []

            async def waiter() -> None:
                with pytest.raises(StreamClosed):
                    await second.write(b"must wait for room, then fail")
                failed.append(True)

            async with trio.open_nursery() as n:
                n.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                assert conn.room_waits == 1  # the waiter is waiting for room
                kill_with_reset(node, client)
                await conn.event_shutting_down.wait()
                lock.release()
            assert failed == [True]


async def test_cancelled_writer_gives_back_its_window_and_corrupts_nothing():
    """A writer cancelled while waiting for room queues nothing and returns its send window;
    the other stream's data and its own later writes arrive intact and in order."""
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=0, clients=1) as s:
            node, client = s.nodes[0].net, s.clients[0].net
            node.serve(ECHO, echo)
            first = await client.open_stream(node.peer_id, ECHO, addrs=node.listen_addrs)
            second = await client.open_stream(node.peer_id, ECHO, addrs=node.listen_addrs)
            conn = muxer(client, node.peer_id)
            conn.max_queued_bytes = 1
            await first.write(b"first-1;")  # queued, not yet written: the next DATA frame waits
            window = second.raw.muxed_stream.send_window
            with trio.CancelScope() as scope:
                scope.cancel()
                await second.write(b"CANCELLED")
            assert scope.cancelled_caught
            assert second.raw.muxed_stream.send_window == window
            await second.write(b"second-1;")
            await first.write(b"first-2;")
            await first.close()
            await second.close()
            assert await read_to_eof(first) == b"first-1;first-2;"
            assert await read_to_eof(second) == b"second-1;"


async def test_relayed_streams_keep_order_and_both_yamux_layers_queue():
    """Through a relay: the circuit's own Yamux sits on a stream of the relay connection's
    Yamux, each with its own flusher; 20 streams of tokens arrive whole, EOF after data."""
    streams = 20
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=0, relays=1, clients=1) as s:
            member = await s.add("node", reachability="private")
            await member.net.relay_ready.wait()
            node, client = member.net, s.clients[0].net
            node.serve(TOKENS, tokens)
            async with trio.open_nursery() as n:
                for i in range(streams):
                    n.start_soon(fetch, client, node, i, node.announce_addrs)
            inner = muxer(node, client.peer_id)
            outer = _yamux_below(inner)
            assert isinstance(outer, DarkbloomYamux) and outer is muxer(node, s.relays[0].peer_id)
            for conn in (inner, outer):
                assert any(t.name.endswith("._flusher") for t in conn._nursery.child_tasks)
            assert _yamux_below(outer) is None  # the relay connection runs on TCP
