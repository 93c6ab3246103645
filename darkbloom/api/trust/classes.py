"""Node classes and region plausibility, pure: class from measured speed and observed uptime, declared region checked against round-trip times, and the request filters.

Classes (ordered; a request asking for one accepts any higher one):
    pro       >= 99% uptime over the last day, observed for >= 23 h of it, decode >= 20 tok/s
    standard  >= 90% uptime, observed for >= 1 h
    basic     observed for >= 1 h
    new       seen for less than an hour
The class a node declares in its record is not trusted: the shim and the relay derive it
from what they measured (`UptimeTracker` fed by status probes or request outcomes, and the
decode speed measured on real answers, or the record's self-benchmark when nothing else).

Region: declared by the operator; a round trip cannot be faster than light in fibre
(~200,000 km/s) over the great-circle distance, so a node whose fastest RTT from a shim in a
known region is well below that minimum is not where it says (it is closer). A node
claiming the shim's own region whose fastest RTT is far above `near_max_rtt_s` is not
either. Congestion only adds delay, so the *minimum* RTT over samples is what counts.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "CLASSES",
    "REGIONS",
    "ClassPolicy",
    "UptimeTracker",
    "class_satisfies",
    "classify",
    "min_rtt_s",
    "region_verdict",
    "within_price",
]

CLASSES = ("new", "basic", "standard", "pro")  # lowest first

# Approximate centroids (lat, lon) of the regions operators may declare.
REGIONS: dict[str, tuple[float, float]] = {
    "us-east": (39.0, -77.5),
    "us-central": (41.6, -93.6),
    "us-west": (37.4, -122.0),
    "ca-central": (45.5, -73.6),
    "sa-east": (-23.5, -46.6),
    "eu-west": (53.3, -6.3),
    "eu-central": (50.1, 8.7),
    "eu-north": (59.3, 18.1),
    "eu-south": (45.5, 9.2),
    "me-central": (25.2, 55.3),
    "af-south": (-33.9, 18.4),
    "ap-south": (19.1, 72.9),
    "ap-southeast": (1.35, 103.8),
    "ap-northeast": (35.7, 139.7),
    "ap-east": (22.3, 114.2),
    "au-east": (-33.9, 151.2),
}
FIBRE_KM_PER_S = 200_000.0
EARTH_RADIUS_KM = 6371.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ClassPolicy:
    day_s: float = 86_400.0
    pro_uptime: float = 0.99
    pro_observed_s: float = 23 * 3600.0
    pro_min_decode_tps: float = 20.0
    standard_uptime: float = 0.90
    min_observed_s: float = 3600.0


@dataclass(slots=True)
class UptimeTracker:
    """Probe outcomes over time; uptime is the share of observed time the node answered.

    Each probe covers the interval since the previous one (capped at `max_gap_s`, so a long
    silence of the prober itself does not count for or against the node)."""

    max_gap_s: float = 600.0
    horizon_s: float = 86_400.0
    _probes: deque[tuple[float, float, bool]] = field(default_factory=deque)  # (start, end, up)
    _last: float | None = None

    def record(self, now: float, up: bool) -> None:
        if self._last is not None and now > self._last:
            start = max(self._last, now - self.max_gap_s)
            self._probes.append((start, now, up))
        self._last = now if self._last is None else max(self._last, now)
        while self._probes and self._probes[0][1] < now - self.horizon_s:
            self._probes.popleft()

    def observed_s(self, now: float, window_s: float) -> float:
        lo = now - window_s
        return sum(max(0.0, e - max(s, lo)) for s, e, _ in self._probes if e > lo)

    def uptime(self, now: float, window_s: float) -> float | None:
        lo = now - window_s
        total = up = 0.0
        for s, e, ok in self._probes:
            span = max(0.0, e - max(s, lo))
            total += span
            if ok:
                up += span
        return up / total if total > 0 else None


def classify(decode_tps: float, uptime: UptimeTracker, now: float, policy: ClassPolicy = ClassPolicy()) -> str:
    observed = uptime.observed_s(now, policy.day_s)
    if observed < policy.min_observed_s:
        return "new"
    share = uptime.uptime(now, policy.day_s) or 0.0
    if share >= policy.pro_uptime and observed >= policy.pro_observed_s and decode_tps >= policy.pro_min_decode_tps:
        return "pro"
    if share >= policy.standard_uptime:
        return "standard"
    return "basic"


def class_satisfies(required: str | None, actual: str) -> bool:
    """A request for class X accepts X and every higher class; an unknown class name matches only itself."""
    if not required:
        return True
    if required in CLASSES and actual in CLASSES:
        return CLASSES.index(actual) >= CLASSES.index(required)
    return required == actual


def _distance_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def min_rtt_s(a: str, b: str) -> float | None:
    """The physical lower bound on a round trip between two regions; None for an unknown region."""
    if a not in REGIONS or b not in REGIONS:
        return None
    return 2 * _distance_km(REGIONS[a], REGIONS[b]) / FIBRE_KM_PER_S


def region_verdict(
    declared: str,
    shim_region: str,
    rtts_s: Iterable[float],
    *,
    slack: float = 0.8,
    near_max_rtt_s: float = 0.08,
    min_samples: int = 3,
) -> Literal["plausible", "implausible", "unknown"]:
    """Is a node's declared region consistent with the RTTs this shim (in `shim_region`) measured?"""
    samples = [r for r in rtts_s if math.isfinite(r) and r > 0]
    bound = min_rtt_s(declared, shim_region)
    if bound is None or len(samples) < min_samples:
        return "unknown"
    fastest = min(samples)
    if fastest < bound * slack:
        return "implausible"  # answers faster than light allows from there
    if declared == shim_region and fastest > near_max_rtt_s:
        return "implausible"  # claims to be next door, never answers like it
    return "plausible"


def within_price(price_input_per_m: int, price_output_per_m: int, max_price: int | None) -> bool:
    """The request's `darkbloom.max_price` caps both prices (micro-credits per 1M tokens)."""
    return max_price is None or (price_input_per_m <= max_price and price_output_per_m <= max_price)
