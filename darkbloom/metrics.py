"""Prometheus metrics for every role, one registry per role so `darkbloom up` can hold several.

Names follow Prometheus conventions (`darkbloom_<what>_<unit>`); labels carry the role and
kinds of things, never request content. Every role exposes the same families: requests,
time to first token and per-token latency histograms, errors by kind, tokens, peers,
relayed share, DHT lookups, requests in flight, settlement lag. `ShimMetrics` adds the
shim's HTTP view (responses by endpoint and status, failovers, client disconnects).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE", "RoleMetrics", "ShimMetrics", "render"]

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
        self._routes = Counter("darkbloom_routes", "Streams by route", (*r, "route"), registry=reg)
        self._routed = {"all": 0, "relayed": 0}

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
        """Count one DHT operation (find_providers, get_record, provide, put_record); outcome ok, empty or error."""
        self._dht.labels(self.role, kind, outcome).inc()

    def token_gap(self, seconds: float, tokens: int = 1) -> None:
        """`tokens` streamed `seconds` after the previous ones: one per-token latency sample per token."""
        for _ in range(max(1, tokens)):
            self.token_latency.observe(seconds / max(1, tokens))

    def routed(self, route: str) -> None:
        """One stream opened by `route` (direct, relayed, hole-punched); updates the relayed share."""
        self._routes.labels(self.role, route).inc()
        self._routed["all"] += 1
        self._routed["relayed"] += route == "relayed"
        self.relayed_share.set(self._routed["relayed"] / self._routed["all"])

    def value(self, name: str, **labels: str) -> float:
        """The current value of a sample (for status pages and tests); 0 when absent."""
        got = self.registry.get_sample_value(name, {"role": self.role, **labels})
        return got or 0.0


def render(*metrics: RoleMetrics) -> bytes:
    """Prometheus text exposition of one or more roles' registries."""
    return b"".join(generate_latest(m.registry) for m in metrics)


_OUTCOME_KINDS = {"chat": "chat", "completions": "completion", "embeddings": "embedding"}


class ShimMetrics(RoleMetrics):
    """The shim's metrics: the shared families plus its HTTP view. Fed by `darkbloom.api.app`
    (answers, first tokens, disconnects) and `darkbloom.api.network` (lookups, routes, token gaps)."""

    def __init__(self, role: str = "shim") -> None:
        super().__init__(role)
        r = ("role",)
        self._http = Counter("darkbloom_http_responses", "HTTP answers by endpoint and status",
                             (*r, "endpoint", "status"), registry=self.registry)
        self._model_tokens = Counter("darkbloom_model_tokens", "Tokens passed to clients by model",
                                     (*r, "model", "direction"), registry=self.registry)
        self._failovers = Counter("darkbloom_failovers", "Requests retried on another peer", r,
                                  registry=self.registry).labels(role)
        self.inflight = 0
        self.refresh: Callable[[], None] | None = None  # scrape-time gauges (peers), set by the shim

    def answered(self, endpoint: str, status: int, code: str | None = None) -> None:
        """One HTTP answer; completions endpoints also count as requests, failures as errors by kind."""
        self._http.labels(self.role, endpoint, str(status)).inc()
        kind = _OUTCOME_KINDS.get(endpoint)
        if kind is not None:
            self.request(kind, "ok" if status < 400 else "error")
        if status >= 400:
            self.error(code or f"http_{status}")

    def add_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.tokens(prompt=prompt, completion=completion)
        if prompt:
            self._model_tokens.labels(self.role, model, "prompt").inc(prompt)
        if completion:
            self._model_tokens.labels(self.role, model, "completion").inc(completion)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def failover(self) -> None:
        self._failovers.inc()

    def client_disconnect(self) -> None:
        self.error("client_disconnect")

    def stream_error(self) -> None:
        self.error("stream_error")

    @property
    def inflight(self) -> int:
        return self._inflight

    @inflight.setter
    def inflight(self, value: int) -> None:
        self._inflight = value
        self.active.set(value)

    @property
    def failovers(self) -> int:
        return int(self.value("darkbloom_failovers_total"))

    @property
    def client_disconnects(self) -> int:
        return int(self.value("darkbloom_errors_total", kind="client_disconnect"))

    @property
    def stream_errors(self) -> int:
        return int(self.value("darkbloom_errors_total", kind="stream_error"))

    def render(self) -> str:
        """Prometheus text for GET /metrics."""
        if self.refresh is not None:
            self.refresh()
        return generate_latest(self.registry).decode()
