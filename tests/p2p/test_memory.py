"""The in-memory PeerNetwork keeps the libp2p network's semantics (no sockets, controllable clock)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from darkbloom.config import P2PConfig
from darkbloom.errors import PeerUnreachable, ProtocolMismatch, RecordRejected, StreamClosed
from darkbloom.identity import Identity
from darkbloom.p2p import status
from darkbloom.p2p.api import PeerNetwork, recv_message, send_message
from darkbloom.p2p.memory import DEFAULT_PIPE_BYTES, MemoryHub, open_memory_network
from darkbloom.p2p.testing import OffsetClock
from darkbloom.wire.caps import CapabilityRecord, ModelCap
from darkbloom.wire.infer import NodeLoad, StatusReply

CFG = P2PConfig(record_ttl_s=30.0, announce_interval_s=10.0)


def template(model: str) -> CapabilityRecord:
    return CapabilityRecord(peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0,
                            models=(ModelCap(id=model, digest="d", context_length=512),))


async def test_discovery_expiry_and_reannounce():
    clock = OffsetClock()
    hub = MemoryHub(clock=clock)
    with trio.fail_after(5):
        async with open_memory_network(hub, Identity.generate(), CFG) as a, \
                open_memory_network(hub, Identity.generate(), CFG) as b, \
                open_memory_network(hub, Identity.generate(), CFG) as client:
            assert isinstance(client, PeerNetwork)
            for net in (a, b):
                await net.put_record(template("m"))
                await net.provide("m")
            assert {p.peer_id for p in await client.find_providers("m")} == {a.peer_id, b.peer_id}
            b.withdraw_record()
            b.unprovide("m")
            clock.advance(31)
            await a.announce_once()  # a keeps announcing, b stopped
            assert [p.peer_id for p in await client.find_providers("m", fresh=True)] == [a.peer_id]
            rec = await client.get_record(a.peer_id)
            assert rec is not None and rec.model("m") is not None


async def test_hub_refuses_forged_and_older_records():
    hub = MemoryHub()
    async with open_memory_network(hub, Identity.generate(), CFG) as a:
        first = await a.put_record(template("m"))
        second = await a.put_record(template("m"))
        from darkbloom.wire.codec import encode

        with pytest.raises(RecordRejected):
            await a._raw_put_value(f"/darkbloom/caps/{a.peer_id}", encode(first))
        assert (await a.get_record(a.peer_id)) == second


async def test_streams_status_and_errors():
    hub = MemoryHub()
    with trio.fail_after(5):
        async with open_memory_network(hub, Identity.generate(), CFG) as node, \
                open_memory_network(hub, Identity.generate(), CFG) as client:
            reply = StatusReply(version="0.1.0", protocol="1.0.0", load=NodeLoad(active=0, queued=0, max_concurrent=2))
            status.serve_status(node, lambda: reply)
            assert await status.query_status(client, node.peer_id) == reply
            with pytest.raises(ProtocolMismatch):
                await status.query_status(client, node.peer_id, version="9.0.0")
            with pytest.raises(ProtocolMismatch):
                await client.open_stream(node.peer_id, "/darkbloom/nothing/1.0.0")
            with pytest.raises(PeerUnreachable):
                await client.open_stream("12D3KooWnobody", status.STATUS_PROTOCOL)
            assert node.peer_id in client.peers()


async def test_slow_reader_is_waited_for_with_bounded_buffer():
    hub = MemoryHub()
    total = 4 * DEFAULT_PIPE_BYTES
    done = trio.Event()
    with trio.fail_after(60):
        async with open_memory_network(hub, Identity.generate(), CFG) as node, \
                open_memory_network(hub, Identity.generate(), CFG) as client:

            async def blast(stream):
                await stream.write(b"x" * total)
                done.set()

            node.serve("/t/blast", blast)
            stream = await client.open_stream(node.peer_id, "/t/blast")
            first = await stream.read(1000)
            await trio.sleep(0.5)  # the reader pauses; the writer must wait, not fail
            assert not done.is_set()
            assert len(stream._in.buf) <= DEFAULT_PIPE_BYTES  # bounded
            got = len(first)
            while chunk := await stream.read():
                got += len(chunk)
            assert got == total and done.is_set()


async def test_reset_reaches_the_other_side():
    hub = MemoryHub()
    with trio.fail_after(5):
        async with open_memory_network(hub, Identity.generate(), CFG) as node, \
                open_memory_network(hub, Identity.generate(), CFG) as client:
            seen = trio.Event()

            async def handler(stream):
                try:
                    await recv_message(stream)
                except StreamClosed:
                    seen.set()
                    raise

            node.serve("/t/reset", handler)
            stream = await client.open_stream(node.peer_id, "/t/reset")
            await stream.reset()
            await seen.wait()
            with pytest.raises(StreamClosed):
                await send_message(stream, template("m"))
