"""The OpenBLAS thread tuner (inference/threads.py): pure choices from step times, and the engine in auto mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from darkbloom.inference.threads import ThreadTuner, batch_class


def feed(tuner: ThreadTuner, batch: int, cost: dict[int, float], steps: int) -> list[int]:
    """Run `steps` decode steps whose time depends only on the thread count; return the choices."""
    used, now = [], 0
    for _ in range(steps):
        t = tuner.choose(batch, prefill=False)
        tuner.record(batch, False, t, cost[t], settled=t == now)
        used.append(t)
        now = t
    return used


def test_batch_classes_are_powers_of_two() -> None:
    assert [batch_class(b) for b in (0, 1, 2, 3, 4, 5, 9, 16, 17)] == [1, 1, 2, 4, 4, 8, 16, 16, 32]


def test_it_settles_on_the_faster_count_and_keeps_exploring_rarely() -> None:
    tuner = ThreadTuner(2, explore_every=64, explore_steps=4)
    used = feed(tuner, 16, {1: 0.140, 2: 0.110}, 400)
    assert tuner.best(16) == 2
    tail = used[50:]
    assert tail.count(2) / len(tail) > 0.9  # mostly the faster one
    assert 1 in tail  # but the slower one is re-measured now and then


def test_it_follows_a_machine_that_becomes_busy() -> None:
    tuner = ThreadTuner(2, explore_every=32, explore_steps=4)
    feed(tuner, 4, {1: 0.090, 2: 0.080}, 200)
    assert tuner.best(4) == 2
    feed(tuner, 4, {1: 0.090, 2: 0.200}, 300)  # other work arrived: two threads now spin and wait
    assert tuner.best(4) == 1


def test_noise_between_two_close_choices_does_not_flip_it_back_and_forth() -> None:
    # Two choices within 8 % of each other and steps that vary by +-15 %: a change restarts
    # mlx-lm's pipeline, so the tuner stays with the one in use unless the other is clearly faster.
    import random

    rnd = random.Random(7)
    tuner = ThreadTuner(2, explore_every=64, explore_steps=4)
    used, now = [], 0
    for _ in range(2000):
        t = tuner.choose(1, prefill=False)
        cost = {1: 0.066, 2: 0.061}[t] * rnd.uniform(0.85, 1.15)
        tuner.record(1, False, t, cost, settled=t == now)
        used.append(t)
        now = t
    changes = sum(1 for a, b in zip(used, used[1:]) if a != b)
    explorations = 2000 // 64
    assert changes <= 2 * explorations + 10, changes  # each exploration is two changes; few others
    assert used[100:].count(2) > 0.8 * len(used[100:])


def test_decode_classes_are_independent() -> None:
    tuner = ThreadTuner(2)
    feed(tuner, 1, {1: 0.05, 2: 0.06}, 50)
    feed(tuner, 16, {1: 0.14, 2: 0.11}, 50)
    assert (tuner.best(1), tuner.best(16)) == (1, 2)
    summary = tuner.summary()
    assert set(summary) == {1, 16} and set(summary[16]) == {1, 2}


def feed_prefill(tuner: ThreadTuner, prompts: int, per_token: dict[int, float], lengths: list[int]) -> list[int]:
    """Prefill steps of the given prompt lengths, costing `per_token[threads]` per prompt token."""
    used = []
    for n in lengths:
        t = tuner.choose(1, prefill=True, prompts=prompts)
        tuner.record(1, True, t, per_token[t] * n, prompts=prompts, prompt_tokens=n)
        used.append(t)
    return used


def test_prefill_is_tuned_apart_from_decode() -> None:
    # A node that only decodes one sequence at a time learns one thread is best for that, and
    # still prefills with two when two prefill faster (they used to follow the decode choice).
    tuner = ThreadTuner(2)
    feed(tuner, 1, {1: 0.05, 2: 0.06}, 50)
    assert tuner.best(1) == 1
    used = feed_prefill(tuner, 1, {1: 0.0010, 2: 0.0007}, [30] * 100)
    assert used[:2] == [2, 1]  # nothing measured: the most threads first, then the other
    assert tuner.best(1, prefill=True) == 2 and used[-30:].count(2) > 25
    assert tuner.best(1) == 1  # decode's choice is untouched


def test_prefill_compares_cost_per_prompt_token() -> None:
    # Two threads measured on long prompts, one thread on short ones: the raw step times favour
    # the short prompts, the per-token cost favours two threads, and that is what counts.
    tuner = ThreadTuner(2)
    assert tuner.choose(1, prefill=True, prompts=4) == 2
    tuner.record(1, True, 2, 0.050, prompts=4, prompt_tokens=100)
    assert tuner.choose(1, prefill=True, prompts=4) == 1
    tuner.record(1, True, 1, 0.010, prompts=4, prompt_tokens=10)
    assert tuner.best(4, prefill=True) == 2
    assert tuner.best(1, prefill=True) is None  # another class: one prompt at a time


def test_prefill_with_an_unknown_token_count_is_not_averaged() -> None:
    tuner = ThreadTuner(2)
    tuner.record(1, True, 2, 0.05, prompts=1, prompt_tokens=0)
    assert tuner.best(1, prefill=True) is None and tuner.choose(1, prefill=True) == 2


def test_unsettled_steps_and_prefill_do_not_enter_the_averages() -> None:
    tuner = ThreadTuner(2)
    tuner.record(8, True, 2, 5.0)
    tuner.record(8, False, 1, 9.0, settled=False)
    assert tuner.summary() == {8: {}}
    tuner.record(8, False, 1, 0.1)
    assert tuner.summary() == {8: {1: 100.0}}


def test_one_core_means_one_thread() -> None:
    tuner = ThreadTuner(1)
    assert tuner.choose(16, prefill=False) == 1 and tuner.choose(1, prefill=True) == 1


async def test_engine_in_auto_mode_measures_both_counts_and_answers(tiny_model_dir: Path) -> None:
    from darkbloom.inference.blas import blas_status, set_blas_threads

    from .test_engine import chat, engine, run

    if not blas_status().startswith("loaded"):
        pytest.skip("OpenBLAS is not loaded on this machine")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: there is nothing to choose")
    try:
        async with engine(tiny_model_dir, blas_threads=0) as eng:
            for _ in range(3):
                r = await run(eng, chat(max_tokens=12))
                assert r["finished"][0].completion_tokens >= 1 and r["text"][0]
            summary = eng._worker.tuner.summary()
            assert summary and all(set(per) == {1, os.cpu_count()} for per in summary.values())
    finally:
        set_blas_threads(1)
