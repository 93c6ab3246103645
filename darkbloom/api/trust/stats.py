"""Live per-peer statistics in the shim, pure: success rate, TTFT and per-token EWMAs, error kinds, recent TTFT quantiles.

Every update takes `now`. EWMAs are time-aware for the success rate (a half-life in
seconds, so an old streak fades even when a peer gets little traffic) and per-sample for
latencies (alpha). Nothing here does I/O or reads a clock.

Error kinds are short strings the backend chooses when it translates an exception once
at its boundary, e.g. "unreachable", "no_capacity", "timeout_first_token", "stream_closed",
"protocol", "bad_output", "spot_check_failed", "canary_failed".
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["LatencyWindow", "PeerLiveStats", "StatsPolicy", "quantile"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StatsPolicy:
    success_half_life_s: float = 600.0  # weight of an outcome halves every this many seconds
    prior_successes: float = 1.0  # pseudo-counts: an unseen peer starts at 1.0 (optimistic,
    prior_failures: float = 0.0  # so new peers get traffic); one failure alone gives 0.5
    latency_alpha: float = 0.3  # EWMA weight of the newest TTFT / per-token sample
    ttft_window: int = 64  # recent TTFT samples kept for quantiles


def quantile(values: Iterable[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]); nan for no values."""
    s = sorted(values)
    if not s:
        return math.nan
    k = (len(s) - 1) * min(1.0, max(0.0, q))
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass(slots=True)
class LatencyWindow:
    """The last `size` samples of a latency (e.g. TTFT over all peers of a model) for p50/p95."""

    size: int = 64
    _samples: deque[float] = field(default_factory=deque)

    def add(self, value: float) -> None:
        self._samples.append(value)
        while len(self._samples) > self.size:
            self._samples.popleft()

    def __len__(self) -> int:
        return len(self._samples)

    def quantile(self, q: float) -> float:
        return quantile(self._samples, q)


@dataclass(slots=True)
class PeerLiveStats:
    """What this shim has seen of one peer recently."""

    policy: StatsPolicy = field(default_factory=StatsPolicy)
    ok_weight: float = 0.0  # decayed count of successes
    fail_weight: float = 0.0  # decayed count of failures
    updated_at: float | None = None
    ttft_s: float | None = None  # EWMA of request -> first token
    per_token_s: float | None = None  # EWMA of seconds per generated token after the first
    errors: Counter[str] = field(default_factory=Counter)  # kind -> count (not decayed)
    successes: int = 0
    failures: int = 0
    ttfts: LatencyWindow = field(default_factory=LatencyWindow)

    def _decay(self, now: float) -> None:
        if self.updated_at is not None and now > self.updated_at:
            f = 0.5 ** ((now - self.updated_at) / self.policy.success_half_life_s)
            self.ok_weight *= f
            self.fail_weight *= f
        if self.updated_at is None or now > self.updated_at:
            self.updated_at = now

    def success_rate(self, now: float) -> float:
        """(decayed successes + prior) / (decayed outcomes + priors), in [0, 1]."""
        ok, fail = self.ok_weight, self.fail_weight
        if self.updated_at is not None and now > self.updated_at:
            f = 0.5 ** ((now - self.updated_at) / self.policy.success_half_life_s)
            ok, fail = ok * f, fail * f
        a, b = self.policy.prior_successes, self.policy.prior_failures
        return (ok + a) / (ok + fail + a + b) if ok + fail + a + b > 0 else 1.0

    def record_success(self, now: float, *, ttft_s: float | None = None, tokens: int = 0, duration_s: float | None = None) -> None:
        """A request finished. `duration_s` is request start -> last token; with `tokens` > 1
        it gives the per-token time after the first token."""
        self._decay(now)
        self.ok_weight += 1.0
        self.successes += 1
        a = self.policy.latency_alpha
        if ttft_s is not None and ttft_s >= 0 and math.isfinite(ttft_s):
            self.ttft_s = ttft_s if self.ttft_s is None else self.ttft_s + a * (ttft_s - self.ttft_s)
            self.ttfts.add(ttft_s)
            if duration_s is not None and tokens > 1 and duration_s >= ttft_s:
                per = (duration_s - ttft_s) / (tokens - 1)
                self.per_token_s = per if self.per_token_s is None else self.per_token_s + a * (per - self.per_token_s)

    def record_failure(self, now: float, kind: str) -> None:
        self._decay(now)
        self.fail_weight += 1.0
        self.failures += 1
        self.errors[kind] += 1

    def expected_latency_s(self, tokens: int) -> float | None:
        """TTFT + (tokens - 1) x per-token time, when both are known."""
        if self.ttft_s is None:
            return None
        return self.ttft_s + max(0, tokens - 1) * (self.per_token_s or 0.0)
