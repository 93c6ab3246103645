"""Our Yamux layer (darkbloom.p2p.host): defects 16, 17 and 18 of py-libp2p 0.8.1, each shown and worked around."""

from __future__ import annotations

import struct

import trio

from darkbloom.p2p import host as host_module
from darkbloom.p2p.host import DarkbloomYamux
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
            monkeypatch.setattr(host_module, "_batch_credit", lambda stream: None)
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
