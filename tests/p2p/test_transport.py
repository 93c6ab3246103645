"""Below Yamux (darkbloom.p2p.host): TCP_NODELAY on every socket, and Noise reading ahead."""

from __future__ import annotations

import socket

import trio
from libp2p.abc import IRawConnection
from libp2p.security.noise.io import NoisePacketReadWriter

from darkbloom.identity import Identity
from darkbloom.p2p.host import _ReadAhead, tcp_sockets
from darkbloom.p2p.network import open_network
from darkbloom.p2p.testing import loopback_config

TIMEOUT = 30
ECHO = "/darkbloom/test-transport-echo/1.0.0"


async def echo(stream) -> None:
    while data := await stream.read():
        await stream.write(data)


async def test_tcp_nodelay_is_set_on_dialled_and_accepted_sockets():
    """Nagle + delayed ACK would hold small token writes for up to ~40 ms per hop.

    py-libp2p 0.8.1's TCP transport wraps sockets in trio.SocketStream, which sets
    TCP_NODELAY on both the dialling and the accepting side; this checks the live sockets.
    """
    with trio.fail_after(TIMEOUT):
        async with open_network(loopback_config(), Identity.generate(), role="node") as server, \
                open_network(loopback_config(), Identity.generate(), role="shim") as client:
            server.serve(ECHO, echo)
            stream = await client.open_stream(server.peer_id, ECHO, addrs=server.listen_addrs)
            await stream.write(b"x" * 100)
            got = b""
            while len(got) < 100:
                got += await stream.read()
            for side in (client, server):  # the dialled socket, then the accepted one
                sockets = tcp_sockets(side.host)
                assert sockets, "no TCP socket found under the connection"
                for sock in sockets:
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_live_noise_sessions_read_through_read_ahead():
    with trio.fail_after(TIMEOUT):
        async with open_network(loopback_config(), Identity.generate(), role="node") as server, \
                open_network(loopback_config(), Identity.generate(), role="shim") as client:
            await client.connect(server.peer_id, server.listen_addrs)
            for side in (client, server):
                conns = [c for cs in side.host.get_network().get_connections_map().values() for c in cs]
                assert conns
                for conn in conns:
                    noise = conn.muxed_conn.secured_conn.conn
                    assert isinstance(noise.read_writer.read_write_closer, _ReadAhead)


class FramingOnlyConn(IRawConnection):
    """An in-memory raw connection for a test about read framing only: hands out chunks, counts reads."""

    is_initiator = True

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.reads = 0

    async def read(self, n: int | None = None) -> bytes:
        self.reads += 1
        await trio.lowlevel.checkpoint()
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if n is not None and n >= 0 and len(chunk) > n:
            chunk, rest = chunk[:n], chunk[n:]
            self.chunks.insert(0, rest)
        return chunk

    async def write(self, data: bytes) -> None:
        raise AssertionError("not written in this test")

    async def close(self) -> None:
        return None

    def get_remote_address(self) -> None:
        return None

    def get_transport_addresses(self) -> list:
        return []

    def get_connection_type(self) -> object:
        return None


def framed(*messages: bytes) -> bytes:
    return b"".join(len(m).to_bytes(2, "big") + m for m in messages)


MESSAGES = [b"a" * 40, b"bb" * 7, b"c" * 300]


async def test_stock_noise_reader_makes_two_reads_per_message():
    conn = FramingOnlyConn([framed(*MESSAGES)])
    reader = NoisePacketReadWriter(conn)
    assert [await reader.read_msg() for _ in MESSAGES] == MESSAGES
    assert conn.reads == 2 * len(MESSAGES)


async def test_read_ahead_serves_messages_that_arrived_together_from_one_read():
    conn = FramingOnlyConn([framed(*MESSAGES)])
    reader = NoisePacketReadWriter(_ReadAhead(conn))
    assert [await reader.read_msg() for _ in MESSAGES] == MESSAGES
    assert conn.reads == 1


async def test_read_ahead_keeps_message_boundaries_across_split_receives_and_reports_eof():
    data = framed(*MESSAGES)
    cuts = [1, 3, 45, 46, 200]  # inside a length prefix, inside bodies, at a boundary
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    conn = FramingOnlyConn(chunks)
    ahead = _ReadAhead(conn)
    reader = NoisePacketReadWriter(ahead)
    assert [await reader.read_msg() for _ in MESSAGES] == MESSAGES
    assert conn.reads <= len(chunks) + len(MESSAGES)
    assert await ahead.read(10) == b""  # end of stream passes through


async def test_read_ahead_returns_buffered_bytes_without_waiting():
    conn = FramingOnlyConn([b"0123456789"])
    ahead = _ReadAhead(conn)
    assert await ahead.read(4) == b"0123"
    assert await ahead.read(100) == b"456789"  # what is buffered, not a wait for 100 bytes
    assert conn.reads == 1
    assert await ahead.read(None) == b""
