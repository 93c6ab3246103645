"""Spot-check verdict on the bundled SmolLM2: honest answers pass, another model's text and random tokens fail.

The honest node is our engine serving SmolLM2 (greedy and seeded sampling at t=0.7 and t=1.0,
one with top_p/top_k); the cheat serves another model (the project's tiny random model, its text
re-tokenized with SmolLM2's tokenizer) or random token ids under SmolLM2's digest. The verifier is
a second SmolLM2 instance on its own thread scoring under the sampling the request asked for.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from darkbloom.api.trust.verify import DEFAULT_POLICY, judge, log_evalue, scored_from_sampled
from darkbloom.inference.engine import ChoiceFinished, open_engine
from darkbloom.inference.params import GenerationRequest, Sampling
from darkbloom.inference.scoring import TILTS, SamplingSpec

pytestmark = pytest.mark.slow
MODEL = "smollm2"
QUESTIONS = ("What is the capital of France?", "Write one sentence about the sea.")
HONEST = (Sampling(temperature=0.0), Sampling(temperature=0.7, seed=1), Sampling(temperature=1.0, seed=2),
          Sampling(temperature=0.7, top_p=0.9, top_k=50, seed=3))
CLAIMS = (Sampling(temperature=0.0), Sampling(temperature=0.7), Sampling(temperature=1.0))


def _verify(model_dir: Path, jobs: list[tuple[list[int], list[int], Sampling]]):
    """The verifier: a second SmolLM2 instance loaded and run on this thread (MLX streams are per thread)."""
    import mlx_lm

    from darkbloom.inference.scoring import output_logits, sampled_stats

    model, _ = mlx_lm.load(str(model_dir))
    logits = output_logits(model, [(p, o) for p, o, _ in jobs], vocab_size=model.args.vocab_size)
    return [scored_from_sampled(sampled_stats(lg, o, SamplingSpec.from_sampling(s)), TILTS) for lg, (_, o, s) in zip(logits, jobs)]


async def _answers(model_dir: Path, model_id: str, jobs: list[tuple[object, Sampling]], max_tokens: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in jobs]
    async with open_engine([(model_id, model_dir)], max_concurrent=len(jobs), self_benchmark=False) as eng:

        async def one(i: int, prompt: object, s: Sampling) -> None:
            if isinstance(prompt, str):
                req = GenerationRequest(kind="chat", messages=({"role": "user", "content": prompt},), max_tokens=max_tokens, sampling=s)
            else:
                req = GenerationRequest(kind="completion", prompt=tuple(prompt), max_tokens=max_tokens, sampling=s)
            async for ev in eng.generate(model_id, req):
                if isinstance(ev, ChoiceFinished):
                    out[i] = list(ev.token_ids)

        async with trio.open_nursery() as n:  # concurrently: the batched decode path, as served
            for i, (p, s) in enumerate(jobs):
                n.start_soon(one, i, p, s)
    return out


async def test_honest_passes_another_model_and_random_tokens_fail(smollm2_dir: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    smol_tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    tiny_tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prompts = [smol_tok.encode(smol_tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
                               add_special_tokens=False) for q in QUESTIONS]
    with trio.fail_after(900):
        honest_jobs = [(p, s) for p in prompts for s in HONEST]
        honest = await _answers(smollm2_dir, MODEL, honest_jobs, 16)
        other_raw = await _answers(tiny_model_dir, "tiny", [(q, Sampling(temperature=0.0)) for q in QUESTIONS], 16)
        other = [smol_tok.encode(tiny_tok.decode(o, skip_special_tokens=True), add_special_tokens=False)[:16] for o in other_raw]
        rng = random.Random(0)
        noise = [[rng.randrange(smol_tok.vocab_size) for _ in range(16)] for _ in prompts]
        jobs = [(p, o, s) for (p, s), o in zip(honest_jobs, honest)]
        cheats = [(p, o, claim) for p, o in [*zip(prompts, other), *zip(prompts, noise)] for claim in CLAIMS]
        scored = await trio.to_thread.run_sync(_verify, smollm2_dir, jobs + cheats)
    assert all(len(o) >= 4 for o in honest) and all(len(o) >= 4 for o in other)
    for (_, o, s), x in zip(jobs, scored[: len(jobs)]):
        v = judge(x, DEFAULT_POLICY)
        assert not v.flagged and not v.inconclusive, (s, v)
        assert v.excluded == 0 and log_evalue(x) < 5.0, (s, v)  # far from the 9.2 threshold
    for (_, o, claim), x in zip(cheats, scored[len(jobs):]):
        v = judge(x, DEFAULT_POLICY)
        assert v.flagged, (claim, v)
        assert v.reason == ("excluded_token" if claim.temperature == 0 else v.reason)
