"""Hedged requests: a pure delay policy (p95 TTFT) and a trio helper that races attempts and cancels the losers.

Policy (pure): when hedging is on (ApiConfig.hedge) and enough TTFT samples exist, a second
attempt starts `quantile(TTFT, 0.95)` after the first if the first has produced no token
yet. Before enough samples exist a fixed default delay is used.

Helper (`race`): attempts are async callables that return once they hold their first token
(e.g. NetworkBackend._attempt returning a NetworkSession with the first frame buffered).
Attempt i+1 starts when attempt i fails, or when `delay_s` passes with no winner; at most
`max_parallel` run at once. The first to return wins; every other running attempt is
cancelled (its own cleanup closes its stream, which cancels generation on the node), and
a loser that returned in the same instant is handed to `discard` (close it). The losers
never reach the client, so the shim signs no voucher for them: they are not billed beyond
the at most one token a node may have produced before the close.

A failure for which `is_final(exc)` is true (a bad request, which another peer would refuse
too) cancels everything and propagates. Other failures are returned in the outcome so the
caller can update statistics and breakers.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from darkbloom.api.trust.stats import quantile

__all__ = ["HedgeOutcome", "HedgePolicy", "hedge_delay", "race"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgePolicy:
    enabled: bool = False  # ApiConfig.hedge
    quantile: float = 0.95
    min_samples: int = 20  # fewer TTFT samples: use default_delay_s
    default_delay_s: float = 2.0
    min_delay_s: float = 0.05  # never hedge sooner (a burst of fast samples is not a promise)
    max_delay_s: float = 30.0


def hedge_delay(policy: HedgePolicy, ttfts: Iterable[float]) -> float:
    """Seconds to wait for a first token before starting the next attempt; inf when hedging is off."""
    if not policy.enabled:
        return math.inf
    samples = [t for t in ttfts if math.isfinite(t) and t >= 0]
    if len(samples) < policy.min_samples:
        delay = policy.default_delay_s
    else:
        delay = quantile(samples, policy.quantile)
    return min(policy.max_delay_s, max(policy.min_delay_s, delay))


@dataclass(slots=True)
class HedgeOutcome(Generic[T]):
    winner: int | None  # index of the winning attempt; None when every attempt failed
    value: T | None
    started: list[int] = field(default_factory=list)  # indexes started, in order
    failures: list[tuple[int, Exception]] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)  # started, neither won nor failed
    started_at: dict[int, float] = field(default_factory=dict)  # trio time each attempt started


async def race(
    attempts: Sequence[Callable[[], Awaitable[T]]],
    *,
    delay_s: float,
    discard: Callable[[T], Awaitable[None]],
    is_final: Callable[[Exception], bool] = lambda exc: False,
    max_parallel: int = 2,
) -> HedgeOutcome[T]:
    """Run attempts with hedging; return the first to succeed. See the module docstring."""
    if max_parallel < 1:
        raise ValueError("max_parallel must be >= 1")
    out: HedgeOutcome[T] = HedgeOutcome(winner=None, value=None)
    running: set[int] = set()
    late: list[T] = []
    final: list[Exception] = []
    wake = [trio.Event()]  # replaced after each wake-up; set when an attempt ends without winning

    async def run_one(i: int, fn: Callable[[], Awaitable[T]], cancel: trio.CancelScope) -> None:
        try:
            value = await fn()
        except Exception as exc:  # one attempt's failure is data for the caller, unless final
            running.discard(i)
            if is_final(exc):
                final.append(exc)
                cancel.cancel()
            else:
                out.failures.append((i, exc))
                wake[0].set()
            return
        running.discard(i)
        if out.winner is None:
            out.winner, out.value = i, value
            cancel.cancel()
        else:
            late.append(value)

    completed = False
    try:
        async with trio.open_nursery() as nursery:
            cancel = nursery.cancel_scope
            nxt = 0
            while out.winner is None:
                if nxt < len(attempts) and len(running) < max_parallel:
                    running.add(nxt)
                    out.started.append(nxt)
                    out.started_at[nxt] = trio.current_time()
                    nursery.start_soon(run_one, nxt, attempts[nxt], cancel)
                    nxt += 1
                    # wait for a failure, or the hedge delay when another attempt could start
                    with trio.move_on_after(delay_s if nxt < len(attempts) else math.inf):
                        await wake[0].wait()
                elif running:
                    await wake[0].wait()
                else:
                    break  # nothing running and nothing left: every attempt failed
                wake[0] = trio.Event()
        completed = True
    finally:
        leftovers = list(late)
        if out.winner is not None and (final or not completed):  # nobody will receive the winner
            leftovers.append(out.value)  # type: ignore[arg-type]
        if leftovers:
            with trio.move_on_after(5, shield=True):
                for v in leftovers:
                    await discard(v)
    if final:
        raise final[0]
    ended = {i for i, _ in out.failures}
    out.cancelled = [i for i in out.started if i != out.winner and i not in ended]
    return out

