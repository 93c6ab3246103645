"""Node classes from observed uptime and speed; region plausibility from RTTs; filters."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from darkbloom.api.trust.classes import (
    REGIONS,
    UptimeTracker,
    class_satisfies,
    classify,
    min_rtt_s,
    region_verdict,
    within_price,
)

HOUR = 3600.0


def tracker(hours: float, down_every: int | None = None, step_s: float = 60.0) -> UptimeTracker:
    t = UptimeTracker()
    n = int(hours * HOUR / step_s)
    for i in range(n + 1):
        t.record(i * step_s, up=not (down_every and i % down_every == 0 and i > 0))
    return t


def test_classes_from_uptime_and_speed() -> None:
    day = 24 * HOUR
    assert classify(50.0, tracker(0.5), 0.5 * HOUR) == "new"
    steady = tracker(24)
    assert steady.uptime(day, day) == 1.0
    assert classify(50.0, steady, day) == "pro"
    assert classify(5.0, steady, day) == "standard"  # fast enough is part of pro
    flaky = tracker(24, down_every=20)  # ~95% up
    assert 0.94 < flaky.uptime(day, day) < 0.96
    assert classify(50.0, flaky, day) == "standard"
    bad = tracker(24, down_every=3)
    assert classify(50.0, bad, day) == "basic"
    assert classify(50.0, tracker(5), 5 * HOUR) == "standard"  # not observed long enough for pro


def test_prober_silence_is_not_downtime() -> None:
    t = UptimeTracker(max_gap_s=600.0)
    t.record(0.0, True)
    t.record(10 * HOUR, True)  # the prober was off for 10 h: only 10 min count
    assert t.observed_s(10 * HOUR, 24 * HOUR) == 600.0
    assert t.uptime(10 * HOUR, 24 * HOUR) == 1.0
    assert UptimeTracker().uptime(0.0, 10.0) is None


def test_class_order_in_filters() -> None:
    assert class_satisfies(None, "new")
    assert class_satisfies("standard", "pro") and class_satisfies("pro", "pro")
    assert not class_satisfies("pro", "standard")
    assert class_satisfies("m2-max", "m2-max") and not class_satisfies("m2-max", "pro")
    assert within_price(10, 20, None) and within_price(10, 20, 20) and not within_price(10, 21, 20)


def test_region_plausibility() -> None:
    # eu-west -> au-east is ~17,000 km: at least ~0.17 s round trip in fibre
    bound = min_rtt_s("eu-west", "au-east")
    assert 0.15 < bound < 0.2
    assert region_verdict("au-east", "eu-west", [0.012, 0.015, 0.02]) == "implausible"
    assert region_verdict("au-east", "eu-west", [0.31, 0.29, 0.35]) == "plausible"
    assert region_verdict("eu-west", "eu-west", [0.003, 0.004, 0.01]) == "plausible"
    assert region_verdict("eu-west", "eu-west", [0.25, 0.3, 0.28]) == "implausible"
    assert region_verdict("eu-west", "eu-west", [0.01]) == "unknown"  # too few samples
    assert region_verdict("mars-north", "eu-west", [0.1] * 5) == "unknown"


@given(st.sampled_from(sorted(REGIONS)), st.sampled_from(sorted(REGIONS)))
def test_min_rtt_is_symmetric_and_zero_on_the_diagonal(a: str, b: str) -> None:
    assert abs(min_rtt_s(a, b) - min_rtt_s(b, a)) < 1e-12
    assert min_rtt_s(a, a) == 0.0
    assert min_rtt_s(a, b) < 0.21  # half the earth's circumference and back, in fibre
