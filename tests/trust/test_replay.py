"""Replayable sampling (darkbloom/inference/replay.py) and the replay rule of the spot check, on the real engine and a tiny model."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import trio

from darkbloom.api.trust.seeding import replay_seeded
from darkbloom.api.trust.verify import DEFAULT_POLICY, judge, scored_from_sampled
from darkbloom.inference.engine import ChoiceFinished, open_engine
from darkbloom.inference.params import GenerationRequest, Sampling
from darkbloom.inference.scoring import TILTS, SamplingSpec


def _numpy_noise(seed: int, step: int, vocab: int) -> np.ndarray:
    """The noise's definition, written again with numpy's uint32 arithmetic (wrapping multiply)."""
    from darkbloom.inference.replay import step_key

    def fmix(x: np.ndarray) -> np.ndarray:
        x = x ^ (x >> np.uint32(16))
        x = (x * np.uint32(0x85EBCA6B)).astype(np.uint32)
        x = x ^ (x >> np.uint32(13))
        x = (x * np.uint32(0xC2B2AE35)).astype(np.uint32)
        return x ^ (x >> np.uint32(16))

    k1, k2 = step_key(seed, step)
    with np.errstate(over="ignore"):
        x = fmix((fmix(np.arange(vocab, dtype=np.uint32) ^ np.uint32(k1)) + np.uint32(k2)).astype(np.uint32))
    u = ((x >> np.uint32(9)).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / (1 << 23))
    return -np.log(-np.log(u))


def test_noise_is_defined_by_integer_arithmetic_and_always_finite() -> None:
    import mlx.core as mx

    from darkbloom.inference.replay import gumbel_noise, step_key

    g = np.array(gumbel_noise(2**62 + 12345, [0, 7], 5000))
    for row, step in zip(g, (0, 7)):
        assert np.abs(row - _numpy_noise(2**62 + 12345, step, 5000)).max() < 1e-5
    assert not np.array_equal(g[0], g[1]) and step_key(1, 0) != step_key(2, 0) != step_key(1, 1)
    big = np.array(gumbel_noise(3, range(64), 49152))  # ~3M draws: no infinite noise (the top value stays below 1)
    assert np.isfinite(big).all() and big.max() < 17.0
    assert abs(float(big.mean()) - 0.5772) < 0.01 and abs(float(big.std()) - 1.2825) < 0.01  # standard Gumbel
    assert mx.array(big).dtype == mx.float32


def test_replayable_sampler_draws_from_the_filtered_distribution() -> None:
    import mlx.core as mx

    from darkbloom.inference.replay import ReplayableSampler

    p = np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32)
    lp = mx.log(mx.array(p))[None]
    counts = np.zeros(4)
    sampler = ReplayableSampler(temperature=1.0, seed=11)
    for _ in range(4000):
        counts[sampler(lp).item()] += 1
    assert sampler.step == 4000
    assert np.abs(counts / 4000 - p).max() < 0.03
    # Filters hold on every draw, even over a large vocabulary (the noise is finite everywhere).
    rng = np.random.default_rng(0)
    wide = mx.array(rng.normal(size=(1, 49152)).astype(np.float32) * 3)
    wide = wide - mx.logsumexp(wide, axis=-1, keepdims=True)
    top2 = set(np.argsort(-np.array(wide[0]))[:2].tolist())
    capped = ReplayableSampler(temperature=1.0, seed=5, top_k=2)
    assert {capped(wide).item() for _ in range(600)} <= top2
    same = [ReplayableSampler(temperature=0.7, seed=9) for _ in range(2)]
    assert [same[0](wide).item() for _ in range(20)] == [same[1](wide).item() for _ in range(20)]


def test_the_shim_seeds_sampled_requests_only() -> None:
    draw = iter(range(100, 200)).__next__
    assert replay_seeded({"temperature": 0.7}, "chat", draw) == {"temperature": 0.7, "seed": 100}
    assert replay_seeded({}, "completion", draw)["seed"] == 101  # OpenAI's default temperature is 1
    body = {"temperature": 0}
    assert replay_seeded(body, "chat", draw) is body  # greedy: the argmax is its own check
    assert replay_seeded({"seed": 7, "temperature": 1.0}, "chat", draw)["seed"] == 7  # the developer's seed stays
    assert "seed" not in replay_seeded({"temperature": 1.0}, "embedding", draw)
    seeds = {replay_seeded({}, "chat")["seed"] for _ in range(50)}
    assert len(seeds) == 50 and all(0 <= s < 2**63 for s in seeds)


async def test_honest_seeded_outputs_replay_and_cheats_do_not(tiny_model_dir: Path) -> None:
    """The engine's seeded draws (continuous batching, mixed settings) are exactly the replayed
    draws under the teacher-forced pass; the same tokens under another seed, or another request's
    tokens under this seed, are flagged "replay_mismatch" even where the e-value has no evidence."""
    settings = [Sampling(temperature=1.0, seed=11), Sampling(temperature=0.7, top_k=5, seed=12),
                Sampling(temperature=1.3, top_p=0.8, seed=2**63 + 13), Sampling(temperature=1.0, min_p=0.05, seed=14),
                Sampling(temperature=0.9, logit_bias=((5, 3.0),), seed=15), Sampling(temperature=1.0)]
    with trio.fail_after(180):
        async with open_engine([("tiny", tiny_model_dir)], max_concurrent=8, self_benchmark=False) as eng:
            prompt = await eng.tokenize("tiny", "Once upon a time, in a small town,")
            results: dict[int, list[int]] = {}

            async def one(i: int, s: Sampling) -> None:
                req = GenerationRequest(kind="completion", prompt=tuple(prompt), max_tokens=24, sampling=s)
                async for ev in eng.generate("tiny", req):
                    if isinstance(ev, ChoiceFinished):
                        results[i] = list(ev.token_ids)

            async with trio.open_nursery() as n:  # concurrently: one batch, per-row samplers
                for i, s in enumerate(settings):
                    n.start_soon(one, i, s)
            honest = [await eng.score_sampled("tiny", prompt, results[i], SamplingSpec.from_sampling(s))
                      for i, s in enumerate(settings)]
            spec0 = SamplingSpec.from_sampling(settings[0])
            assert spec0 is not None
            wrong_seed = await eng.score_sampled("tiny", prompt, results[0], dataclasses.replace(spec0, seed=99))
            foreign = await eng.score_sampled("tiny", prompt, results[5], spec0)  # an unseeded draw claimed as seed 11
    for s, toks in zip(settings, honest):
        x = scored_from_sampled(toks, TILTS)
        v = judge(x)
        if s.seed is None:
            assert not x.replay_gaps and v.replay_misses == -1
            continue
        assert len(x.replay_gaps) == 24 and max(x.replay_gaps) <= 1e-3, s  # numerical noise only
        assert not v.flagged and v.replay_misses == 0, (s, v)
    for cheat in (wrong_seed, foreign):
        v = judge(scored_from_sampled(cheat, TILTS))
        assert v.flagged and v.reason == "replay_mismatch" and v.replay_misses >= 10, v
        unreplayed = judge(dataclasses.replace(scored_from_sampled(cheat, TILTS), replay_gaps=()))
        assert v.replay_misses > 0 and unreplayed.log_evalue < DEFAULT_POLICY.max_log_evalue  # the e-value alone misses it


def test_replay_rule_allows_numerical_noise_only() -> None:
    rng = random.Random(0)
    n = 12
    base = dict(logprobs=tuple(-1.0 for _ in range(n)), ranks=tuple(0 for _ in range(n)),
                sample_logprobs=tuple(-1.0 for _ in range(n)), entropies=tuple(1.0 for _ in range(n)),
                variances=tuple(0.5 for _ in range(n)), log_tilts=tuple((1.0,) for _ in range(n)), tilts=(1.0,),
                excluded=tuple(False for _ in range(n)))
    from darkbloom.api.trust.verify import ScoredOutput

    noise = ScoredOutput(**base, replay_gaps=tuple(rng.uniform(0, 0.01) for _ in range(n)))
    assert judge(noise).replay_misses == 0 and not judge(noise).flagged
    one = ScoredOutput(**base, replay_gaps=(0.0,) * (n - 1) + (0.2,))
    assert judge(one).reason == "replay_mismatch" and judge(one).replay_misses == 1
    assert not judge(one, dataclasses.replace(DEFAULT_POLICY, max_replay_misses=1)).flagged
    nan = ScoredOutput(**base, replay_gaps=(float("nan"),) + (0.0,) * (n - 1))
    assert judge(nan).flagged


def test_block_noise_draws_equal_the_per_step_definition() -> None:
    """The sampler computes the noise of several draws at once; each draw is still
    argmax(logprobs / T + noise(seed, step)) across block boundaries."""
    import mlx.core as mx

    from darkbloom.inference.replay import NOISE_BLOCK, ReplayableSampler, gumbel_noise

    rng = np.random.default_rng(3)
    sampler = ReplayableSampler(temperature=0.8, seed=77)
    for step in range(NOISE_BLOCK * 2 + 3):
        lp = mx.array(rng.normal(size=(1, 3000)).astype(np.float32) * 4)
        want = int(mx.argmax(lp[0] * (1.0 / 0.8) + gumbel_noise(77, [step], 3000)[0]).item())
        assert sampler(lp).item() == want, step
