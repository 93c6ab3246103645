"""inference/generator.py: a request that arrives while others decode gets its first token one step sooner, and the same tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from darkbloom.inference.blas import ensure_blas

ensure_blas()


def load(model_dir: Path) -> tuple[Any, Any]:
    from mlx_lm import load as mlx_load

    return mlx_load(str(model_dir))


def run(gen: Any, tok: Any) -> tuple[int, dict[int, list[int]]]:
    """One request decodes; a second arrives; count the steps from its insert to its first token."""
    first = gen.insert([tok.encode("The first request is about rivers and the sea")], max_tokens=[24])[0]
    tokens: dict[int, list[int]] = {first: []}
    while not tokens[first]:
        for r in gen.next()[1]:
            tokens.setdefault(r.uid, []).append(r.token)
    second = gen.insert([tok.encode("A second request arrives while the first one decodes")], max_tokens=[8])[0]
    tokens[second] = []
    steps = 0
    while not tokens[second]:
        steps += 1
        for r in gen.next()[1]:
            tokens.setdefault(r.uid, []).append(r.token)
    for _ in range(40):
        for r in gen.next()[1]:
            tokens.setdefault(r.uid, []).append(r.token)
    return steps, tokens


def test_first_token_one_step_sooner_and_the_same_tokens(tiny_model_dir: Path) -> None:
    from mlx_lm.generate import BatchGenerator

    from darkbloom.inference.generator import new_generator

    model, tok = load(tiny_model_dir)
    kw: dict[str, Any] = dict(max_tokens=64, stop_tokens=[[-1]], completion_batch_size=4, prefill_batch_size=4)
    stock_steps, stock_tokens = run(BatchGenerator(model, **kw), tok)
    ours_steps, ours_tokens = run(new_generator(model, **kw), tok)
    assert ours_steps == stock_steps - 1, (ours_steps, stock_steps)
    assert ours_tokens == stock_tokens  # greedy: the same forward passes give the same tokens
    assert [len(t) for t in ours_tokens.values()] == [24, 8]


def test_prompts_to_prefill_counts_only_steps_that_prefill(tiny_model_dir: Path) -> None:
    """The thread tuner times steps that prefill apart from decode steps: a step whose prompts
    are down to their last token only starts them (a decode-sized pass) and is not a prefill."""
    from darkbloom.inference.generator import new_generator, prompts_to_prefill

    model, tok = load(tiny_model_dir)
    gen = new_generator(model, max_tokens=64, stop_tokens=[[-1]], completion_batch_size=4, prefill_batch_size=4,
                        prefill_step_size=8)
    assert prompts_to_prefill(gen) == 0
    long, short = tok.encode("a prompt long enough to take a few prefill steps of eight tokens each"), tok.encode("hi there")
    assert len(long) > 16 and 2 <= len(short) <= 9
    gen.insert([long, short], max_tokens=[4, 4])
    seen = []
    for _ in range(20):
        seen.append(prompts_to_prefill(gen))
        gen.next()
    # Both prompts prefill first (8 tokens a step), the short one leaves once it is down to its
    # last token, the long one keeps prefilling, and then only decode steps remain.
    assert seen[0] == 2 and 1 in seen and seen[-1] == 0
    assert seen == sorted(seen, reverse=True)
    steps_with_prefill = sum(1 for n in seen if n)
    assert steps_with_prefill == -(-(len(long) - 1) // 8)  # ceil((prompt - last token) / step size)
