"""Kademlia routing tables, pure: the textbook k-buckets and py-libp2p 0.8.1's splitting buckets.

Two models behind one interface (`observe`, `replace`, `remove`, `closest`, `refresh_targets`,
`in`, `len`, iteration), chosen per scenario by `DhtParams.routing_table` through `new_table`:

- `"kademlia"` (`RoutingTable`): bucket i holds up to k peers sharing exactly i prefix bits
  with us, so a table holds about k x log2(N / k) peers and lookups take ~log2(N)/5 hops.
- `"py-libp2p-0.8.1"` (`SplittingRoutingTable`), read from 0.8.1's kad_dht/routing_table.py:
  buckets are ranges of the absolute key space, the first is all of it; a full bucket that
  must take a new peer splits at its range's midpoint (any full bucket, not only the one
  holding our own key), again while the peer's half is still full, until the table has 256
  buckets (MAXIMUM_BUCKETS, counted over the table); buckets never merge. Only then does a
  full bucket keep its oldest live peer and drop the newcomer. So a table holds every server
  it has heard of up to roughly 256 x k x ln 2, ~3,500 peers.

Both use k = 20 (BUCKET_SIZE) and 256-bit keys from sha256 of peer ids. Not modelled: 0.8.1's
per-bucket cap of 2 peers per globally routable /24 (MAX_PEERS_PER_SUBNET; loopback, private
and relayed addresses are exempt, and the simulator has no IP addresses). No I/O and no clock:
a full bucket does not ping by itself; `observe` reports the oldest peer so the caller (the DHT
node) can decide, and `remove` drops a peer that failed.

Peers are stored by peer id (shared strings) and their keys come from a `KeySpace`, so 10,000
tables of ~200 entries cost a few tens of MB.
"""

from __future__ import annotations

import heapq
import random
from bisect import bisect_right
from collections.abc import Callable, Iterator
from typing import Literal, Protocol

from darkbloom.sim.keys import KEY_BITS, content_key

__all__ = [
    "DEFAULT_K", "MAX_BUCKETS", "ROUTING_TABLE_MODELS", "RoutingTable", "RoutingTableModel", "SplittingRoutingTable",
    "Table", "new_table",
]

DEFAULT_K = 20  # py-libp2p BUCKET_SIZE
MAX_BUCKETS = 256  # py-libp2p 0.8.1 MAXIMUM_BUCKETS: buckets per table, counted over the whole table
REFRESH_DEPTH = 24  # kademlia model: refresh buckets up to this prefix length (deeper ones are empty below ~16M nodes)

RoutingTableModel = Literal["kademlia", "py-libp2p-0.8.1"]
ROUTING_TABLE_MODELS: tuple[str, ...] = ("kademlia", "py-libp2p-0.8.1")


class Table(Protocol):
    """What the DHT node needs from a routing table, whichever the model."""

    local_id: str
    local_key: int
    k: int

    def observe(self, peer_id: str) -> str | None: ...
    def replace(self, old: str, new: str) -> bool: ...
    def remove(self, peer_id: str) -> bool: ...
    def closest(self, target: int, count: int | None = None, *, exclude: str | None = None) -> list[str]: ...
    def refresh_targets(self, rng: random.Random) -> Iterator[int]: ...
    def __contains__(self, peer_id: object) -> bool: ...
    def __iter__(self) -> Iterator[str]: ...
    def __len__(self) -> int: ...


def new_table(model: str, local_id: str, key_of: Callable[[str], int], *, k: int = DEFAULT_K,
              max_buckets: int = MAX_BUCKETS) -> Table:
    """A routing table of `model` ("kademlia" or "py-libp2p-0.8.1")."""
    if model == "kademlia":
        return RoutingTable(local_id, key_of, k=k)
    if model == "py-libp2p-0.8.1":
        return SplittingRoutingTable(local_id, key_of, k=k, max_buckets=max_buckets)
    raise ValueError(f"unknown routing table model {model!r}; known: {', '.join(ROUTING_TABLE_MODELS)}")


class RoutingTable:
    """The peers one node knows, in `KEY_BITS` buckets; bucket i holds peers sharing i prefix bits."""

    __slots__ = ("local_id", "local_key", "k", "_key_of", "_buckets", "_size")

    def __init__(self, local_id: str, key_of: Callable[[str], int], *, k: int = DEFAULT_K) -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        self.local_id = local_id
        self.local_key = key_of(local_id)
        self.k = k
        self._key_of = key_of
        # bucket index -> peer ids, oldest first; allocated lazily (most buckets stay empty)
        self._buckets: dict[int, list[str]] = {}
        self._size = 0

    def bucket_index(self, key: int) -> int:
        """Common prefix length of `key` with the local key (KEY_BITS for the local key itself)."""
        return KEY_BITS - (self.local_key ^ key).bit_length()

    def observe(self, peer_id: str) -> str | None:
        """Record that `peer_id` was seen alive.

        Returns None when the peer is now in the table (added, or moved to most-recent), or the
        oldest peer of its full bucket: the caller may ping that one and `replace` it if dead.
        """
        if peer_id == self.local_id:
            return None
        idx = self.bucket_index(self._key_of(peer_id))
        bucket = self._buckets.get(idx)
        if bucket is None:
            bucket = self._buckets[idx] = []
        if _touch(bucket, peer_id):
            return None
        return _admit(self, bucket, peer_id)

    def replace(self, old: str, new: str) -> bool:
        """Swap a dead `old` for `new` in the same bucket; False when `old` is gone or they differ in bucket."""
        idx = self.bucket_index(self._key_of(old))
        bucket = self._buckets.get(idx)
        if not bucket or old not in bucket or self.bucket_index(self._key_of(new)) != idx or new in bucket:
            return False
        bucket.remove(old)
        bucket.append(new)
        return True

    def remove(self, peer_id: str) -> bool:
        idx = self.bucket_index(self._key_of(peer_id))
        bucket = self._buckets.get(idx)
        if not bucket or peer_id not in bucket:
            return False
        bucket.remove(peer_id)
        self._size -= 1
        if not bucket:
            del self._buckets[idx]
        return True

    def closest(self, target: int, count: int | None = None, *, exclude: str | None = None) -> list[str]:
        """Up to `count` (default k) known peers nearest to `target` by XOR, nearest first."""
        count = self.k if count is None else count
        key_of = self._key_of
        buckets = self._buckets

        def dist(p: str) -> int:
            return key_of(p) ^ target

        # Bucket c (c = prefix shared by target and us) is nearest; then all deeper buckets
        # (they differ from the target at bit c); then buckets c-1, c-2, ... each farther.
        c = self.bucket_index(target)
        out = sorted((p for p in buckets.get(c, ()) if p != exclude), key=dist)
        if len(out) >= count:
            return out[:count]
        deeper = [p for i, b in buckets.items() if i > c for p in b if p != exclude]
        out.extend(sorted(deeper, key=dist))
        i = min(c, KEY_BITS) - 1
        while len(out) < count and i >= 0:
            b = buckets.get(i)
            if b:
                out.extend(sorted((p for p in b if p != exclude), key=dist))
            i -= 1
        return out[:count]

    def bucket(self, index: int) -> tuple[str, ...]:
        return tuple(self._buckets.get(index, ()))

    def nonempty_buckets(self) -> list[int]:
        return sorted(self._buckets)

    def refresh_targets(self, rng: random.Random) -> Iterator[int]:
        """Keys to look up to refill the table: one random key in each bucket that is not full,
        up to the deepest non-empty one (at most `REFRESH_DEPTH`). Lazy: a bucket's fullness is
        checked when its turn comes, after the lookups of the earlier keys have run."""
        deepest = max(self.nonempty_buckets(), default=0)
        local = self.local_key
        for i in range(min(deepest, REFRESH_DEPTH)):
            if len(self.bucket(i)) < self.k:
                low = rng.getrandbits(KEY_BITS - 1 - i)
                # our first i bits, then the opposite of our bit i, then random bits
                yield ((local >> (KEY_BITS - i)) << (KEY_BITS - i)) | ((~local >> (KEY_BITS - 1 - i) & 1) << (KEY_BITS - 1 - i)) | low

    def __contains__(self, peer_id: object) -> bool:
        if not isinstance(peer_id, str) or peer_id == self.local_id:
            return False
        bucket = self._buckets.get(self.bucket_index(self._key_of(peer_id)))
        return bool(bucket) and peer_id in bucket

    def __iter__(self) -> Iterator[str]:
        for idx in sorted(self._buckets):
            yield from self._buckets[idx]

    def __len__(self) -> int:
        return self._size


class SplittingRoutingTable:
    """py-libp2p 0.8.1's routing table: key-range buckets, any full bucket splits, up to `max_buckets`.

    Bucket i covers keys [lows[i], lows[i+1]) (the last one up to 2**KEY_BITS); each holds up to
    k peer ids, oldest first. See the module docstring for the rules and their source.
    """

    __slots__ = ("local_id", "local_key", "k", "max_buckets", "_key_of", "_lows", "_buckets", "_size", "splits")

    def __init__(self, local_id: str, key_of: Callable[[str], int], *, k: int = DEFAULT_K,
                 max_buckets: int = MAX_BUCKETS) -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        if max_buckets < 1:
            raise ValueError("max_buckets must be at least 1")
        self.local_id = local_id
        self.local_key = key_of(local_id)
        self.k = k
        self.max_buckets = max_buckets
        self._key_of = key_of
        self._lows: list[int] = [0]  # ascending lower bounds of the buckets' ranges
        self._buckets: list[list[str]] = [[]]
        self._size = 0
        self.splits = 0

    def _index(self, key: int) -> int:
        return bisect_right(self._lows, key) - 1

    def _high(self, i: int) -> int:
        return self._lows[i + 1] if i + 1 < len(self._lows) else 1 << KEY_BITS

    def _split(self, i: int) -> None:
        """Bucket i becomes its lower and upper half (peers keep their order), as 0.8.1's KBucket.split."""
        low, high = self._lows[i], self._high(i)
        mid = (low + high) // 2
        key_of = self._key_of
        old = self._buckets[i]
        self._buckets[i] = [p for p in old if key_of(p) < mid]
        self._buckets.insert(i + 1, [p for p in old if key_of(p) >= mid])
        self._lows.insert(i + 1, mid)
        self.splits += 1

    def observe(self, peer_id: str) -> str | None:
        """Record that `peer_id` was seen alive (0.8.1's RoutingTable.add_peer without the ping).

        Returns None when the peer is now in the table, or the oldest peer of its full bucket
        when the table already has `max_buckets` buckets: the caller may ping it and `replace` it.
        """
        if peer_id == self.local_id:
            return None
        key = self._key_of(peer_id)
        i = self._index(key)
        bucket = self._buckets[i]
        if _touch(bucket, peer_id):
            return None
        while len(bucket) >= self.k and len(self._buckets) < self.max_buckets:
            self._split(i)  # repeated while every peer fell into the newcomer's half
            i = self._index(key)
            bucket = self._buckets[i]
        return _admit(self, bucket, peer_id)

    def replace(self, old: str, new: str) -> bool:
        """Swap a dead `old` for `new` in the same bucket; False when `old` is gone or they differ in bucket."""
        i = self._index(self._key_of(old))
        bucket = self._buckets[i]
        if old not in bucket or new in bucket or self._index(self._key_of(new)) != i:
            return False
        bucket.remove(old)
        bucket.append(new)
        return True

    def remove(self, peer_id: str) -> bool:
        """Drop a peer; its bucket stays (0.8.1 never merges buckets)."""
        bucket = self._buckets[self._index(self._key_of(peer_id))]
        if peer_id not in bucket:
            return False
        bucket.remove(peer_id)
        self._size -= 1
        return True

    def closest(self, target: int, count: int | None = None, *, exclude: str | None = None) -> list[str]:
        """Up to `count` (default k) known peers nearest to `target` by XOR, nearest first (a full
        sort over the table, as 0.8.1's find_local_closest_peers does)."""
        count = self.k if count is None else count
        key_of = self._key_of
        peers = (p for b in self._buckets for p in b if p != exclude)
        return heapq.nsmallest(count, peers, key=lambda p: key_of(p) ^ target)

    def ranges(self) -> list[tuple[int, int, int]]:
        """(low, high, peers) of every bucket, in key order."""
        return [(self._lows[i], self._high(i), len(b)) for i, b in enumerate(self._buckets)]

    def refresh_targets(self, rng: random.Random) -> Iterator[int]:
        """0.8.1's refresh_routing_table after its self lookup: one lookup per non-empty bucket,
        walking the live bucket list as 0.8.1 does (buckets split by the earlier lookups are
        visited too). 0.8.1 draws a random key in the bucket's range but then looks up the
        sha256 of those bytes (find_local_closest_peers and sort_peer_ids_by_distance hash the
        key they are given), so each lookup goes to a uniformly random place; so do these."""
        i = 0
        while i < len(self._buckets):
            if self._buckets[i]:
                yield content_key(rng.randrange(self._lows[i], self._high(i)).to_bytes(KEY_BITS // 8, "big"))
            i += 1

    def __contains__(self, peer_id: object) -> bool:
        if not isinstance(peer_id, str) or peer_id == self.local_id:
            return False
        return peer_id in self._buckets[self._index(self._key_of(peer_id))]

    def __iter__(self) -> Iterator[str]:
        for bucket in self._buckets:
            yield from bucket

    def __len__(self) -> int:
        return self._size

    def bucket_count(self) -> int:
        return len(self._buckets)


def _touch(bucket: list[str], peer_id: str) -> bool:
    """Move a peer already in `bucket` to its most-recent end; False when it is not there."""
    if peer_id not in bucket:
        return False
    bucket.remove(peer_id)
    bucket.append(peer_id)
    return True


def _admit(table: RoutingTable | SplittingRoutingTable, bucket: list[str], peer_id: str) -> str | None:
    """Add a new peer to `bucket` when it has room (None), else name its oldest peer."""
    if len(bucket) < table.k:
        bucket.append(peer_id)
        table._size += 1
        return None
    return bucket[0]
