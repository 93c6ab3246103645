"""Hedging: delay policy and the trio race helper (attempts are timed stand-ins; the test is about the race), on MockClock."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from darkbloom.api.trust.hedge import HedgePolicy, hedge_delay, race
from darkbloom.errors import InvalidRequest, PeerUnreachable


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


class Attempts:
    """Timed stand-in attempts: each sleeps for its TTFT, then returns or raises; records cleanup."""

    def __init__(self) -> None:
        self.closed: list[str] = []  # attempts cancelled mid-way (their own cleanup ran)
        self.discarded: list[str] = []  # returned values the race handed back for closing

    def make(self, name: str, ttft: float, fail: Exception | None = None):
        async def attempt() -> str:
            try:
                await trio.sleep(ttft)
            except trio.Cancelled:
                self.closed.append(name)
                raise
            if fail is not None:
                raise fail
            return name

        return attempt

    async def discard(self, value: str) -> None:
        await trio.lowlevel.checkpoint()
        self.discarded.append(value)


def test_hedge_delay_policy() -> None:
    off = HedgePolicy(enabled=False)
    assert hedge_delay(off, [0.1] * 100) == math.inf
    on = HedgePolicy(enabled=True, min_samples=20, default_delay_s=2.0, min_delay_s=0.05, max_delay_s=10.0)
    assert hedge_delay(on, [0.1] * 5) == 2.0  # too few samples
    samples = [0.1] * 95 + [5.0] * 5
    assert 0.1 <= hedge_delay(on, samples) <= 5.0
    assert hedge_delay(on, [0.01] * 50) == 0.05
    assert hedge_delay(on, [100.0] * 50) == 10.0
    assert hedge_delay(on, [0.2] * 40 + [math.nan, -1.0]) == pytest.approx(0.2)


async def test_slow_first_attempt_is_hedged_and_cancelled(autojump_clock) -> None:
    a = Attempts()
    t0 = trio.current_time()
    out = await race([a.make("slow", 30.0), a.make("fast", 0.5)], delay_s=1.0, discard=a.discard)
    assert (out.winner, out.value) == (1, "fast")
    assert trio.current_time() - t0 == pytest.approx(1.5)
    assert out.started_at[1] - out.started_at[0] == pytest.approx(1.0)
    assert a.closed == ["slow"] and out.cancelled == [0] and out.failures == []


async def test_fast_first_attempt_starts_no_hedge(autojump_clock) -> None:
    a = Attempts()
    out = await race([a.make("first", 0.4), a.make("second", 0.1)], delay_s=1.0, discard=a.discard)
    assert out.winner == 0 and out.started == [0] and a.closed == []


async def test_failure_starts_the_next_attempt_at_once(autojump_clock) -> None:
    a = Attempts()
    t0 = trio.current_time()
    out = await race(
        [a.make("bad", 0.2, PeerUnreachable("p" * 10)), a.make("good", 0.3)], delay_s=5.0, discard=a.discard
    )
    assert out.winner == 1
    assert out.started_at[1] - t0 == pytest.approx(0.2)
    assert [i for i, _ in out.failures] == [0] and isinstance(out.failures[0][1], PeerUnreachable)


async def test_all_fail_returns_every_failure(autojump_clock) -> None:
    a = Attempts()
    out = await race(
        [a.make(f"n{i}", 0.1 * (i + 1), PeerUnreachable(f"peer{i}")) for i in range(3)],
        delay_s=0.05,
        discard=a.discard,
    )
    assert out.winner is None and out.value is None
    assert sorted(i for i, _ in out.failures) == [0, 1, 2]


async def test_final_error_cancels_the_rest_and_propagates(autojump_clock) -> None:
    a = Attempts()
    with pytest.raises(InvalidRequest):
        await race(
            [a.make("slow", 10.0), a.make("bad", 0.5, InvalidRequest("no", param="x"))],
            delay_s=1.0,
            discard=a.discard,
            is_final=lambda exc: isinstance(exc, InvalidRequest),
        )
    assert a.closed == ["slow"]


async def test_max_parallel_bounds_running_attempts(autojump_clock) -> None:
    a = Attempts()
    out = await race([a.make(f"n{i}", 10.0 - i) for i in range(4)], delay_s=0.5, discard=a.discard, max_parallel=2)
    # two start, the others wait for a slot; the second (9 s after 0.5 s) wins at 9.5 s
    assert out.started == [0, 1] and out.winner == 1 and a.closed == ["n0"]


async def test_simultaneous_finish_discards_the_loser(autojump_clock) -> None:
    a = Attempts()
    out = await race([a.make("a", 2.0), a.make("b", 1.0)], delay_s=1.0, discard=a.discard)
    assert out.winner in (0, 1)
    loser = "b" if out.value == "a" else "a"
    assert a.discarded == [loser] or a.closed == [loser]
    assert len(a.discarded) + len(a.closed) == 1


async def test_outer_cancel_closes_running_attempts(autojump_clock) -> None:
    a = Attempts()
    with trio.move_on_after(3.0):
        await race([a.make("x", 5.0)], delay_s=1.0, discard=a.discard)
    assert a.closed == ["x"] and a.discarded == []
