"""Per-peer circuit breaker, pure: closed -> open after K failures in a window -> half-open probe -> closed, with exponential cooldown.

    closed     requests flow; each failure is remembered for `window_s` (successes in
               between do not erase it). The K-th failure inside the window opens it.
    open       no requests until `open_until`; the cooldown is base * 2^(opens-1), capped.
    half_open  after the cooldown, exactly one request (the probe) may go. Its success
               closes the breaker and resets the cooldown; its failure re-opens it with the
               next, doubled cooldown. A probe that never reports (cancelled, lost) frees
               the probe slot after `probe_timeout_s`.

No clock here: every method takes `now` (trio.current_time() in the shim, a number in tests).
`available(now)` is the read-only question for ranking; `allow(now)` is asked right before
sending and claims the half-open probe.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["BreakerPolicy", "CircuitBreaker", "State"]

State = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerPolicy:
    failures: int = 3  # K: failures inside the window that open the breaker
    window_s: float = 30.0
    base_cooldown_s: float = 5.0
    max_cooldown_s: float = 300.0
    probe_timeout_s: float = 60.0  # a probe that neither succeeds nor fails frees its slot after this

    def __post_init__(self) -> None:
        if self.failures < 1 or self.window_s <= 0 or self.base_cooldown_s <= 0 or self.max_cooldown_s < self.base_cooldown_s:
            raise ValueError("breaker policy needs failures >= 1, window_s > 0, 0 < base_cooldown_s <= max_cooldown_s")

    def cooldown(self, opens: int) -> float:
        """Cooldown for the `opens`-th consecutive opening (1-based)."""
        if opens <= 1:
            return self.base_cooldown_s
        exp = min(opens - 1, 62)  # 2**62 * base is far beyond any cap
        return min(self.max_cooldown_s, self.base_cooldown_s * (2.0**exp))


@dataclass(slots=True)
class CircuitBreaker:
    policy: BreakerPolicy = field(default_factory=BreakerPolicy)
    _failures: deque[float] = field(default_factory=deque)  # failure times inside the window (closed state)
    _opens: int = 0  # consecutive openings without a success in between
    _open_until: float = -math.inf
    _probe_since: float | None = None  # half-open: when the probe was let through
    _tripped: bool = False  # open or half-open (not closed)

    def state(self, now: float) -> State:
        if not self._tripped:
            return "closed"
        return "open" if now < self._open_until else "half_open"

    @property
    def open_until(self) -> float:
        return self._open_until if self._tripped else -math.inf

    @property
    def opens(self) -> int:
        return self._opens

    def _probe_busy(self, now: float) -> bool:
        return self._probe_since is not None and now - self._probe_since < self.policy.probe_timeout_s

    def available(self, now: float) -> bool:
        """Read-only: would `allow(now)` let a request through?"""
        state = self.state(now)
        if state == "closed":
            return True
        return state == "half_open" and not self._probe_busy(now)

    def allow(self, now: float) -> bool:
        """Ask right before sending. In half-open this claims the single probe slot."""
        state = self.state(now)
        if state == "closed":
            return True
        if state == "open" or self._probe_busy(now):
            return False
        self._probe_since = now
        return True

    def record_success(self, now: float) -> None:
        """A success while closed changes nothing: failures still count inside their window
        (a peer failing 30% of requests must trip it). A success while open is a late report
        and changes nothing either. A success in half-open (the probe) closes the breaker and
        resets the cooldown."""
        if not self._tripped or self.state(now) == "open":
            return  # closed: nothing to do; open: a late report of a request sent before it opened
        self._tripped = False
        self._opens = 0
        self._open_until = -math.inf
        self._probe_since = None
        self._failures.clear()

    def record_failure(self, now: float) -> None:
        if self._tripped:
            # A failure while open is a late report of a request sent before it opened; a
            # failure in half-open is the probe failing (or a late report): re-open longer.
            if self.state(now) == "half_open":
                self._trip(now)
            return
        self._failures.append(now)
        while self._failures and now - self._failures[0] >= self.policy.window_s:
            self._failures.popleft()
        if len(self._failures) >= self.policy.failures:
            self._trip(now)

    def release_probe(self) -> None:
        """The probe ended with neither success nor failure (e.g. the client went away)."""
        self._probe_since = None

    def _trip(self, now: float) -> None:
        self._tripped = True
        self._opens += 1
        self._open_until = now + self.policy.cooldown(self._opens)
        self._probe_since = None
        self._failures.clear()
