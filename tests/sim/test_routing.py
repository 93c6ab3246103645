"""Pure Kademlia parts: routing table buckets and eviction, k-closest, lookup state machine."""

from __future__ import annotations

import math
import random

import pytest

from darkbloom.sim.keys import KEY_BITS, KeySpace, content_key, key_of_peer
from darkbloom.sim.routing import RoutingTable
from darkbloom.sim.traversal import Lookup, run_sync


def names(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [f"peer-{rng.getrandbits(64):016x}" for _ in range(n)]


def test_bucket_index_is_common_prefix_length():
    ks = KeySpace()
    table = RoutingTable("me", ks)
    for p in names(50):
        idx = table.bucket_index(ks(p))
        xor = ks("me") ^ ks(p)
        assert xor >> (KEY_BITS - idx) == 0  # the first idx bits agree
        assert (xor >> (KEY_BITS - idx - 1)) & 1 == 1  # and bit idx differs
    assert table.bucket_index(ks("me")) == KEY_BITS


def test_full_bucket_reports_oldest_and_replace_swaps():
    ks = KeySpace()
    table = RoutingTable("me", ks, k=2)
    by_bucket: dict[int, list[str]] = {}
    for p in names(400):
        by_bucket.setdefault(table.bucket_index(ks(p)), []).append(p)
    a, b, c = by_bucket[0][:3]  # bucket 0 holds half of all keys
    assert table.observe(a) is None and table.observe(b) is None
    assert table.observe(c) == a  # full: the least recently seen is offered for eviction
    assert c not in table
    assert table.observe(a) is None  # seen again: a becomes the most recent
    assert table.observe(c) == b
    assert table.replace(b, c)
    assert list(table.bucket(0)) == [a, c] and len(table) == 2
    assert table.remove(a) and a not in table and len(table) == 1
    assert not table.remove(a)


def test_closest_matches_brute_force():
    ks = KeySpace()
    peers = names(300)
    table = RoutingTable("me", ks, k=1000)
    for p in peers:
        assert table.observe(p) is None
    assert table.observe("me") is None and "me" not in table
    target = content_key("model-x")
    want = sorted(peers, key=lambda p: ks(p) ^ target)[:20]
    assert table.closest(target, 20) == want
    assert table.closest(target, 5, exclude=want[0]) == want[1:6]


def perfect_tables(peers: list[str], ks: KeySpace, k: int) -> dict[str, RoutingTable]:
    tables = {}
    for p in peers:
        t = RoutingTable(p, ks, k=k)
        for q in peers:
            t.observe(q)
        tables[p] = t
    return tables


def lookup_hops(n: int, samples: int, seed: int, alpha: int = 3) -> tuple[float, float]:
    ks = KeySpace()
    peers = names(n, seed)
    tables = perfect_tables(peers, ks, k=20)
    rng = random.Random(seed)
    hops, found = [], 0
    for _ in range(samples):
        src, dst = rng.sample(peers, 2)
        target = ks(dst)
        lookup = Lookup(target, tables[src].closest(target), ks, k=20, alpha=alpha, local_id=src)
        res = run_sync(lookup, lambda p: tables[p].closest(target, exclude=None))
        found += res.closest[0] == dst
        hops.append(res.hops)
    return sum(hops) / len(hops), found / samples


def test_lookup_finds_existing_peer_and_hops_grow_like_log_n():
    sizes = [32, 128, 512, 2048]
    results = [lookup_hops(n, 60, seed=n) for n in sizes]
    for mean_hops, success in results:
        assert success == 1.0  # perfect tables, no failures: every lookup finds its target
    means = [h for h, _ in results]
    assert all(b > a for a, b in zip(means, means[1:])), means
    # linear in log2(N): the slope per doubling is positive and steady
    xs = [math.log2(n) for n in sizes]
    mx, my = sum(xs) / len(xs), sum(means) / len(means)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, means)) / sum((x - mx) ** 2 for x in xs)
    ss_res = sum((y - (my + slope * (x - mx))) ** 2 for x, y in zip(xs, means))
    ss_tot = sum((y - my) ** 2 for y in means)
    assert slope > 0.1
    assert 1 - ss_res / ss_tot > 0.9
    assert means[-1] <= math.log2(sizes[-1])


def test_lookup_survives_failed_peers_and_drops_them():
    ks = KeySpace()
    peers = names(400, 7)
    tables = perfect_tables(peers, ks, k=20)
    dead = set(peers[::3])
    rng = random.Random(3)
    alive = [p for p in peers if p not in dead]
    src, dst = rng.sample(alive, 2)
    target = ks(dst)
    res = run_sync(
        Lookup(target, tables[src].closest(target), ks, local_id=src),
        lambda p: None if p in dead else tables[p].closest(target),
    )
    assert res.failures > 0
    assert not dead & set(res.closest)
    assert res.closest[0] == dst


def test_lookup_state_machine_rules():
    ks = KeySpace()
    lk = Lookup(123, [], ks)
    assert lk.done and lk.start_round() == [] and lk.result().hops == -1
    lk = Lookup(123, ["a", "b", "c", "d"], ks, alpha=2)
    batch = lk.start_round()
    assert len(batch) == 2
    with pytest.raises(RuntimeError):
        lk.end_round()  # queries in flight
    with pytest.raises(RuntimeError):
        lk.on_reply("zzz", [])
    lk.on_reply(batch[0], ["e"])
    lk.on_failure(batch[1])
    lk.end_round()
    assert lk.depth["e"] == 1 and batch[1] not in lk.candidates
    assert not lk.done
    while not lk.done:
        for p in lk.start_round():
            lk.on_reply(p, [])
        if not lk.done:
            lk.end_round()
    res = lk.result()
    assert res.queries == 5 and res.failures == 1 and set(res.responded) == {"a", "b", "c", "d", "e"} - {batch[1]}


def test_peer_keys_are_sha256_of_peer_id_bytes():
    import hashlib

    from darkbloom.identity import Identity
    from darkbloom.p2p.keys import b58decode, peer_id_from_public_key

    pid = peer_id_from_public_key(Identity.from_seed(bytes(32)).public_key)
    assert pid.startswith("12D3KooW")
    assert key_of_peer(pid) == int.from_bytes(hashlib.sha256(b58decode(pid)).digest(), "big")
