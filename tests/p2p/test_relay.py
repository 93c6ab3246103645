"""Relay and circuits on loopback: private nodes reserve, advertise and are dialled through the relay.

Each 0.8.1 workaround has a test here that fails without it (defects 3, 4, 5, 6, 7, 10).
"""

from __future__ import annotations

import multiaddr
import pytest
import trio

from darkbloom.config import RelayConfig
from darkbloom.errors import StreamClosed
from darkbloom.p2p import status
from darkbloom.p2p.host import DarkbloomHost
from darkbloom.p2p.testing import swarm

from .test_swarm import announce

TIMEOUT = 40
BLAST = "/darkbloom/test-blast/1.0.0"
ECHO = "/darkbloom/test-echo/1.0.0"


async def echo(stream):
    while data := await stream.read():
        await stream.write(data)


async def private_node(s):
    member = await s.add("node", reachability="private")
    await member.net.relay_ready.wait()
    member.net.serve(ECHO, echo)
    return member


async def test_private_node_found_through_dht_and_streamed_through_the_relay():
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=1, clients=1) as s:
            member = await private_node(s)
            node, client, relay = member.net, s.clients[0].net, s.relays[0].net
            await announce(member, "model-r")
            assert node.reachability == "relayed" and node.dht_mode == "client"
            # Defect 4: the advertised address keeps /p2p-circuit and ends with our id.
            relay_id = relay.peer_id
            assert node.announce_addrs == (
                f"{s.bootstrap[0]}/p2p-circuit/p2p/{node.peer_id}",
            )
            (found,) = await client.find_providers("model-r", fresh=True)
            assert found.peer_id == node.peer_id and found.route_hint == "relayed"
            assert found.record.reachability == "relayed"
            stream = await client.open_stream(node.peer_id, ECHO, addrs=found.addrs)
            assert stream.route == "relayed"
            await stream.write(b"ping through the circuit")
            assert await stream.read() == b"ping through the circuit"
            await stream.close()
            assert (await status.query_status(client, node.peer_id)).models == ("model-r",)
            # Relayed peers stay out of DHT storage: not in the relay's routing table.
            table = {str(p) for p in relay.dht.routing_table.get_peer_ids()}
            assert node.peer_id not in table and s.nodes[0].peer_id in table
            # The hole punch was attempted and its outcome recorded.
            with trio.move_on_after(10):
                while node.peer_id not in client.hole_punch_results:
                    await trio.sleep(0.05)
            assert node.peer_id in client.hole_punch_results
            assert relay_id


async def test_defect3_swarm_cannot_dial_circuit_addresses_we_can():
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=0, relays=1, clients=1) as s:
            member = await private_node(s)
            node, client = member.net, s.clients[0].net
            from libp2p.peer.id import ID
            from libp2p.peer.peerinfo import PeerInfo

            circuit = [multiaddr.Multiaddr(a) for a in node.announce_addrs]
            with pytest.raises(Exception):  # the stock swarm drops /p2p-circuit addresses
                await client.host.connect(PeerInfo(ID.from_base58(node.peer_id), circuit))
            stream = await client.open_stream(node.peer_id, ECHO, addrs=node.announce_addrs)
            assert stream.route == "relayed"


def test_defect4_basic_host_mangles_circuit_addresses_ours_does_not():
    from libp2p.host.basic_host import BasicHost

    from darkbloom.identity import Identity
    from darkbloom.p2p.host import build_host

    host = build_host(Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"])
    relay = "/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWJAkiXLq5SnvqpbMg6SM8PhNUbHhU1p3kY9ZC6NU3PjsD"
    circuit = multiaddr.Multiaddr(relay + "/p2p-circuit")
    stock = BasicHost(network=host.get_network(), announce_addrs=[circuit])
    assert "/p2p-circuit" not in str(stock.get_addrs()[0])  # the defect
    assert isinstance(host, DarkbloomHost)
    host.advertised = [circuit]
    assert str(host.get_addrs()[0]) == f"{relay}/p2p-circuit/p2p/{host.get_id()}"


async def test_defect5_two_clients_on_one_node_do_not_reset_each_other():
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=0, relays=1, clients=2) as s:
            member = await private_node(s)
            node = member.net
            a, b = s.clients[0].net, s.clients[1].net
            sa = await a.open_stream(node.peer_id, ECHO, addrs=node.announce_addrs)
            sb = await b.open_stream(node.peer_id, ECHO, addrs=node.announce_addrs)
            assert sa.route == sb.route == "relayed"
            await sa.write(b"a")
            await sb.write(b"b")
            assert await sa.read() == b"a" and await sb.read() == b"b"
            # Client A drops its whole circuit; B's circuit to the same node must live on.
            await a.host.disconnect(_pid(node))
            for i in range(20):
                await sb.write(b"still here %d" % i)
                assert await sb.read() == b"still here %d" % i


def _pid(net):
    from libp2p.peer.id import ID

    return ID.from_base58(net.peer_id)


PAUSE_S = 30.0  # the slow reader: a client that stops reading for 30 s
TOTAL = 16 << 20  # far more than any window, so the writer must wait for the reader
BUFFER_BOUND = 1 << 20  # in windows and the relay while the reader pauses (measured: 192 KiB direct)


async def test_defect6_reader_pausing_30s_direct_and_relayed_is_not_reset_and_buffering_is_bounded():
    with trio.fail_after(PAUSE_S + TIMEOUT):
        async with swarm(nodes=1, relays=1, clients=1) as s:
            member = await private_node(s)
            direct, relayed, client = s.nodes[0].net, member.net, s.clients[0].net
            progress = {"direct": 0, "relayed": 0}  # bytes each writer got past write()
            finished = []

            def blaster(route):
                async def blast(stream):
                    chunk = b"t" * 65536
                    for _ in range(TOTAL // len(chunk)):
                        await stream.write(chunk)
                        progress[route] += len(chunk)
                    finished.append(route)
                return blast

            direct.serve(BLAST, blaster("direct"))
            relayed.serve(BLAST, blaster("relayed"))
            during_pause = {}

            async def slow_read(net, addrs, route):
                stream = await client.open_stream(net.peer_id, BLAST, addrs=addrs)
                assert stream.route == route
                got = len(await stream.read(1000))
                await trio.sleep(PAUSE_S)  # the pause is the behaviour under test
                during_pause[route] = progress[route]
                while chunk := await stream.read():
                    got += len(chunk)
                assert got == TOTAL

            async with trio.open_nursery() as n:
                n.start_soon(slow_read, direct, direct.listen_addrs, "direct")
                n.start_soon(slow_read, relayed, relayed.announce_addrs, "relayed")
            assert sorted(finished) == ["direct", "relayed"]  # both writers finished, none reset
            for route, sent in during_pause.items():
                # The writer waited: what it handed over during the pause is bounded by the
                # windows (and, relayed, the relay's one window per direction), not TOTAL.
                assert sent <= BUFFER_BOUND, (route, sent)


async def test_defect6_exists_in_raw_yamux_writes():
    """Without our window-aware write, a 5 s reader pause makes the writer fail."""
    failures = []
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=0, clients=1) as s:
            node, client = s.nodes[0].net, s.clients[0].net

            async def raw_blast(stream):
                try:
                    await stream.raw.write(b"t" * (48 << 20))  # more than any window the library grows to
                except Exception as exc:  # StreamReset after "Timed out waiting for window update"
                    failures.append(exc)

            node.serve(BLAST, raw_blast)
            stream = await client.open_stream(node.peer_id, BLAST, addrs=node.listen_addrs)
            await stream.read(1000)
            await trio.sleep(6.5)
            try:
                while await stream.read():
                    pass
            except StreamClosed:
                pass
    assert failures, "py-libp2p fixed defect 6: the workaround may be dropped"


async def test_defect7_and_10_relay_limits_and_dialer_does_not_reserve():
    cfg = RelayConfig(max_reservations=77, circuit_duration_s=5 * 3600, circuit_max_bytes=3 << 30)
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=0, relays=1, clients=1) as s:
            relay = s.relays[0].net
            assert relay.hop is not None
            # the fixture runs relays with default RelayConfig: raised above 0.8.1's defaults
            assert relay.hop.limits.max_reservations == RelayConfig().max_reservations > 4
            assert relay.hop.limits.duration == RelayConfig().circuit_duration_s > 3600
            from darkbloom.p2p.relay import relay_limits

            limits = relay_limits(cfg)
            assert (limits.max_reservations, limits.duration, limits.data) == (77, 5 * 3600, 3 << 30)
            member = await private_node(s)
            client = s.clients[0].net
            assert not client.relay_client.dialer.config.enable_client  # defect 10
            await client.open_stream(member.net.peer_id, ECHO, addrs=member.net.announce_addrs)
            rm = relay.hop.resource_manager
            assert rm.get_reservation(_pid(member.net)) is not None
            assert rm.get_reservation(_pid(client)) is None  # dialling did not reserve


async def test_auto_reachability_by_dial_back():
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=0, relays=1, clients=0) as s:
            member = await s.add("node", reachability="auto")
            await member.net.reachability_known.wait()
            assert member.net.reachability == "public" and member.net.dht_mode == "server"


async def test_private_node_re_reserves_after_relay_restart():
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=0, relays=1, clients=1) as s:
            member = await private_node(s)
            node = member.net
            client = s.clients[0].net
            joins, client_joins = node.joins, client.joins
            relay = await s.restart_relay()
            await node.wait_joins(joins + 1)  # the rejoin asks for a new reservation
            rm = relay.hop.resource_manager
            while rm.get_reservation(_pid(node)) is None:
                node.relay_ready = trio.Event()
                await node.relay_ready.wait()
            await client.wait_joins(client_joins + 1)
            stream = await client.open_stream(node.peer_id, ECHO, addrs=node.announce_addrs)
            await stream.write(b"back")
            assert await stream.read() == b"back"
