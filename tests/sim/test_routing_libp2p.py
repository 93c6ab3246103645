"""py-libp2p 0.8.1's routing table model (darkbloom.sim.routing.SplittingRoutingTable), pure.

The rules come from 0.8.1's kad_dht/routing_table.py: key-range buckets, any full bucket splits
at its midpoint (again while the newcomer's half is full) up to 256 buckets in the table, no
merging; only then does a full bucket keep its oldest peer.
"""

from __future__ import annotations

import random

import pytest

from darkbloom.errors import ConfigError
from darkbloom.sim.keys import KEY_BITS, KeySpace, content_key
from darkbloom.sim.routing import MAX_BUCKETS, RoutingTable, SplittingRoutingTable, new_table
from darkbloom.sim.traversal import Lookup, run_sync

TOP = 1 << KEY_BITS
HALF = 1 << (KEY_BITS - 1)


def fixed_keys(mapping: dict[str, int]):
    """A key_of with keys chosen by the test (exact bucket boundaries)."""
    return mapping.__getitem__


def names(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [f"peer-{rng.getrandbits(64):016x}" for _ in range(n)]


def test_one_bucket_until_k_then_split_at_the_midpoint_keeping_order():
    keys = {"me": 5}
    low = [f"l{i}" for i in range(10)]
    high = [f"h{i}" for i in range(10)]
    for i, p in enumerate(low):
        keys[p] = 1000 + i
    for i, p in enumerate(high):
        keys[p] = HALF + 1000 + i
    keys["new"] = HALF + 7
    table = SplittingRoutingTable("me", fixed_keys(keys), k=20)
    order = [p for pair in zip(low, high) for p in pair]  # interleaved arrival
    for p in order:
        assert table.observe(p) is None
    assert table.bucket_count() == 1 and len(table) == 20
    assert table.observe("new") is None  # full: split instead of refusing
    assert table.ranges() == [(0, HALF, 10), (HALF, TOP, 11)]
    assert list(table) == low + high + ["new"]  # each half keeps arrival order, the newcomer last
    assert table.splits == 1 and "new" in table


def test_a_full_far_bucket_splits_where_textbook_kademlia_refuses():
    # Our key is in the lower half; 21 peers all in the upper half (none shares our first bit).
    keys = {"me": 1}
    far = [f"f{i}" for i in range(21)]
    for i, p in enumerate(far):
        keys[p] = HALF + (i << 200)
    key_of = fixed_keys(keys)
    libp2p = SplittingRoutingTable("me", key_of, k=20)
    textbook = RoutingTable("me", key_of, k=20)
    for p in far[:20]:
        assert libp2p.observe(p) is None and textbook.observe(p) is None
    assert textbook.observe(far[20]) == far[0]  # textbook bucket 0 is full: the oldest is offered
    assert far[20] not in textbook and len(textbook) == 20
    assert libp2p.observe(far[20]) is None  # 0.8.1 splits the far bucket too
    assert far[20] in libp2p and len(libp2p) == 21 and libp2p.bucket_count() >= 2


def test_splits_again_while_the_newcomers_half_is_still_full():
    keys = {"me": TOP - 1}
    crowd = [f"c{i}" for i in range(20)]
    for i, p in enumerate(crowd):
        keys[p] = (i + 1) << 240  # all below 2**245
    keys["new"] = 1 << 252
    table = SplittingRoutingTable("me", fixed_keys(keys), k=20)
    for p in crowd:
        table.observe(p)
    assert table.observe("new") is None
    # halves at 2**255, 2**254, 2**253, 2**252: four splits before "new" finds room
    assert table.splits == 4 and table.bucket_count() == 5
    assert [r[:2] for r in table.ranges()] == [
        (0, 1 << 252), (1 << 252, 1 << 253), (1 << 253, 1 << 254), (1 << 254, 1 << 255), (1 << 255, TOP)]
    assert [r[2] for r in table.ranges()] == [20, 1, 0, 0, 0]


def test_at_the_bucket_cap_a_full_bucket_keeps_its_oldest_and_can_replace():
    ks = KeySpace()
    table = SplittingRoutingTable("me", ks, k=2, max_buckets=3)
    peers = names(200, 3)
    refused = [p for p in peers if table.observe(p) is not None]
    assert table.bucket_count() == 3  # never more than the cap
    assert len(table) <= 3 * 2 and refused
    assert all(lo < hi for lo, hi, _n in table.ranges())
    p = refused[0]
    oldest = table.observe(p)
    assert oldest is not None and oldest in table and p not in table
    assert table.replace(oldest, p) and p in table and oldest not in table
    assert not table.replace(oldest, p)  # old is gone now


def test_holds_every_server_of_a_small_network_and_saturates_at_256_buckets():
    ks = KeySpace()
    peers = names(1000, 5)
    libp2p = SplittingRoutingTable("me", ks)
    textbook = RoutingTable("me", ks)
    for p in peers:
        libp2p.observe(p)
        textbook.observe(p)
    assert len(libp2p) == 1000  # ~70 buckets are enough: nobody is refused
    assert len(textbook) < 200  # k per prefix length: about k x log2(N / k)
    big = SplittingRoutingTable("me", ks)
    many = names(6000, 6)
    for p in many:
        big.observe(p)
    assert big.bucket_count() == MAX_BUCKETS
    assert MAX_BUCKETS * 20 // 2 < len(big) < 6000  # capped near 256 x k x ln 2


def test_closest_remove_and_no_merging():
    ks = KeySpace()
    peers = names(300, 8)
    table = SplittingRoutingTable("me", ks)
    for p in peers:
        table.observe(p)
    target = content_key("model-x")
    want = sorted(peers, key=lambda p: ks(p) ^ target)
    assert table.closest(target) == want[:20]
    assert table.closest(target, 5, exclude=want[0]) == want[1:6]
    buckets = table.bucket_count()
    for p in peers[:150]:
        assert table.remove(p)
    assert not table.remove(peers[0]) and peers[0] not in table
    assert len(table) == 150 and table.bucket_count() == buckets  # buckets never merge
    assert table.observe("me") is None and "me" not in table


def test_refresh_targets_one_per_nonempty_bucket_hashed_like_libp2p():
    ks = KeySpace()
    table = SplittingRoutingTable("me", ks)
    for p in names(120, 9):
        table.observe(p)
    nonempty = [(lo, hi) for lo, hi, n in table.ranges() if n]
    targets = list(table.refresh_targets(random.Random(4)))
    assert len(targets) == len(nonempty)
    # 0.8.1 draws a key inside the bucket, then looks up its sha256: reproduce the draws
    rng = random.Random(4)
    assert targets == [content_key(rng.randrange(lo, hi).to_bytes(32, "big")) for lo, hi in nonempty]


def test_lookups_need_no_hop_when_tables_hold_every_server():
    """The real-host finding in pure form: 300 servers, each table fed every server."""
    ks = KeySpace()
    peers = names(300, 11)
    rng = random.Random(2)
    for model, expect_zero in (("py-libp2p-0.8.1", True), ("kademlia", False)):
        tables = {}
        for p in peers:
            t = new_table(model, p, ks)
            for q in peers:
                t.observe(q)
            tables[p] = t
        hops = []
        for _ in range(60):
            src, dst = rng.sample(peers, 2)
            target = ks(dst)
            res = run_sync(Lookup(target, tables[src].closest(target), ks, local_id=src),
                           lambda p, target=target: tables[p].closest(target))
            assert res.closest[0] == dst
            hops.append(res.hops)
        assert (max(hops) == 0) is expect_zero, (model, hops)


def test_the_model_is_a_scenario_option():
    from darkbloom.sim.engine import Simulation
    from darkbloom.sim.scenario import parse_scenario

    with pytest.raises(ValueError, match="unknown routing table model"):
        new_table("chord", "me", KeySpace())
    with pytest.raises(ConfigError):
        parse_scenario({"name": "x", "nodes": 10, "dht": {"routing_table": "chord"}})
    sc = parse_scenario({"name": "x", "nodes": 10, "dht": {"routing_table": "py-libp2p-0.8.1", "admit_learned": True}})
    assert sc.dht.routing_table == "py-libp2p-0.8.1" and sc.dht.admit_learned
    sim = Simulation(sc)
    peer = sim.new_peer(relay=True)
    assert isinstance(peer.dht.table, SplittingRoutingTable)
    default = Simulation(parse_scenario({"name": "y", "nodes": 10}))
    assert isinstance(default.new_peer(relay=True).dht.table, RoutingTable)
