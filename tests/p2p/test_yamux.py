"""Our Yamux layer (darkbloom.p2p.yamux): defects 16, 17 and 18 of py-libp2p 0.8.1, each shown and worked around."""

from __future__ import annotations

import struct

import trio

from darkbloom.p2p import yamux as yamux_module
from darkbloom.p2p.yamux import DarkbloomYamux
from darkbloom.p2p.testing import swarm

TIMEOUT = 30
TOKENS = "/darkbloom/test-yamux-tokens/1.0.0"
COUNT = 200


def tally(conn) -> dict[str, int]:
    """Count the frames and socket writes one Yamux connection makes from now on."""
    counts = {"frames": 0, "window_updates": 0, "writes": 0}
    frame, write = conn._write_frame, conn.secured_conn.write

    async def counting_frame(data: bytes) -> None:
        counts["frames"] += 1
        _, kind, flags, _, _ = struct.unpack(">BBHII", data[:12])
        counts["window_updates"] += kind == 1 and flags == 0  # credit only (not SYN/ACK/FIN)
        await frame(data)

    async def counting_write(data: bytes) -> None:
        counts["writes"] += 1
        await write(data)

    conn._write_frame = counting_frame
    conn.secured_conn.write = counting_write
    return counts


async def tokens(stream) -> None:
    for i in range(COUNT):
        await stream.write(b"tok%05d" % i)


async def read_tokens(client, node) -> None:
    stream = await client.open_stream(node.peer_id, TOKENS, addrs=node.listen_addrs)
    got = b""
    while len(got) < 8 * COUNT and (chunk := await stream.read(8)):
        got += chunk
    assert got == b"".join(b"tok%05d" % i for i in range(COUNT))
    await stream.close()


def muxer(net, peer_id: str):
    from libp2p.peer.id import ID

    return net.host.get_network().get_connections(ID.from_base58(peer_id))[0].muxed_conn


async def test_defect17_our_yamux_class_is_the_one_that_runs():
    """Stock 0.8.1 ignores the muxer_opt class for Yamux; our factory makes it run."""
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=0, clients=1) as s:
            node, client = s.nodes[0].net, s.clients[0].net
            await client.connect(node.peer_id, node.listen_addrs)
            assert type(muxer(client, node.peer_id)) is DarkbloomYamux
            assert type(muxer(node, client.peer_id)) is DarkbloomYamux


async def test_defect18_reader_returns_credit_in_batches_not_per_read(monkeypatch):
    """Reading 200 tokens one by one: stock sends a WINDOW_UPDATE per read, ours none."""
    results = {}
    for variant in ("ours", "stock"):
        if variant == "stock":
            monkeypatch.setattr(yamux_module, "_batch_credit", lambda stream: None)
        with trio.fail_after(TIMEOUT):
            async with swarm(nodes=1, relays=0, clients=1) as s:
                node, client = s.nodes[0].net, s.clients[0].net
                node.serve(TOKENS, tokens)
                await client.connect(node.peer_id, node.listen_addrs)
                counts = tally(muxer(client, node.peer_id))
                await read_tokens(client, node)
                results[variant] = counts["window_updates"]
    assert results["ours"] <= 5, results  # 1.6 KB read: far below half a window (other streams aside)
    assert results["stock"] >= COUNT // 2, results  # the defect; if this fails, 0.8.1 behaviour changed


async def test_defect16_concurrent_frames_share_socket_writes():
    """50 streams writing at once: frames are group-committed into fewer Noise writes, intact."""
    streams = 50
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=0, clients=1) as s:
            node, client = s.nodes[0].net, s.clients[0].net
            node.serve(TOKENS, tokens)
            await client.connect(node.peer_id, node.listen_addrs)
            counts = tally(muxer(node, client.peer_id))
            async with trio.open_nursery() as n:
                for _ in range(streams):
                    n.start_soon(read_tokens, client, node)
            assert counts["frames"] >= streams * COUNT // 8  # token frames, at least partly merged by reads
            assert counts["writes"] < counts["frames"], counts  # some frames shared a write


ECHO = "/darkbloom/test-yamux-echo/1.0.0"


async def echo(stream) -> None:
    while data := await stream.read():
        await stream.write(data)


class CountingLock:
    """Stands in for a stream's window lock and counts acquisitions (the real lock does the locking)."""

    def __init__(self, lock: trio.Lock) -> None:
        self.lock = lock
        self.acquired = 0

    def locked(self) -> bool:
        return self.lock.locked()

    async def __aenter__(self) -> None:
        self.acquired += 1
        await self.lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()


async def test_uncontended_stream_writes_and_reads_take_no_lock():
    """Each trio lock is a scheduler checkpoint: the common write and read take none."""
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=0, clients=1) as s:
            node, client = s.nodes[0].net, s.clients[0].net
            node.serve(ECHO, echo)
            stream = await client.open_stream(node.peer_id, ECHO, addrs=node.listen_addrs)
            yamux_stream = stream.raw.muxed_stream
            writes = []
            slow_acquire = yamux_stream.rw_lock.acquire_write

            async def counting_acquire() -> None:
                writes.append(1)
                await slow_acquire()

            yamux_stream.rw_lock.acquire_write = counting_acquire
            yamux_stream.window_lock = window = CountingLock(yamux_stream.window_lock)
            for i in range(100):
                message = b"%03d" % i * 40
                await stream.write(message)
                got = b""
                while len(got) < len(message):
                    got += await stream.read(len(message) - len(got))
                assert got == message
            assert writes == []
            assert window.acquired <= 2  # at most one credit update (the library path: 2 per read, 200)


async def test_window_sized_writes_and_small_ones_arrive_intact_in_order():
    """1 MB (four times the send window: the library's waiting path) then small writes, echoed back."""
    blob = bytes(range(256)) * 4096
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=0, clients=1) as s:
            node, client = s.nodes[0].net, s.clients[0].net
            node.serve(ECHO, echo)
            stream = await client.open_stream(node.peer_id, ECHO, addrs=node.listen_addrs)
            small = [b"s%04d" % i for i in range(300)]
            expected = blob + b"".join(small)
            got = bytearray()

            async def reader() -> None:
                while len(got) < len(expected):
                    chunk = await stream.read()
                    assert chunk
                    got.extend(chunk)

            async with trio.open_nursery() as n:
                n.start_soon(reader)
                await stream.write(blob)
                for message in small:
                    await stream.write(message)
            assert bytes(got) == expected
