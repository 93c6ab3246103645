"""Prometheus metrics for every role, one registry per role so `darkbloom up` can hold several.

Names follow Prometheus conventions (`darkbloom_<what>_<unit>`); labels carry the role and
kinds of things, never request content.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE", "RoleMetrics", "render"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class RoleMetrics:
    """The metric families every role exposes; a role leaves those it does not use at zero."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.registry = reg = CollectorRegistry(auto_describe=True)
        r = ("role",)
        self._requests = Counter("darkbloom_requests", "Requests handled", (*r, "kind", "outcome"), registry=reg)
        self._errors = Counter("darkbloom_errors", "Errors by kind", (*r, "kind"), registry=reg)
        self._tokens = Counter("darkbloom_tokens", "Tokens processed", (*r, "direction"), registry=reg)
        self._dht = Counter("darkbloom_dht_lookups", "DHT operations", (*r, "kind", "outcome"), registry=reg)
        self.ttft = Histogram("darkbloom_ttft_seconds", "Time to first token", r, registry=reg, buckets=_TTFT_BUCKETS).labels(role)
        self.token_latency = Histogram(
            "darkbloom_token_latency_seconds", "Time between streamed tokens", r, registry=reg, buckets=_TOKEN_BUCKETS
        ).labels(role)
        self.peers = Gauge("darkbloom_peers", "Connected peers", r, registry=reg).labels(role)
        self.relayed_share = Gauge("darkbloom_relayed_share", "Share of streams through a relay", r, registry=reg).labels(role)
        self.settlement_lag = Gauge(
            "darkbloom_settlement_lag_seconds", "Age of the oldest unsettled voucher", r, registry=reg
        ).labels(role)
        self.active = Gauge("darkbloom_active_requests", "Requests in flight", r, registry=reg).labels(role)

    def request(self, kind: str, outcome: str) -> None:
        """Count one finished request; outcome is ok, error or cancelled."""
        self._requests.labels(self.role, kind, outcome).inc()

    def error(self, kind: str) -> None:
        self._errors.labels(self.role, kind).inc()

    def tokens(self, prompt: int = 0, completion: int = 0) -> None:
        if prompt:
            self._tokens.labels(self.role, "prompt").inc(prompt)
        if completion:
            self._tokens.labels(self.role, "completion").inc(completion)

    def dht(self, kind: str, outcome: str = "ok") -> None:
        self._dht.labels(self.role, kind, outcome).inc()

    def value(self, name: str, **labels: str) -> float:
        """The current value of a sample (for status pages and tests); 0 when absent."""
        got = self.registry.get_sample_value(name, {"role": self.role, **labels})
        return got or 0.0


def render(*metrics: RoleMetrics) -> bytes:
    """Prometheus text exposition of one or more roles' registries."""
    return b"".join(generate_latest(m.registry) for m in metrics)
