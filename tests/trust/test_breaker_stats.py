"""Circuit breaker state machine (Hypothesis) and live peer statistics."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from darkbloom.api.trust.breaker import BreakerPolicy, CircuitBreaker
from darkbloom.api.trust.stats import LatencyWindow, PeerLiveStats, StatsPolicy, quantile

POLICY = BreakerPolicy(failures=3, window_s=10.0, base_cooldown_s=2.0, max_cooldown_s=16.0, probe_timeout_s=5.0)


class BreakerMachine(RuleBasedStateMachine):
    """A model of the breaker's contract, checked against the real one under random event orders."""

    @initialize()
    def start(self) -> None:
        self.b = CircuitBreaker(POLICY)
        self.now = 0.0
        self.recent: list[float] = []  # model: failure times since the last close/trip
        self.opens = 0
        self.open_until = -math.inf
        self.tripped = False
        self.probe_at: float | None = None

    def model_state(self) -> str:
        if not self.tripped:
            return "closed"
        return "open" if self.now < self.open_until else "half_open"

    @rule(dt=st.floats(min_value=0.0, max_value=20.0, allow_nan=False))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def allow(self) -> None:
        state = self.model_state()
        busy = self.probe_at is not None and self.now - self.probe_at < POLICY.probe_timeout_s
        expected = state == "closed" or (state == "half_open" and not busy)
        assert self.b.available(self.now) == expected
        assert self.b.allow(self.now) == expected
        if expected and state == "half_open":
            self.probe_at = self.now
            # a second ask at the same instant is refused: one probe at a time
            assert not self.b.allow(self.now)

    @rule()
    def success(self) -> None:
        self.b.record_success(self.now)
        # closed: failures stay in their window; open: a late report, ignored
        if self.model_state() == "half_open":
            self.recent, self.opens, self.tripped, self.probe_at = [], 0, False, None
            self.open_until = -math.inf

    @rule()
    def failure(self) -> None:
        state = self.model_state()
        self.b.record_failure(self.now)
        if state == "closed":
            self.recent = [t for t in self.recent + [self.now] if self.now - t < POLICY.window_s]
            if len(self.recent) >= POLICY.failures:
                self._trip()
        elif state == "half_open":
            self._trip()

    @rule()
    def release(self) -> None:
        self.b.release_probe()
        self.probe_at = None

    def _trip(self) -> None:
        self.tripped = True
        self.opens += 1
        self.open_until = self.now + min(POLICY.max_cooldown_s, POLICY.base_cooldown_s * 2 ** (self.opens - 1))
        self.recent, self.probe_at = [], None

    @invariant()
    def agrees(self) -> None:
        if not hasattr(self, "b"):
            return
        assert self.b.state(self.now) == self.model_state()
        assert self.b.opens == self.opens
        if self.tripped:
            assert self.b.open_until == pytest.approx(self.open_until)
            assert self.b.open_until - self.now <= POLICY.max_cooldown_s + 1e-9

    @precondition(lambda self: hasattr(self, "b") and self.model_state() == "open")
    @rule()
    def open_refuses(self) -> None:
        assert not self.b.allow(self.now)
        assert not self.b.available(self.now)


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


def test_opens_after_k_failures_in_window_and_not_when_spread_out() -> None:
    b = CircuitBreaker(POLICY)
    for t in (0.0, 4.0):
        b.record_failure(t)
        b.record_success(t + 0.5)  # successes in between do not erase failures
    b.record_failure(8.0)
    assert b.state(8.0) == "open"
    spread = CircuitBreaker(POLICY)
    for t in (0.0, 6.0, 12.0, 18.0):  # never 3 inside a 10 s window
        spread.record_failure(t)
    assert spread.state(18.0) == "closed"


def test_cooldown_doubles_per_failed_probe_and_resets_on_success() -> None:
    b = CircuitBreaker(POLICY)
    for _ in range(3):
        b.record_failure(0.0)
    assert b.open_until == 2.0
    t = 2.0
    cooldowns = []
    for _ in range(5):
        assert b.allow(t)  # the probe
        b.record_failure(t)
        cooldowns.append(b.open_until - t)
        t = b.open_until
    assert cooldowns == [4.0, 8.0, 16.0, 16.0, 16.0]
    assert b.allow(t)
    b.record_success(t)
    assert b.state(t) == "closed" and b.opens == 0
    for _ in range(3):
        b.record_failure(t)
    assert b.open_until - t == 2.0


def test_lost_probe_frees_its_slot_after_timeout() -> None:
    b = CircuitBreaker(POLICY)
    for _ in range(3):
        b.record_failure(0.0)
    assert b.allow(2.0)
    assert not b.allow(6.9)
    assert b.allow(7.0)


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BreakerPolicy(failures=0)
    with pytest.raises(ValueError):
        BreakerPolicy(base_cooldown_s=10.0, max_cooldown_s=5.0)


# --- live statistics ------------------------------------------------------------------


def test_success_rate_counts_and_decays() -> None:
    s = PeerLiveStats(StatsPolicy(success_half_life_s=100.0))
    assert s.success_rate(0.0) == 1.0  # unseen: optimistic prior
    for i in range(7):
        s.record_success(float(i), ttft_s=0.1)
    for i in range(3):
        s.record_failure(10.0 + i, "unreachable")
    mid = s.success_rate(12.0)
    assert 0.6 < mid < 0.8
    assert s.errors == {"unreachable": 3}
    # after a long quiet time old outcomes fade toward the prior
    assert s.success_rate(2000.0) > 0.95
    # recent failures dominate older successes
    s.record_failure(2000.0, "timeout_first_token")
    s.record_failure(2000.0, "timeout_first_token")
    assert s.success_rate(2000.0) < 0.5


def test_latency_ewmas() -> None:
    s = PeerLiveStats(StatsPolicy(latency_alpha=0.5))
    s.record_success(0.0, ttft_s=1.0, tokens=11, duration_s=2.0)
    assert s.ttft_s == 1.0 and s.per_token_s == pytest.approx(0.1)
    s.record_success(1.0, ttft_s=3.0, tokens=11, duration_s=6.0)
    assert s.ttft_s == pytest.approx(2.0)
    assert s.per_token_s == pytest.approx(0.2)
    assert s.expected_latency_s(11) == pytest.approx(4.0)
    s.record_success(2.0, ttft_s=math.nan)  # ignored, not poisoning the average
    assert s.ttft_s == pytest.approx(2.0)
    assert len(s.ttfts) == 2


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=80), st.floats(min_value=0, max_value=1))
def test_quantile_is_bounded_and_monotone(values: list[float], q: float) -> None:
    v = quantile(values, q)
    assert min(values) <= v <= max(values)
    assert quantile(values, 0.0) == min(values) and quantile(values, 1.0) == max(values)
    assert quantile(values, min(1.0, q + 0.1)) >= v - 1e-9


def test_latency_window_keeps_only_the_newest() -> None:
    w = LatencyWindow(size=4)
    for x in (100.0, 1.0, 2.0, 3.0, 4.0):
        w.add(x)
    assert len(w) == 4 and w.quantile(1.0) == 4.0
    assert math.isnan(LatencyWindow().quantile(0.5))
