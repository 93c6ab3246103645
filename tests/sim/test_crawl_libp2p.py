"""The crawler against a real libp2p swarm on loopback: it finds every peer."""

from __future__ import annotations

import trio

from darkbloom.p2p.testing import peer_ids, swarm
from darkbloom.sim.crawl import crawl, summarise_crawl
from darkbloom.sim.crawl_ports import LibP2PCrawlPort
from darkbloom.wire.caps import CapabilityRecord, ModelCap


def template(model: str) -> CapabilityRecord:
    return CapabilityRecord(
        peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0,
        models=(ModelCap(id=model, digest="d" * 64, context_length=2048),),
        software_version="0.1.0", protocol_version="1.0.0",
    )


async def test_crawler_finds_every_peer_of_a_loopback_swarm():
    with trio.fail_after(120):
        async with swarm(nodes=4, relays=1, clients=1) as s:
            for i, member in enumerate(s.nodes):
                await member.net.put_record(template(f"model-{i % 2}"))
                await member.net.provide(f"model-{i % 2}")
            client = s.clients[0].net
            relay = s.relays[0].net
            result = await crawl(LibP2PCrawlPort(client), [(relay.peer_id, relay.listen_addrs)],
                                 rate_per_s=100, timeout_s=10)
    expected = peer_ids(s.relays) | peer_ids(s.nodes)
    found = set(result.peers)
    assert expected <= found, f"missing {expected - found}"
    assert all(result.peers[p].responded for p in expected)
    assert all(result.peers[p].record is not None for p in peer_ids(s.nodes))
    summary = summarise_crawl(result)
    assert summary["models"] == {"model-0": 2, "model-1": 2}
    assert summary["routing_edges"] > 0
