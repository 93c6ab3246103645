"""Pick OpenBLAS's thread count step by step from measured step times: all cores on an idle machine, one on a busy one.

On 2 idle cores (AMD EPYC, SmolLM2 fp32) two OpenBLAS threads made decode steps 1.14x (1
sequence) to 1.3x (16 sequences) faster and prefill 1.4-1.65x; on the same cores shared with
other work, two threads were slower than one (their spin-waiting: random 20M model 36/103/138
against 55/117/202 tok/s at 1/4/16 sequences). No fixed setting is right for both, so the
engine measures: for each decode batch size class it keeps a moving average of the step time
under each thread count, uses the faster (leaving the one in use only for one clearly faster),
and now and then spends a few steps on the other to notice when the machine changes.

Steps with prefill work are tuned apart, in classes by the number of prompts being prefilled,
on the step time per prompt token (prompt lengths vary, the per-token cost under each choice is
what compares). They used to take the choice of the largest decode class measured: on a node
that only ever decoded one sequence at a time, where one and two threads decode equally fast,
that could be one thread, while a prefill multiplies a whole prompt and two idle cores did it
1.3-1.4x faster (SmolLM2 fp32: 30 tokens 175 -> 125 ms, 300 tokens 1.48 -> 1.05-1.20 s; the
small test model measured 1.7 and 1.2 ms per prompt token in the engine).

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
    current: int = 0  # the choice in use outside exploration (0: none yet)
    exploring: int = 0  # steps left on the other choice
    explore_with: int = 0


class ThreadTuner:
    """Per decode batch class: the thread count with the lower moving-average step time."""

    def __init__(self, max_threads: int, *, explore_every: int = 64, explore_steps: int = 4, alpha: float = 0.25,
                 margin: float = 0.05) -> None:
        self.choices = (1, max_threads) if max_threads > 1 else (1,)
        # Leave the choice in use only for one measured `margin` faster: where both are about as
        # fast, step-time noise would otherwise flip between them, and every change restarts
        # mlx-lm's one-step pipeline (SmolLM2, one sequence, 2 idle cores: 61 vs 66 ms a step
        # measured apart; flipping on noise, 13.3-16.8 tok/s against 15.4-15.9 fixed at two).
        self.margin = margin
        self.explore_every = explore_every
        self.explore_steps = explore_steps
        self.alpha = alpha
        self.classes: dict[int, _Class] = {}
        self.prefill_classes: dict[int, _Class] = {}  # by prompts being prefilled; averages per prompt token

    def best(self, cls: int, *, prefill: bool = False) -> int | None:
        """The faster measured choice of a class, or None before every choice was measured."""
        c = (self.prefill_classes if prefill else self.classes).get(cls)
        if c is None or len(c.avg) < len(self.choices):
            return None
        return min(self.choices, key=lambda t: c.avg[t])

    def choose(self, batch: int, prefill: bool = False, *, prompts: int = 1) -> int:
        """Threads for the next step: a decode batch of `batch` sequences, or, with `prefill`, a step
        that also prefills `prompts` prompts."""
        if len(self.choices) == 1:
            return 1
        if prefill:
            table, key = self.prefill_classes, batch_class(prompts)
        else:
            table, key = self.classes, batch_class(batch)
        c = table.setdefault(key, _Class())
        missing = [t for t in self.choices if t not in c.avg]
        if missing:  # measure each once: prefill the most threads first, decode the fewest
            return missing[-1] if prefill else missing[0]
        if c.exploring:
            return c.explore_with
        best = min(self.choices, key=lambda t: c.avg[t])
        if c.current in c.avg and c.avg[best] > c.avg[c.current] * (1 - self.margin):
            best = c.current  # not clearly faster: stay
        c.current = best
        if c.steps and c.steps % self.explore_every == 0:
            c.exploring = self.explore_steps
            c.explore_with = next(t for t in self.choices if t != best)
            return c.explore_with
        return best

    def record(self, batch: int, prefill: bool, threads: int, seconds: float, *, settled: bool = True,
               prompts: int = 1, prompt_tokens: int = 0) -> None:
        """One step's time. A prefill step (`prompts` prompts, `prompt_tokens` of them processed)
        counts per prompt token in its own class; steps right after a thread change (`settled`
        False: the pipeline restarted) count toward exploration but not into the averages."""
        if len(self.choices) == 1:
            return
        if prefill:
            c = self.prefill_classes.setdefault(batch_class(prompts), _Class())
            seconds = seconds / prompt_tokens if prompt_tokens > 0 else 0.0
        else:
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
