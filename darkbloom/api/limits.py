"""Per-key rate limits, pure: requests/min and tokens/min over a sliding minute, with `now` passed in.

`RateLimiter.check(key, limits, tokens, now)` returns None when the request may go, or the
seconds to wait (for `Retry-After`). `spend` adds the tokens actually used after the answer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["KeyLimits", "RateLimiter"]

WINDOW_S = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyLimits:
    requests_per_min: int = 0  # 0: unlimited
    tokens_per_min: int = 0  # 0: unlimited
    quota_tokens: int = 0  # total tokens the key may ever use; 0: unlimited


@dataclass(slots=True)
class _Window:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0

    def trim(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]


class RateLimiter:
    def __init__(self) -> None:
        self._windows: dict[str, _Window] = {}

    def check(self, key: str, limits: KeyLimits, estimated_tokens: int, now: float) -> tuple[str, float] | None:
        """None to admit (and count the request), or (which limit, seconds until it would pass)."""
        w = self._windows.setdefault(key, _Window())
        w.trim(now)
        if limits.requests_per_min and len(w.requests) >= limits.requests_per_min:
            return "requests per minute", max(0.001, w.requests[0] + WINDOW_S - now)
        if limits.tokens_per_min and w.tokens and w.token_sum + estimated_tokens > limits.tokens_per_min:
            # Wait until enough of the window has expired for this request to fit.
            need = w.token_sum + estimated_tokens - limits.tokens_per_min
            freed = 0
            for at, n in w.tokens:
                freed += n
                if freed >= need:
                    return "tokens per minute", max(0.001, at + WINDOW_S - now)
            return "tokens per minute", WINDOW_S
        w.requests.append(now)
        return None

    def spend(self, key: str, tokens: int, now: float) -> None:
        w = self._windows.setdefault(key, _Window())
        w.trim(now)
        if tokens > 0:
            w.tokens.append((now, tokens))
            w.token_sum += tokens
