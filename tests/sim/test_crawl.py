"""The crawler walks a simulated DHT: every server, every provider (relayed ones too), edges, outputs."""

from __future__ import annotations

import hashlib
import random

import networkx as nx
import trio

from darkbloom.sim.crawl import crawl, preimage_in_bucket, summarise_crawl, to_graph
from darkbloom.sim.crawl_ports import SimCrawlPort
from darkbloom.sim.engine import Simulation
from darkbloom.sim.scenario import Population, Scenario


def test_preimage_lands_in_the_bucket():
    rng = random.Random(1)
    peer_key = hashlib.sha256(b"peer").digest()
    for bucket in range(8):
        key = preimage_in_bucket(peer_key, bucket, rng)
        x = int.from_bytes(hashlib.sha256(key).digest(), "big") ^ int.from_bytes(peer_key, "big")
        assert 256 - x.bit_length() == bucket


async def test_crawler_finds_every_server_and_provider(autojump_clock, tmp_path):
    sc = Scenario(name="crawl", nodes=150, seed=5, population=Population(relays=3, public=0.5, full_cone=0.2, symmetric=0.3, providers=0.5))
    sim = Simulation(sc)
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.world.run)
            sim.warm_start()
            await sim.warm_announce()
            # one server is gone: the crawler hears of it from stale tables but cannot reach it
            gone = next(p for p in sim.servers if p not in sim.relays and p not in sim.models_of)
            sim.leave(gone)
            client = next(p for p in sim.peers.values() if not p.node.public)
            relay = sim.peers[sim.relays[0]]
            result = await crawl(SimCrawlPort(client), [(relay.peer_id, relay.listen_addrs)], rate_per_s=50, timeout_s=10)
            nursery.cancel_scope.cancel()
    servers = {p for p, n in sim.world.nodes.items() if n.public and n.alive}
    providers = set(sim.models_of)
    found = set(result.peers)
    assert servers <= found  # every live DHT server
    assert providers <= found  # every provider, including relayed ones no table holds
    assert gone in found and result.peers[gone].responded is False
    assert all(result.peers[p].responded for p in servers)
    relayed = {p for p in providers if not sim.world.nodes[p].public}
    assert relayed and all(result.peers[p].relayed for p in relayed)
    # routing-table edges: what each server reported is in its table
    for p in servers:
        table = set(sim.peers[p].dht.table)
        assert result.peers[p].knows <= table | {gone}
        assert len(result.peers[p].knows) >= min(len(table), 20) // 2
    summary = summarise_crawl(result)
    assert summary["peers"] == len(found)
    assert summary["relayed"] == len(relayed)
    assert sum(summary["models"].values()) == len(providers)
    assert set(summary["models"]) == set(sim.models_of.values())
    g = to_graph(result)
    path = tmp_path / "crawl.graphml"
    nx.write_graphml(g, path)
    back = nx.read_graphml(path)
    assert back.number_of_nodes() == len(found) and back.number_of_edges() == summary["routing_edges"] - sum(
        1 for r in result.peers.values() for o in r.knows if o not in result.peers
    )
    assert back.nodes[next(iter(relayed))]["reachability"] == "relayed"
