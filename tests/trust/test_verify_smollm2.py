"""Spot-check verdict on the bundled SmolLM2: honest answers pass DEFAULT_POLICY, random tokens and another model's text fail."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from darkbloom.api.trust.verify import DEFAULT_POLICIES, DEFAULT_POLICY, judge, scored_from_ranked
from darkbloom.inference.engine import ChoiceFinished, open_engine
from darkbloom.inference.params import GenerationRequest, Sampling

pytestmark = pytest.mark.slow
MODEL = "smollm2"


def _score(model_dir: Path, items):
    import mlx_lm

    from darkbloom.inference.scoring import score_batch

    model, _ = mlx_lm.load(str(model_dir))  # the verifier: a second instance, on this thread
    return score_batch(model, items, vocab_size=model.args.vocab_size)


async def test_honest_passes_cheats_fail(smollm2_dir: Path) -> None:
    with trio.fail_after(600):
        async with open_engine([(MODEL, smollm2_dir)], max_concurrent=4, self_benchmark=False) as eng:
            prompts = [
                await eng.tokenize(MODEL, f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
                for q in ("What is the capital of France?", "Write one sentence about the sea.")
            ]
            outputs: list[tuple[list[int], list[int]]] = []  # (prompt ids, output ids)
            temps: list[float] = []

            async def one(p, temp):
                req = GenerationRequest(kind="completion", prompt=tuple(p), max_tokens=16, sampling=Sampling(temperature=temp))
                async for ev in eng.generate(MODEL, req):
                    if isinstance(ev, ChoiceFinished):
                        outputs.append((p, list(ev.token_ids)))
                        temps.append(temp)

            async with trio.open_nursery() as n:
                for p in prompts:
                    for temp in (0.0, 0.7):
                        n.start_soon(one, p, temp)
            other_text = await eng.tokenize(MODEL, " istion flor the the zebra qua 1999 ;; blue blue under vex")
        rng = random.Random(0)
        items = list(outputs)
        items += [(prompts[0], [rng.randrange(49152) for _ in range(16)]), (prompts[1], other_text[:16])]
        scored = await trio.to_thread.run_sync(_score, smollm2_dir, items)
    assert len(scored) == 6
    for s, temp in zip(scored[:4], temps):  # honest greedy and sampled answers pass their tier and the default
        assert not judge(scored_from_ranked(s), DEFAULT_POLICIES.for_temperature(temp)).flagged
        assert not judge(scored_from_ranked(s), DEFAULT_POLICY).flagged
    for s in scored[4:]:  # random tokens and gibberish, as if claimed at temperature 0.7
        v = judge(scored_from_ranked(s), DEFAULT_POLICIES.for_temperature(0.7))
        assert v.flagged, v
    assert judge(scored_from_ranked(scored[4]), DEFAULT_POLICY).flagged  # random tokens fail at any temperature
