"""Loopback swarm (1 relay + 5 nodes + 1 client, real libp2p on 127.0.0.1) in one trio.run each."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from darkbloom.errors import MalformedMessage, ProtocolMismatch, RecordRejected, StreamClosed
from darkbloom.identity import Identity
from darkbloom.p2p import records, status
from darkbloom.p2p.api import recv_message, send_message
from darkbloom.p2p.keys import caps_key, peer_id_from_public_key
from darkbloom.p2p.testing import loopback_config, peer_ids, swarm
from darkbloom.wire.caps import CapabilityRecord, ModelCap
from darkbloom.wire.codec import encode, encode_uvarint
from darkbloom.wire.infer import NodeLoad, StatusReply

TIMEOUT = 30


def template(*models: str) -> CapabilityRecord:
    return CapabilityRecord(
        peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0,
        models=tuple(ModelCap(id=m, digest="d" * 64, context_length=2048, features=("json",)) for m in models),
        decode_tps=50.0, max_concurrent=4, price_input_per_m=10, price_output_per_m=40,
        software_version="0.1.0", protocol_version="1.0.0",
    )


def reply(net) -> StatusReply:
    return StatusReply(version="0.1.0", protocol="1.0.0", load=NodeLoad(active=1, queued=0, max_concurrent=4),
                       models=tuple(sorted(net.provided)))


async def announce(member, *models: str) -> None:
    net = member.net
    status.serve_status(net, lambda: reply(net))
    await net.put_record(template(*models))
    for m in models:
        await net.provide(m)


async def test_discovery_records_and_status():
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=5, relays=1, clients=1) as s:
            async with trio.open_nursery() as n:
                for i, node in enumerate(s.nodes):
                    n.start_soon(announce, node, "model-a" if i < 3 else "model-b")
            client = s.clients[0].net
            found_a = await client.find_providers("model-a")
            found_b = await client.find_providers("model-b")
            assert {p.peer_id for p in found_a} == peer_ids(s.nodes[:3])
            assert {p.peer_id for p in found_b} == peer_ids(s.nodes[3:])
            assert len(found_a) == len({p.peer_id for p in found_a})  # deduplicated (defect 8)
            assert await client.find_providers("model-none") == []
            for p in found_a:
                assert p.record.model("model-a").context_length == 2048
                assert p.record.reachability == "public"
                assert p.addrs and all(a.endswith("/p2p/" + p.peer_id) for a in p.addrs)
                st = await status.query_status(client, p.peer_id)
                assert st.models == ("model-a",) and st.load.max_concurrent == 4
            # Routing table: the relay admits the public nodes, never the client (defect 9).
            relay = s.relays[0].net
            assert client.peer_id not in {str(p) for p in relay.dht.routing_table.get_peer_ids()}
            assert relay.dht.get_routing_table_size() >= 1


async def test_forged_expired_replayed_and_oversize_records_rejected():
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=2, relays=1, clients=1) as s:
            victim, attacker = s.nodes[0].net, s.nodes[1].net
            relay, client = s.relays[0].net, s.clients[0].net
            first = await victim.put_record(template("model-a"))
            second = await victim.put_record(template("model-a"))
            assert second.seq > first.seq
            key = caps_key(victim.peer_id)
            mallory = Identity.generate()
            forged = dataclasses.replace(
                records.build_record(mallory, template("model-evil"), seq=second.seq + 10, now_ms=victim.now_ms(),
                                     ttl_ms=60_000, addrs=(), reachability="public"),
                peer_id=victim.peer_id,
            )
            expired = records.build_record(victim.identity, template("model-a"), seq=second.seq + 20,
                                           now_ms=victim.now_ms() - 120_000, ttl_ms=60_000, addrs=(), reachability="public")
            oversize = records.build_record(victim.identity, dataclasses.replace(template("model-a"), region="x" * 20000),
                                            seq=second.seq + 30, now_ms=victim.now_ms(), ttl_ms=60_000, addrs=(),
                                            reachability="public")
            # The local validator refuses them before they leave the attacker...
            for bad in (forged, expired, oversize):
                with pytest.raises(RecordRejected):
                    await attacker.dht.put_value(key, encode(bad))
            # ...and the relay's validator refuses them on the wire, as well as a replayed older one.
            store = attacker.dht.value_store
            for bad in (encode(forged), encode(expired), encode(oversize), b"\x81\xa4type\xa3xyz"):
                assert not await store._store_at_peer(relay.host.get_id(), key.encode(), bad)
            await store._store_at_peer(relay.host.get_id(), key.encode(), encode(first))  # replay
            stored = relay.dht.value_store.get(key.encode())
            assert stored is not None and stored.value == encode(second)
            got = await client.get_record(victim.peer_id, fresh=True)
            assert got == second
            # A client that saw seq N refuses an older record later (replay against the cache).
            with pytest.raises(RecordRejected, match="older"):
                client._cache.offer(first, client.now_ms())
            # A record with a bad signature offered straight to the client's validator fails too.
            with pytest.raises(RecordRejected):
                client.validate_value(key, encode(forged))


async def test_node_that_leaves_disappears_within_one_expiry():
    cfg = loopback_config(record_ttl_s=20.0, announce_interval_s=19.0)  # no re-announce during the test
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=3, relays=1, clients=1, config=cfg) as s:
            for node in s.nodes:
                await announce(node, "model-a")
            client = s.clients[0].net
            assert {p.peer_id for p in await client.find_providers("model-a")} == peer_ids(s.nodes)
            leaving = s.nodes[0]
            gone = leaving.peer_id
            await leaving.stop()
            s.clock.advance(15)  # still inside its lifetime: a stopped node is still listed
            assert gone in {p.peer_id for p in await client.find_providers("model-a", fresh=True)}
            s.clock.advance(6)  # past one lifetime; the others re-announce, the leaver cannot
            for node in s.nodes[1:]:
                await node.net.announce_once()
            left = {p.peer_id for p in await client.find_providers("model-a", fresh=True)}
            assert left == peer_ids(s.nodes[1:])


async def test_relay_restart_peers_rejoin():
    cfg = loopback_config(bootstrap_retry_max_s=0.5)
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=2, relays=1, clients=1, config=cfg) as s:
            for node in s.nodes:
                await announce(node, "model-a")
            client = s.clients[0].net
            assert len(await client.find_providers("model-a")) == 2
            before = {m.peer_id: m.net.joins for m in s.nodes + s.clients}
            announced = {m.peer_id: m.net.announcements for m in s.nodes}
            # Down long enough that every peer's redial fails at least once (defect 15:
            # the swarm's 60 s negative dial cache would then keep them away).
            relay = await s.restart_relay(down_s=2.0)
            assert relay.dht.provider_store.size() == 0  # it forgot everything
            for m in s.nodes + s.clients:
                await m.net.wait_joins(before[m.peer_id] + 1)
            for m in s.nodes:  # a rejoin triggers a re-announce
                await m.net.wait_announcements(announced[m.peer_id] + 1)
            assert {p.peer_id for p in await client.find_providers("model-a", fresh=True)} == peer_ids(s.nodes)


async def test_status_version_mismatch_is_an_error_not_a_hang():
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=2, relays=1, clients=1) as s:
            node, bare = s.nodes[0].net, s.nodes[1].net
            status.serve_status(node, lambda: reply(node))
            client = s.clients[0].net
            with pytest.raises(ProtocolMismatch):
                await status.query_status(client, node.peer_id, version="2.0.0")
            with pytest.raises(ProtocolMismatch):
                await status.query_status(client, bare.peer_id)  # does not serve the protocol
            assert (await status.query_status(client, node.peer_id)).protocol == "1.0.0"


async def test_bad_input_is_bounded_and_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(status, "READ_TIMEOUT_S", 0.5)
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=1, clients=1) as s:
            node, client = s.nodes[0].net, s.clients[0].net
            status.serve_status(node, lambda: reply(node))
            for _ in range(3):  # garbage frames: logged once, stream reset, node keeps serving
                stream = await client.open_stream(node.peer_id, "/darkbloom/status/1.0.0")
                await stream.write(encode_uvarint(5) + b"\xc1\xc1\xc1\xc1\xc1")
                assert await _read_all_or_reset(stream) == b""
            oversize = await client.open_stream(node.peer_id, "/darkbloom/status/1.0.0")
            await oversize.write(encode_uvarint(50 << 20))
            assert await _read_all_or_reset(oversize) == b""
            silent = [await client.open_stream(node.peer_id, "/darkbloom/status/1.0.0") for _ in range(3)]
            for stream in silent:  # never writes: cut off after the read timeout
                assert await _read_all_or_reset(stream) == b""
            assert (await status.query_status(client, node.peer_id)).load.active == 1
            warnings = [r for r in caplog.records if "malformed input" in r.getMessage()]
            assert len(warnings) == 1
            assert node._inbound == {}  # no handler left behind


async def _read_all_or_reset(stream) -> bytes:
    out = b""
    try:
        while chunk := await stream.read():
            out += chunk
    except StreamClosed:
        pass
    return out


async def test_framed_messages_round_trip_on_a_custom_protocol():
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=1, clients=1) as s:
            node, client = s.nodes[0].net, s.clients[0].net

            async def echo(stream):
                while (msg := await recv_message(stream, StatusReply)) is not None:
                    await send_message(stream, msg)

            node.serve("/darkbloom/test-echo/1.0.0", echo)
            stream = await client.open_stream(node.peer_id, "/darkbloom/test-echo/1.0.0")
            assert stream.route == "direct" and stream.peer_id == node.peer_id
            for i in range(5):
                msg = StatusReply(version=str(i), protocol="1.0.0", load=NodeLoad(active=i, queued=0, max_concurrent=1))
                await send_message(stream, msg)
                assert await recv_message(stream, StatusReply) == msg
            await stream.close()
            assert await recv_message(stream) is None
            with pytest.raises(MalformedMessage):
                bad = await client.open_stream(node.peer_id, "/darkbloom/test-echo/1.0.0")
                await send_message(bad, StatusReply(version="x", protocol="1", load=NodeLoad(active=0, queued=0, max_concurrent=0)))
                await bad.close()
                await recv_message(bad, CapabilityRecord)  # a type this stream must not carry


def test_peer_id_of_identity_is_stable(tmp_path):
    from darkbloom.identity import load_or_create_identity
    from darkbloom.p2p.host import key_pair_from_identity
    from libp2p.peer.id import ID

    ident = load_or_create_identity(tmp_path)
    again = load_or_create_identity(tmp_path)
    pid = ID.from_pubkey(key_pair_from_identity(ident).public_key).to_base58()
    assert pid == ID.from_pubkey(key_pair_from_identity(again).public_key).to_base58()
    assert pid == peer_id_from_public_key(ident.public_key)


async def test_defect8_stock_find_providers_answers_from_cache_ours_asks_the_network():
    from darkbloom.p2p.keys import model_cid

    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=2, relays=1, clients=1) as s:
            first, second = s.nodes
            client = s.clients[0].net
            await announce(first, "model-a")
            assert {p.peer_id for p in await client.find_providers("model-a")} == {first.peer_id}
            primed = await client.dht.find_providers(model_cid("model-a"))  # stock: caches what it found
            assert {str(p.peer_id) for p in primed} == {first.peer_id}
            await announce(second, "model-a")
            stock = await client.dht.find_providers(model_cid("model-a"))
            assert {str(p.peer_id) for p in stock} == {first.peer_id}  # the defect: cache only
            ours = await client.find_providers("model-a", fresh=True)
            assert {p.peer_id for p in ours} == {first.peer_id, second.peer_id}


async def test_defect12_a_stopped_peer_closes_the_connections_it_dialled():
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=1, clients=1) as s:
            node, client = s.nodes[0].net, s.clients[0]
            await client.net.connect(node.peer_id, node.listen_addrs)  # the client dials the node
            assert client.peer_id in node.peers()
            gone = client.peer_id
            await client.stop()
            while gone in node.peers():  # wakes on each disconnect; would hang without the fix
                node._watcher.changed = trio.Event()
                if gone in node.peers():
                    await node._watcher.changed.wait()
            assert gone not in node.peers()


def test_defect1_only_noise_is_offered():
    from darkbloom.identity import Identity
    from darkbloom.p2p.host import build_host

    host = build_host(Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"])
    upgrader = host.get_network().upgrader
    offered = set(upgrader.security_multistream.transports)
    assert {str(p) for p in offered} == {"/noise"}
    assert host.get_network().connection_config.max_connections_per_peer == 1  # defect 2


async def test_first_data_rides_with_the_negotiation_and_a_refusal_still_names_the_protocol():
    """`open_stream(first=...)`: the handler reads the bytes first, whether they went with the
    protocol negotiation (small) or after it (too big to send ahead of the answer); a peer that does
    not serve the protocol still answers ProtocolMismatch, not garbage."""
    from darkbloom.p2p.network import LAZY_FIRST_MAX

    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=1, clients=1) as s:
            node, client = s.nodes[0].net, s.clients[0].net
            got: list[bytes] = []

            async def echo_handler(stream) -> None:  # reads exactly what the opener sent, echoes its size
                want = int.from_bytes(await _read_exactly(stream, 4), "big")
                body = await _read_exactly(stream, want)
                got.append(body)
                await stream.write(len(body).to_bytes(4, "big"))

            node.serve("/test/echo/1.0.0", echo_handler)
            for size in (10, LAZY_FIRST_MAX - 4, LAZY_FIRST_MAX + 1000):
                body = bytes([size % 251]) * size
                stream = await client.open_stream(node.peer_id, "/test/echo/1.0.0",
                                                  first=len(body).to_bytes(4, "big") + body)
                assert int.from_bytes(await _read_exactly(stream, 4), "big") == size
                await stream.close()
                assert got[-1] == body
            with pytest.raises(ProtocolMismatch):
                await client.open_stream(node.peer_id, "/test/absent/1.0.0", first=b"\x00\x00\x00\x05hello")


async def _read_exactly(stream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        assert chunk, f"stream ended after {len(buf)} of {n} bytes"
        buf += chunk
    return buf
