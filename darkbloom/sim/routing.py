"""Kademlia routing table, pure: k-buckets by common prefix length, least-recently-seen order.

Parameterised like py-libp2p's kad_dht (k = 20 peers per bucket, 256-bit keys from sha256 of
peer ids). No I/O and no clock: a full bucket does not ping by itself; `observe` reports the
oldest peer so the caller (the DHT node) can decide, and `remove` drops a peer that failed.

Peers are stored by peer id (shared strings) and their keys come from a `KeySpace`, so 10,000
tables of ~200 entries cost a few tens of MB.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from darkbloom.sim.keys import KEY_BITS

__all__ = ["RoutingTable", "DEFAULT_K"]

DEFAULT_K = 20  # py-libp2p BUCKET_SIZE


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
        if peer_id in bucket:
            bucket.remove(peer_id)
            bucket.append(peer_id)
            return None
        if len(bucket) < self.k:
            bucket.append(peer_id)
            self._size += 1
            return None
        return bucket[0]

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
