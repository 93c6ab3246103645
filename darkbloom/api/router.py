"""Peer selection for the shim, pure: candidates + stats + hints + now -> an ordered list.

Filter by model (and weights digest pin), required features, region, node class and max
price; skip peers whose circuit breaker is open; score the rest by
reputation x decode speed x (1 - load) x latency factor (and, when the client prefers cost,
by price). No I/O and no clock here: callers pass `now` (trio.current_time() or a test value).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "BREAKER_THRESHOLD",
    "Candidate",
    "PeerStats",
    "RouteHints",
    "breaker_open",
    "filter_candidates",
    "rank",
    "record_failure",
    "record_load",
    "record_success",
    "score",
]

BREAKER_THRESHOLD = 3  # consecutive failures that open a peer's breaker
BREAKER_BASE_S = 5.0  # first open period; doubles per further failure
BREAKER_MAX_S = 120.0
LOAD_FRESH_S = 30.0  # a piggybacked load older than this no longer counts
LATENCY_REF_S = 0.2  # latency at which the latency factor is 1/2
DEFAULT_REPUTATION = 0.5  # a peer with no settled history yet
LATENCY_EWMA = 0.3


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteHints:
    """What the client asked for (the `darkbloom` object and the features its request needs)."""

    model: str
    digest: str | None = None  # weights digest pin
    features: frozenset[str] = frozenset()  # "tools", "json", "logprobs", "embeddings"
    region: str | None = None
    node_class: str | None = None
    max_price: int | None = None  # micro-credits per 1M tokens, input and output alike
    prefer: Literal["latency", "cost"] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One peer able to serve one model, as its capability record describes it."""

    peer_id: str
    model: str
    digest: str = ""
    features: frozenset[str] = frozenset()
    region: str = ""
    node_class: str = ""
    price_input_per_m: int = 0
    price_output_per_m: int = 0
    decode_tps: float = 0.0  # measured by the node; 0: unknown
    max_concurrent: int = 1
    context_length: int = 0
    relayed: bool = False
    addrs: tuple[str, ...] = ()


@dataclass(slots=True)
class PeerStats:
    """What the shim has seen of one peer. Mutated only through the record_* functions."""

    latency_s: float | None = None  # EWMA of request -> first content frame
    load: float = 0.0  # (active + queued) / max_concurrent, last piggybacked value
    load_at: float = -math.inf
    inflight: int = 0  # requests this shim has open on the peer now
    reputation: float = DEFAULT_REPUTATION  # 0..1, from settled receipts when known
    consecutive_failures: int = 0
    open_until: float = -math.inf
    successes: int = 0
    failures: int = 0


def breaker_open(stats: PeerStats | None, now: float) -> bool:
    return stats is not None and now < stats.open_until


def record_success(stats: PeerStats, now: float, latency_s: float | None = None) -> None:
    stats.consecutive_failures = 0
    stats.open_until = -math.inf
    stats.successes += 1
    if latency_s is not None:
        if stats.latency_s is None:
            stats.latency_s = latency_s
        else:
            stats.latency_s += LATENCY_EWMA * (latency_s - stats.latency_s)


def record_failure(stats: PeerStats, now: float) -> None:
    """A failure before the first byte. Enough in a row open the breaker (half-open after)."""
    stats.consecutive_failures += 1
    stats.failures += 1
    over = stats.consecutive_failures - BREAKER_THRESHOLD
    if over >= 0:
        stats.open_until = now + min(BREAKER_MAX_S, BREAKER_BASE_S * (2**over))


def record_load(stats: PeerStats, now: float, *, active: int, queued: int, max_concurrent: int, paused: bool = False) -> None:
    stats.load = 1.0 if paused else (active + queued) / max(1, max_concurrent)
    stats.load_at = now


def filter_candidates(candidates: Iterable[Candidate], hints: RouteHints) -> tuple[list[Candidate], str]:
    """The candidates that satisfy `hints`, and when none do, the reason (for a 503 message)."""
    pool = [c for c in candidates if c.model == hints.model]
    if not pool:
        return [], f"no provider for model {hints.model}"
    steps: list[tuple[str, object]] = []
    if hints.digest:
        steps.append((f"weights digest {hints.digest[:16]}", lambda c: c.digest == hints.digest))
    if hints.features:
        missing = sorted(hints.features)
        steps.append((f"features {', '.join(missing)}", lambda c: hints.features <= c.features))
    if hints.region:
        steps.append((f"region {hints.region}", lambda c: c.region == hints.region))
    if hints.node_class:
        from darkbloom.api.trust.classes import class_satisfies  # here: the trust package imports this module

        steps.append((f"node class {hints.node_class} or higher",
                      lambda c: class_satisfies(hints.node_class, c.node_class)))
    if hints.max_price is not None:
        steps.append(
            (f"max price {hints.max_price}",
             lambda c: c.price_input_per_m <= hints.max_price and c.price_output_per_m <= hints.max_price),
        )
    for what, keep in steps:
        pool = [c for c in pool if keep(c)]  # type: ignore[operator]
        if not pool:
            return [], f"no provider for model {hints.model} with {what}"
    return pool, ""


def _load(c: Candidate, stats: PeerStats | None, now: float) -> float:
    if stats is None:
        return 0.0
    reported = stats.load if now - stats.load_at <= LOAD_FRESH_S else 0.0
    own = stats.inflight / max(1, c.max_concurrent)
    return min(1.0, max(reported, own))


def score(c: Candidate, stats: PeerStats | None, hints: RouteHints, now: float) -> float:
    """reputation x decode speed x (1 - load) x latency factor [x cost factor]. Higher is better."""
    reputation = stats.reputation if stats is not None else DEFAULT_REPUTATION
    reputation = max(0.01, min(1.0, reputation)) / (1 + (stats.consecutive_failures if stats else 0))
    speed = c.decode_tps if c.decode_tps > 0 else 1.0
    free = max(0.02, 1.0 - _load(c, stats, now))  # a full peer may still queue: rank it last, keep it
    latency = stats.latency_s if stats is not None and stats.latency_s is not None else LATENCY_REF_S
    latency_factor = LATENCY_REF_S / (LATENCY_REF_S + latency)
    if c.relayed:
        latency_factor *= 0.8  # one more hop, and a relay that is CPU-bound
    if hints.prefer == "latency":
        latency_factor **= 2
    value = reputation * speed * free * latency_factor
    if hints.prefer == "cost":
        value /= 1.0 + (c.price_input_per_m + c.price_output_per_m) / 1_000_000
    return value


def rank(
    candidates: Iterable[Candidate],
    stats: Mapping[str, PeerStats],
    hints: RouteHints,
    now: float,
) -> tuple[list[Candidate], str]:
    """Filtered, breaker-checked, best first (ties by peer id). Empty list -> reason."""
    pool, reason = filter_candidates(candidates, hints)
    if not pool:
        return [], reason
    seen: dict[str, Candidate] = {}
    for c in pool:  # one entry per peer (discovery may repeat providers)
        seen.setdefault(c.peer_id, c)
    usable = [c for c in seen.values() if not breaker_open(stats.get(c.peer_id), now)]
    if not usable:
        return [], f"every provider of model {hints.model} failed recently"
    usable.sort(key=lambda c: (-score(c, stats.get(c.peer_id), hints, now), c.peer_id))
    return usable, ""

