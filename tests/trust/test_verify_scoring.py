"""Teacher-forced scoring on a real (tiny, random-weight) model and the pure spot-check verdict."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from darkbloom.api.trust.verify import (
    DEFAULT_POLICIES,
    DEFAULT_POLICY,
    ScoredOutput,
    VerifyPolicy,
    calibrate,
    judge,
    scored_from_ranked,
    scored_from_token_scores,
    should_spot_check,
    spot_check_window,
)
from darkbloom.errors import InvalidRequest
from darkbloom.inference.engine import ChoiceFinished, open_engine
from darkbloom.inference.params import GenerationRequest, Sampling


def _score_on_own_thread(model_dir: Path, items, top_k: int):
    """Load and score on one thread (MLX streams are per thread)."""
    import mlx_lm

    from darkbloom.inference.scoring import score_batch, score_tokens

    model, _ = mlx_lm.load(str(model_dir))
    vocab = model.args.vocab_size
    batched = score_batch(model, items, vocab_size=vocab)
    single = [score_tokens(model, p, o, vocab_size=vocab) for p, o in items]
    with pytest.raises(InvalidRequest):
        score_tokens(model, [1], [vocab + 5], vocab_size=vocab)
    with pytest.raises(InvalidRequest):
        score_tokens(model, [], [1], vocab_size=vocab)
    return batched, single


async def test_scoring_matches_engine_and_is_batch_invariant(tiny_model_dir: Path) -> None:
    with trio.fail_after(180):
        async with open_engine([("tiny", tiny_model_dir)], max_concurrent=2, self_benchmark=False) as eng:
            outputs = []
            prompts = [await eng.tokenize("tiny", f"Once upon a time, fact number {i} was") for i in range(3)]
            for prompt, temp in zip(prompts, (0.0, 1.0, 0.0)):
                req = GenerationRequest(kind="completion", prompt=tuple(prompt), max_tokens=12, sampling=Sampling(temperature=temp))
                async for ev in eng.generate("tiny", req):
                    if isinstance(ev, ChoiceFinished):
                        outputs.append(ev.token_ids)
            items = [(p, list(o)) for p, o in zip(prompts, outputs)]
            engine_scores = [await eng.score("tiny", p, o, top_k=5) for p, o in items]
        batched, single = await trio.to_thread.run_sync(_score_on_own_thread, tiny_model_dir, items, 5)
    for b, s, e in zip(batched, single, engine_scores):
        assert [t.token_id for t in b] == [t.token_id for t in e]
        for tb, ts, te in zip(b, s, e):
            assert tb.logprob == pytest.approx(ts.logprob, abs=1e-3)  # padding does not leak backwards
            assert tb.logprob == pytest.approx(te.logprob, abs=1e-3)
            assert (tb.rank < 5) == te.in_top_k
            assert tb.logprob <= 0 and tb.rank >= 0
    # greedy outputs are the argmax at every step (rank 0) when scored by the same weights
    assert all(t.rank == 0 for t in batched[0]) and all(t.rank == 0 for t in batched[2])
    assert scored_from_ranked(batched[0]).ranks == tuple(0 for _ in batched[0])
    assert scored_from_token_scores(engine_scores[0], 5).ranks == tuple(0 for _ in engine_scores[0])


P = VerifyPolicy(top_k=10, max_outside=1, min_mean_logprob=-4.0, min_tokens=4, max_scored_tokens=8)


def test_verdicts() -> None:
    assert not judge(ScoredOutput((-0.5,) * 6, (0,) * 6), P).flagged
    one_odd = judge(ScoredOutput((-0.5,) * 5 + (-9.0,), (0,) * 5 + (400,)), P)
    assert not one_odd.flagged and one_odd.outside_top_k == 1  # one sampled outlier is allowed
    two_odd = judge(ScoredOutput((-0.5,) * 4 + (-9.0, -9.0), (0,) * 4 + (400, 400)), P)
    assert two_odd.flagged and two_odd.reason == "outside_top_k"
    low = judge(ScoredOutput((-5.0,) * 6, (3,) * 6), P)
    assert low.flagged and low.reason == "low_mean_logprob"
    short = judge(ScoredOutput((-20.0,) * 3, (9999,) * 3), P)
    assert short.inconclusive and not short.flagged
    # only the scored window counts
    tail = judge(ScoredOutput((-0.5,) * 8 + (-30.0,) * 8, (0,) * 8 + (9999,) * 8), P)
    assert not tail.flagged and tail.tokens == 8
    assert judge(ScoredOutput((math.nan,) * 5, (0,) * 5), P).flagged
    assert spot_check_window(list(range(100)), P) == tuple(range(8))
    with pytest.raises(ValueError):
        ScoredOutput((-1.0,), ())


@given(st.lists(st.tuples(st.floats(-30, 0), st.integers(0, 50_000)), min_size=4, max_size=32))
def test_verdict_is_monotone(tokens) -> None:
    """Making any token more likely (higher logprob, better rank) never turns a pass into a flag."""
    x = ScoredOutput(tuple(t[0] for t in tokens), tuple(t[1] for t in tokens))
    better = ScoredOutput(tuple(min(0.0, lp + 1.0) for lp in x.logprobs), tuple(r // 2 for r in x.ranks))
    for policy in (DEFAULT_POLICY, DEFAULT_POLICIES.greedy, DEFAULT_POLICIES.low, DEFAULT_POLICIES.high):
        if not judge(x, policy).flagged:
            assert not judge(better, policy).flagged


def test_calibrate_separates_and_keeps_every_honest_sample() -> None:
    rng = random.Random(3)
    honest = [ScoredOutput(tuple(-rng.expovariate(1.0) for _ in range(20)), tuple(int(rng.expovariate(0.2)) for _ in range(20))) for _ in range(300)]
    cheats = [ScoredOutput(tuple(-rng.uniform(6, 14) for _ in range(20)), tuple(rng.randrange(100, 40_000) for _ in range(20))) for _ in range(300)]
    pol = calibrate(honest, cheats)
    assert all(not judge(x, pol).flagged for x in honest)
    assert all(judge(x, pol).flagged for x in cheats)
    assert pol.min_mean_logprob < min(sum(x.logprobs) / 20 for x in honest)
    with pytest.raises(ValueError):
        calibrate([], cheats)


def test_spot_check_draw() -> None:
    rng = random.Random(0)
    draws = [should_spot_check(0.1, rng) for _ in range(10_000)]
    assert 800 < sum(draws) < 1200
    assert not any(should_spot_check(1.0, rng, eligible=False) for _ in range(100))
    assert not any(should_spot_check(0.0, rng) for _ in range(100))


def test_far_token_rule() -> None:
    p = VerifyPolicy(top_k=10_000, max_outside=0, min_mean_logprob=-100.0, far_logprob=-10.0, max_far=1)
    assert not judge(ScoredOutput((-1.0,) * 5 + (-12.0,), (0,) * 6), p).flagged  # one improbable token is allowed
    v = judge(ScoredOutput((-1.0,) * 4 + (-12.0, -11.0), (0,) * 6), p)
    assert v.flagged and v.reason == "improbable_token"
    # a greedy token is the argmax: its logprob is at least -ln(vocab), so the greedy rule is safe
    assert DEFAULT_POLICIES.greedy.far_logprob < -math.log(49152)
