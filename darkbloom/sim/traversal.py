"""Iterative Kademlia lookup as a pure state machine: rounds of alpha queries toward a target key.

It follows py-libp2p 0.8.1's `find_closest_peers_network` round structure: each round queries
up to `alpha` not-yet-queried peers among the `k` closest known; a round that brings no new
peers ends the lookup once every one of the k closest was queried; a round that does not change
the k closest ends it too (libp2p's "no improvement" rule), unless fewer than `beta` of them were
queried. `strict=True` instead keeps going until all k closest have been queried (classic
Kademlia). Unlike libp2p, peers that failed are dropped from the result.

Depth: a peer from our own table has depth 0; one learned from a depth-d peer's reply has d+1.
`hops` of a result is the depth of its nearest peer, i.e. how many sequential RPCs it took to
learn it. The caller does the I/O: `start_round()` -> query each -> `on_reply`/`on_failure` ->
`end_round()`, until `done`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["Lookup", "LookupResult", "DEFAULT_ALPHA", "DEFAULT_BETA", "MAX_ROUNDS", "run_sync"]

DEFAULT_ALPHA = 3  # Kademlia paper; py-libp2p 0.8.1 ships ALPHA = 10
DEFAULT_BETA = 3  # py-libp2p BETA
MAX_ROUNDS = 20  # py-libp2p MAX_PEER_LOOKUP_ROUNDS


@dataclass(frozen=True, slots=True)
class LookupResult:
    target: int
    closest: tuple[str, ...]  # nearest first, up to k, failed peers removed
    responded: frozenset[str]  # peers that answered
    rounds: int
    queries: int
    failures: int
    hops: int  # depth of closest[0]; -1 when nothing was found

    @property
    def found(self) -> bool:
        return bool(self.closest)


class Lookup:
    """One lookup's state; see the module docstring for the protocol."""

    def __init__(
        self,
        target: int,
        seeds: Iterable[str],
        key_of: Callable[[str], int],
        *,
        k: int = 20,
        alpha: int = DEFAULT_ALPHA,
        beta: int = DEFAULT_BETA,
        max_rounds: int = MAX_ROUNDS,
        local_id: str | None = None,
        strict: bool = False,
    ) -> None:
        if k < 1 or alpha < 1:
            raise ValueError("k and alpha must be at least 1")
        self.target = target
        self.k = k
        self.alpha = alpha
        self.beta = beta
        self.max_rounds = max_rounds
        self.strict = strict
        self._key_of = key_of
        self._local = local_id
        self.depth: dict[str, int] = {}
        for peer in seeds:
            if peer != local_id and peer not in self.depth:
                self.depth[peer] = 0
        self.candidates: list[str] = self._sorted(self.depth)[:k]
        self.queried: set[str] = set()
        self.responded: set[str] = set()
        self.failed: set[str] = set()
        self.rounds = 0
        self.done = not self.candidates
        self._in_flight: set[str] = set()
        self._new: list[str] = []

    def _sorted(self, peers: Iterable[str]) -> list[str]:
        key_of, target = self._key_of, self.target
        return sorted(peers, key=lambda p: key_of(p) ^ target)

    def start_round(self) -> list[str]:
        """The peers to query now; empty (and `done`) when the lookup is over."""
        if self.done:
            return []
        if self._in_flight:
            raise RuntimeError("start_round before the previous round ended")
        if self.rounds >= self.max_rounds:
            self.done = True
            return []
        batch = [p for p in self.candidates if p not in self.queried][: self.alpha]
        if not batch:
            self.done = True
            return []
        self.rounds += 1
        self.queried.update(batch)
        self._in_flight = set(batch)
        self._new = []
        return batch

    def on_reply(self, peer: str, closer: Iterable[str]) -> None:
        if peer not in self._in_flight:
            raise RuntimeError(f"reply from {peer} that was not queried this round")
        self._in_flight.discard(peer)
        self.responded.add(peer)
        depth = self.depth[peer] + 1
        for p in closer:
            if p == self._local or p in self.depth:
                continue
            self.depth[p] = depth
            self._new.append(p)

    def on_failure(self, peer: str) -> None:
        if peer not in self._in_flight:
            raise RuntimeError(f"failure of {peer} that was not queried this round")
        self._in_flight.discard(peer)
        self.failed.add(peer)

    def end_round(self) -> None:
        if self._in_flight:
            raise RuntimeError(f"{len(self._in_flight)} queries of this round are still in flight")
        old = [p for p in self.candidates if p not in self.failed]
        merged = self._sorted(old + self._new)[: self.k]
        self.candidates = merged
        unqueried = any(p not in self.queried for p in merged)
        if not unqueried:
            self.done = True
        elif self.strict:
            return
        elif not self._new:
            return  # libp2p: nothing new, but unqueried peers remain among the k closest
        elif merged == old:
            queried_in_top = sum(1 for p in merged if p in self.queried)
            if queried_in_top >= self.beta or len(merged) < self.beta:
                self.done = True

    def result(self) -> LookupResult:
        closest = tuple(p for p in self.candidates if p not in self.failed)
        return LookupResult(
            target=self.target,
            closest=closest,
            responded=frozenset(self.responded),
            rounds=self.rounds,
            queries=len(self.queried),
            failures=len(self.failed),
            hops=self.depth[closest[0]] if closest else -1,
        )


def run_sync(lookup: Lookup, query: Callable[[str], Iterable[str] | None]) -> LookupResult:
    """Drive `lookup` with a synchronous `query(peer)`; it returns closer peers, or None for a failure.

    Used where the simulator needs no network (warm start of routing tables, unit tests).
    """
    while True:
        batch = lookup.start_round()
        if not batch:
            return lookup.result()
        for peer in batch:
            closer = query(peer)
            if closer is None:
                lookup.on_failure(peer)
            else:
                lookup.on_reply(peer, closer)
        lookup.end_round()
