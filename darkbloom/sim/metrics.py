"""What a simulation measured: rows per lookup, request and departed node, and their summary (pure).

Rows are plain dicts so they go to CSV as they are. `summarise` turns them into the figures
the report prints: lookup success, hops and latency; request success and the share served
through relays; how long a departed provider stayed discoverable; per-minute timelines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Metrics", "percentile", "summarise", "timeline"]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


@dataclass(slots=True)
class Metrics:
    lookups: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    departures: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


def summarise(m: Metrics, *, warmup_s: float = 0.0) -> dict[str, Any]:
    lookups = [r for r in m.lookups if r["t"] >= warmup_s]
    ok_lookups = [r for r in lookups if r["success"]]
    requests = [r for r in m.requests if r["t"] >= warmup_s]
    served = [r for r in requests if r["ok"]]
    routes = {route: sum(1 for r in served if r["route"] == route) for route in ("direct", "hole-punched", "relayed")}
    vanished = [d["vanished_after_s"] for d in m.departures if d["vanished_after_s"] is not None]
    return {
        "lookups": len(lookups),
        "lookup_success": len(ok_lookups) / len(lookups) if lookups else math.nan,
        "hops_mean": _mean([r["hops"] for r in ok_lookups]),
        "hops_p95": percentile([r["hops"] for r in ok_lookups], 95),
        "rounds_mean": _mean([r["rounds"] for r in lookups]),
        "queries_mean": _mean([r["queries"] for r in lookups]),
        "lookup_latency_p50_s": percentile([r["latency_s"] for r in ok_lookups], 50),
        "lookup_latency_p95_s": percentile([r["latency_s"] for r in ok_lookups], 95),
        "requests": len(requests),
        "request_success": len(served) / len(requests) if requests else math.nan,
        "relayed_share": routes["relayed"] / len(served) if served else math.nan,
        "hole_punched_share": routes["hole-punched"] / len(served) if served else math.nan,
        "direct_share": routes["direct"] / len(served) if served else math.nan,
        "request_latency_p50_s": percentile([r["latency_s"] for r in served], 50),
        "request_latency_p95_s": percentile([r["latency_s"] for r in served], 95),
        "discovery_latency_p50_s": percentile([r["discovery_s"] for r in requests], 50),
        "departures": len(m.departures),
        "vanished": len(vanished),
        "vanish_mean_s": _mean(vanished),
        "vanish_max_s": max(vanished) if vanished else math.nan,
    }


def timeline(rows: Iterable[dict[str, Any]], *, bin_s: float, flag: str) -> list[dict[str, Any]]:
    """Per time bin: how many rows, and the share where `flag` is true."""
    bins: dict[int, list[bool]] = {}
    for r in rows:
        bins.setdefault(int(r["t"] // bin_s), []).append(bool(r[flag]))
    return [
        {"t": b * bin_s, "count": len(v), "share": sum(v) / len(v)}
        for b, v in sorted(bins.items())
    ]
