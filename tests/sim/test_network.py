"""The simulated wire and PeerNetwork: routes by NAT type, latency, bandwidth, loss, failures,
and Darkbloom's records and discovery running over the simulator's Kademlia (virtual time)."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from darkbloom.errors import PeerUnreachable, ProtocolMismatch
from darkbloom.identity import Identity
from darkbloom.p2p.api import recv_message, send_message
from darkbloom.p2p.keys import peer_id_from_public_key
from darkbloom.sim.dht import DhtParams
from darkbloom.sim.keys import KeySpace
from darkbloom.sim.network import LinkParams, SimNode, SimWorld
from darkbloom.sim.peer import SimPeer
from darkbloom.wire.caps import CapabilityRecord, ModelCap
from darkbloom.wire.infer import StatusRequest

ECHO = "/test/echo/1.0.0"


def make_world(specs, links=LinkParams(jitter=0.0), seed=1, params=DhtParams()):
    """specs: list of (region, nat, is_relay). Relayed nodes reserve on the first relay."""
    world = SimWorld(links, seed=seed)
    keys = KeySpace()
    peers = []
    relay_id = None
    for i, (region, nat, is_relay) in enumerate(specs):
        ident = Identity.from_seed(bytes([i + 1]) * 32)
        node = SimNode(index=i, peer_id=peer_id_from_public_key(ident.public_key), region=region, nat=nat, is_relay=is_relay)
        if is_relay and relay_id is None:
            relay_id = node.peer_id
        if nat != "public":
            node.relay = relay_id
        world.add(node)
        peers.append(SimPeer(world, node, ident, keys, params, record_ttl_s=600, announce_interval_s=120))
    return world, peers


async def echo(stream):
    data = b""
    while chunk := await stream.read():
        data += chunk
    await stream.write(data)


async def roundtrip(a, b, payload=b"x" * 100):
    stream = await a.open_stream(b.peer_id, ECHO)
    await stream.write(payload)
    await stream.close()
    got = b""
    while chunk := await stream.read():
        got += chunk
    return stream, got


async def test_routes_by_nat_type_and_latencies(autojump_clock):
    links = LinkParams(jitter=0.0, intra_region_ms=10, inter_region_ms=50, hole_punch_success=1.0, connect_rtts=2, stream_rtts=0.5)
    world, (relay, pub, cone, sym) = make_world(
        [("eu", "public", True), ("eu", "public", False), ("us", "full-cone", False), ("us", "symmetric", False)], links
    )
    for p in (pub, cone, sym):
        p.serve(ECHO, echo)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(world.run)
            t0 = trio.current_time()
            s, got = await roundtrip(relay, pub)
            assert got == b"x" * 100 and s.route == "direct"
            # new connection: (2 + 0.5) RTTs of 20 ms, then one RTT for the exchange
            assert trio.current_time() - t0 == pytest.approx(2.5 * 0.02 + 0.02, abs=1e-3)
            t0 = trio.current_time()
            s, got = await roundtrip(pub, sym)
            assert s.route == "relayed" and got == b"x" * 100
            one_way = 0.010 + 0.050  # pub -> relay (eu) -> sym (us)
            assert trio.current_time() - t0 == pytest.approx(2 * one_way * 3.5, abs=1e-3)
            s, _ = await roundtrip(pub, cone)
            assert s.route == "relayed"  # first contact through the relay, DCUtR punches
            s, _ = await roundtrip(pub, cone)
            assert s.route == "hole-punched"
            s, _ = await roundtrip(sym, cone)
            assert s.route == "relayed"  # a symmetric NAT on either side defeats the punch
            s, _ = await roundtrip(sym, pub)
            assert s.route == "direct"  # dialling out always works
            assert world.stats["streams_relayed"] == 3 and world.stats["streams_hole-punched"] == 1
            with pytest.raises(ProtocolMismatch):
                await pub.open_stream(cone.peer_id, "/nobody/1.0.0")
            nursery.cancel_scope.cancel()


async def test_bandwidth_and_loss_delay_delivery(autojump_clock):
    links = LinkParams(jitter=0.0, intra_region_ms=5, bandwidth_bps=8e6)  # 1 MB/s
    world, (a, b) = make_world([("eu", "public", True), ("eu", "public", False)], links)
    b.serve(ECHO, echo)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(world.run)
            await roundtrip(a, b)  # connect first
            t0 = trio.current_time()
            _, got = await roundtrip(a, b, b"y" * 1_000_000)
            assert len(got) == 1_000_000
            # 0.5 RTT stream setup + two one-way trips + 1 s each way on the wire
            assert trio.current_time() - t0 == pytest.approx(0.5 * 0.01 + 0.01 + 2.0, abs=0.01)
            nursery.cancel_scope.cancel()

    lossy = dataclasses.replace(links, loss=0.5, bandwidth_bps=1e9)
    world, (a, b) = make_world([("eu", "public", True), ("eu", "public", False)], lossy, seed=7)
    b.serve(ECHO, echo)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(world.run)
            delays = []
            for _ in range(20):
                t0 = trio.current_time()
                try:
                    await roundtrip(a, b)
                    delays.append(trio.current_time() - t0)
                except Exception as exc:  # a stream may break after max_retransmits
                    assert type(exc).__name__ == "StreamClosed"
            assert max(delays) > 0.2  # some frames were retransmitted after an RTO
            nursery.cancel_scope.cancel()


async def test_dead_partitioned_and_relayless_peers_are_unreachable(autojump_clock):
    links = LinkParams(jitter=0.0, dial_timeout_s=5.0)
    world, (relay, a, b, sym) = make_world(
        [("eu", "public", True), ("eu", "public", False), ("us", "public", False), ("us", "symmetric", False)], links
    )
    for p in (a, b, sym):
        p.serve(ECHO, echo)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(world.run)
            world.cut.add(frozenset(("eu", "us")))
            t0 = trio.current_time()
            with pytest.raises(PeerUnreachable):
                await a.open_stream(b.peer_id, ECHO)
            assert trio.current_time() - t0 == pytest.approx(5.0)  # silent: the dial times out
            world.cut.clear()
            s, _ = await roundtrip(a, b)
            assert s.route == "direct"
            world.kill(relay.peer_id)
            with pytest.raises(PeerUnreachable):
                await a.open_stream(sym.peer_id, ECHO)
            sym.node.relay = None
            t0 = trio.current_time()
            with pytest.raises(PeerUnreachable):
                await a.open_stream(sym.peer_id, ECHO)
            assert trio.current_time() == t0  # no circuit address at all: fails at once
            world.kill(b.peer_id)
            with pytest.raises(PeerUnreachable):
                await a.open_stream(b.peer_id, ECHO)
            nursery.cancel_scope.cancel()


async def test_records_and_discovery_over_the_simulated_dht(autojump_clock):
    specs = [("eu", "public", True)] + [("eu" if i % 2 else "us", "public", False) for i in range(40)]
    specs += [("us", "symmetric", False)] * 3
    world, peers = make_world(specs, LinkParams(), params=DhtParams(k=8, alpha=3))
    model = "smollm2-135m-instruct"
    template = lambda p: CapabilityRecord(  # noqa: E731
        peer_id=p.peer_id, seq=0, issued_at_ms=0, expires_at_ms=0,
        models=(ModelCap(id=model, digest="00", context_length=2048),),
    )
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            await nursery.start(world.run)
            servers = {p.peer_id: p.dht for p in peers if p.node.public}
            for p in peers:  # join: bootstrap on the relay, look ourselves up
                p.dht.observe(peers[0].peer_id)
                await p.dht.lookup(p.dht.table.local_key)
            for p in peers:  # one refresh round, as the periodic refresh would
                await p.dht.lookup(p.dht.table.local_key)
            assert min(len(p.dht.table) for p in peers) >= 5
            assert all(p.peer_id not in q.dht.table for p in peers if not p.node.public for q in peers)
            providers = [peers[3], peers[10], peers[-1]]  # the last one is behind a symmetric NAT
            for p in providers:
                await p.provide(model)
                rec = await p.put_record(template(p))
            assert rec.reachability == "relayed" and "/p2p-circuit/" in rec.addrs[0]
            shim = peers[20]
            found = await shim.find_providers(model, fresh=True)
            assert {f.peer_id for f in found} == {p.peer_id for p in providers}
            assert {f.route_hint for f in found} == {"direct", "relayed"}
            got = await peers[30].get_record(peers[10].peer_id, fresh=True)
            assert got is not None and got.model(model) is not None
            assert len(servers) == 41
            # a provider that leaves silently vanishes from discovery once its record expires
            world.kill(peers[10].peer_id)
            await trio.sleep(601)
            found = await peers[25].find_providers(model, fresh=True)
            assert peers[10].peer_id not in {f.peer_id for f in found}
            nursery.cancel_scope.cancel()


async def test_kad_messages_round_trip_over_a_sim_stream(autojump_clock):
    world, (a, b) = make_world([("eu", "public", True), ("eu", "public", False)])

    async def status(stream):
        req = await recv_message(stream, StatusRequest)
        assert req is not None
        await send_message(stream, req)

    b.serve("/test/status/1.0.0", status)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(world.run)
            s = await a.open_stream(b.peer_id, "/test/status/1.0.0")
            await send_message(s, StatusRequest())
            assert await recv_message(s, StatusRequest) == StatusRequest()
            assert b.peer_id in a.peers()
            nursery.cancel_scope.cancel()
