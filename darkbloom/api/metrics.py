"""The shim's counters, rendered as Prometheus text for GET /metrics. Ids, counts and timings only."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

__all__ = ["Metrics"]


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels)
    return "{" + inner + "}"


@dataclass(slots=True)
class Metrics:
    requests: dict[tuple[tuple[str, str], ...], int] = field(default_factory=lambda: defaultdict(int))
    tokens: dict[tuple[tuple[str, str], ...], int] = field(default_factory=lambda: defaultdict(int))
    failovers: int = 0
    client_disconnects: int = 0
    stream_errors: int = 0
    inflight: int = 0
    ttft_sum_s: float = 0.0
    ttft_count: int = 0

    def request(self, endpoint: str, status: int) -> None:
        self.requests[(("endpoint", endpoint), ("status", str(status)))] += 1

    def add_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.tokens[(("model", model), ("kind", "prompt"))] += prompt
        self.tokens[(("model", model), ("kind", "completion"))] += completion

    def first_token(self, seconds: float) -> None:
        self.ttft_sum_s += seconds
        self.ttft_count += 1

    def render(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_: str, rows: list[tuple[tuple[tuple[str, str], ...], float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in rows:
                out.append(f"{name}{_labels(labels)} {value:g}")

        family("darkbloom_shim_requests_total", "counter", "HTTP requests answered, by endpoint and status",
               sorted(self.requests.items()))
        family("darkbloom_shim_tokens_total", "counter", "tokens passed to clients, by model and kind",
               sorted(self.tokens.items()))
        family("darkbloom_shim_failovers_total", "counter", "requests retried on another peer before the first byte",
               [((), self.failovers)])
        family("darkbloom_shim_client_disconnects_total", "counter", "streams the client closed early",
               [((), self.client_disconnects)])
        family("darkbloom_shim_stream_errors_total", "counter", "streams ended by a node failure after the first byte",
               [((), self.stream_errors)])
        family("darkbloom_shim_inflight_requests", "gauge", "requests being served now", [((), self.inflight)])
        family("darkbloom_shim_time_to_first_token_seconds", "summary", "request to first content frame", [])
        out.append(f"darkbloom_shim_time_to_first_token_seconds_sum {self.ttft_sum_s:g}")
        out.append(f"darkbloom_shim_time_to_first_token_seconds_count {self.ttft_count}")
        return "\n".join(out) + "\n"
