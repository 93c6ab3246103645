"""Pick OpenBLAS's thread count step by step from measured step times: all cores on an idle machine, one on a busy one.

On 2 idle cores (AMD EPYC, SmolLM2 fp32) two OpenBLAS threads made decode steps 1.14x (1
sequence) to 1.3x (16 sequences) faster and prefill 1.4-1.65x; on the same cores shared with
other work, two threads were slower than one (their spin-waiting: random 20M model 36/103/138
against 55/117/202 tok/s at 1/4/16 sequences). No fixed setting is right for both, so the
engine measures: for each decode batch size class it keeps a moving average of the step time
under each thread count, uses the faster, and now and then spends a few steps on the other to
notice when the machine changes. Prefill steps use the choice of the largest batch class
measured so far (their multiplications are larger still, so more threads help them whenever
they help decode).

Pure logic: the worker asks `choose`, sets the threads, times `BatchGenerator.next()`, and
reports with `record`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ThreadTuner", "batch_class"]


def batch_class(batch: int) -> int:
    """Decode batch sizes in classes of powers of two (1, 2, 4, 8, 16, ...)."""
    c = 1
    while c < batch:
        c *= 2
    return c


@dataclass
class _Class:
    avg: dict[int, float] = field(default_factory=dict)  # threads -> moving average step seconds
    steps: int = 0  # decode steps seen in this class
    exploring: int = 0  # steps left on the other choice
    explore_with: int = 0


class ThreadTuner:
    """Per decode batch class: the thread count with the lower moving-average step time."""

    def __init__(self, max_threads: int, *, explore_every: int = 64, explore_steps: int = 4, alpha: float = 0.25) -> None:
        self.choices = (1, max_threads) if max_threads > 1 else (1,)
        self.explore_every = explore_every
        self.explore_steps = explore_steps
        self.alpha = alpha
        self.classes: dict[int, _Class] = {}

    def best(self, cls: int) -> int | None:
        """The faster measured choice of a class, or None before every choice was measured."""
        c = self.classes.get(cls)
        if c is None or len(c.avg) < len(self.choices):
            return None
        return min(self.choices, key=lambda t: c.avg[t])

    def choose(self, batch: int, prefill: bool) -> int:
        """Threads for the next step: a decode batch of `batch` sequences, or one with prefill work."""
        if len(self.choices) == 1:
            return 1
        if prefill:
            for cls in sorted(self.classes, reverse=True):
                b = self.best(cls)
                if b is not None:
                    return b
            return self.choices[-1]
        c = self.classes.setdefault(batch_class(batch), _Class())
        missing = [t for t in self.choices if t not in c.avg]
        if missing:
            return missing[0]
        if c.exploring:
            return c.explore_with
        best = min(self.choices, key=lambda t: c.avg[t])
        if c.steps and c.steps % self.explore_every == 0:
            c.exploring = self.explore_steps
            c.explore_with = next(t for t in self.choices if t != best)
            return c.explore_with
        return best

    def record(self, batch: int, prefill: bool, threads: int, seconds: float, *, settled: bool = True) -> None:
        """One step's time. Prefill steps and steps right after a thread change (`settled`
        False: the pipeline restarted) count toward exploration but not into the averages."""
        if prefill or len(self.choices) == 1:
            return
        c = self.classes.setdefault(batch_class(batch), _Class())
        c.steps += 1
        if c.exploring and threads == c.explore_with:
            c.exploring -= 1
        if not settled or seconds <= 0:
            return
        old = c.avg.get(threads)
        c.avg[threads] = seconds if old is None else old + self.alpha * (seconds - old)

    def summary(self) -> dict[int, dict[int, float]]:
        """Per batch class: thread count -> moving-average step milliseconds (for logs and status)."""
        return {cls: {t: round(s * 1000, 2) for t, s in sorted(c.avg.items())} for cls, c in sorted(self.classes.items())}
