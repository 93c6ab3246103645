"""Teacher-forced scoring on a real (tiny, random-weight) model and the pure spot-check verdict."""

from __future__ import annotations

import dataclasses
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
    log_evalue,
    scored_from_ranked,
    scored_from_sampled,
    scored_from_token_scores,
    should_spot_check,
    spot_check_window,
    z_score,
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


# --- the sampling-distribution statistic (e-value, excluded tokens, z) ---------------------

from darkbloom.inference.scoring import TILTS as THETAS  # noqa: E402  (the verifier's tilt exponents)


def _stats(q: list[float], x: int) -> tuple[float, float, float, tuple[float, ...]]:
    """Exact per-position statistics of distribution q (pure Python) for token x."""
    support = [p for p in q if p > 0]
    h = -sum(p * math.log(p) for p in support)
    var = sum(p * (math.log(p) + h) ** 2 for p in support)
    tilts = tuple(math.log(sum(p ** (1 - th) for p in support)) for th in THETAS)
    return math.log(q[x]) if q[x] > 0 else -math.inf, h, var, tilts


def _softmax(logits: list[float], t: float) -> list[float]:
    m = max(logits)
    e = [math.exp((v - m) / t) for v in logits]
    s = sum(e)
    return [v / s for v in e]


def _output(rng: random.Random, n: int, sample_t: float, claim_t: float, vocab: int = 40) -> ScoredOutput:
    """n positions with random logits; tokens drawn at `sample_t`, scored as if sampled at `claim_t`."""
    rows = []
    for _ in range(n):
        logits = [rng.gauss(0.0, 2.5) for _ in range(vocab)]
        x = rng.choices(range(vocab), weights=_softmax(logits, sample_t))[0]
        rows.append(_stats(_softmax(logits, claim_t), x))
    return ScoredOutput(
        tuple(r[0] for r in rows), tuple(0 for _ in rows), sample_logprobs=tuple(r[0] for r in rows),
        entropies=tuple(r[1] for r in rows), variances=tuple(r[2] for r in rows), log_tilts=tuple(r[3] for r in rows),
        tilts=THETAS, excluded=tuple(False for _ in rows),
    )


def test_evalue_bounds_honest_false_flags_and_catches_a_different_sampler() -> None:
    """Honest tokens (drawn from the claimed distribution) are flagged at most alpha of the time
    (Ville); tokens from another distribution (here: sampled hotter than claimed) are caught."""
    rng = random.Random(7)
    alpha_policy = VerifyPolicy(max_log_evalue=math.log(20))  # alpha = 5%: a bound we can see in 400 draws
    honest = [_output(rng, 16, 1.0, 1.0) for _ in range(400)]
    flagged = sum(judge(x, alpha_policy).flagged for x in honest)
    assert flagged <= 400 * 0.05 * 1.6  # 20 expected at most; Ville's bound is loose, observed far lower
    assert all(not judge(x, DEFAULT_POLICY).flagged for x in honest)
    hot = [_output(rng, 32, 4.0, 1.0) for _ in range(100)]  # 32 tokens sampled at t=4, claimed t=1
    assert sum(judge(x, DEFAULT_POLICY).flagged for x in hot) >= 99
    assert all(judge(x, DEFAULT_POLICY).reason == "high_evalue" for x in hot if judge(x, DEFAULT_POLICY).flagged)
    # z drifts negative for the cheat and stays near 0 for honest outputs
    assert sum(z_score(x) for x in honest) / len(honest) == pytest.approx(0.0, abs=0.2)
    assert all(z_score(x) < -4 for x in hot)
    assert min(z_score(x) for x in honest) < -2.5  # the honest left tail is heavier than Gaussian (why z needs care)


def test_evalue_grows_with_length_and_short_outputs_pass() -> None:
    rng = random.Random(11)
    cheat = _output(rng, 32, 3.0, 0.7)
    lengths = [log_evalue(cheat, n) for n in (1, 4, 16, 32)]
    assert lengths[-1] > lengths[1] > 0  # evidence accumulates with length
    assert not judge(cheat, VerifyPolicy(max_scored_tokens=1)).flagged or lengths[0] >= DEFAULT_POLICY.max_log_evalue
    assert judge(cheat, DEFAULT_POLICY).flagged


def test_running_max_and_bet_fraction_keep_early_evidence() -> None:
    """A repetition loop: two very unlikely tokens, then tokens more likely than q's own samples.
    With full bets (lam = 1) the likely tokens erase the evidence; the running maximum keeps
    it, and lam < 1 bounds what each likely token costs."""
    vocab = 1000
    peaked = [0.9] + [0.1 / (vocab - 1)] * (vocab - 1)
    q_rare = [0.999] + [0.001 / (vocab - 1)] * (vocab - 1)  # the tail tokens have q = 1e-6
    rows = [_stats(q_rare, 1), _stats(q_rare, 2)] + [_stats(peaked, 0)] * 30
    x = ScoredOutput(tuple(r[0] for r in rows), tuple(0 for _ in rows), sample_logprobs=tuple(r[0] for r in rows),
                     entropies=tuple(r[1] for r in rows), variances=tuple(r[2] for r in rows),
                     log_tilts=tuple(r[3] for r in rows), tilts=THETAS, excluded=tuple(False for _ in rows))
    early = log_evalue(x, 2)
    assert early > 10.0
    assert log_evalue(x) == pytest.approx(early)  # the running maximum: later tokens cannot erase it
    assert log_evalue(x, None, (0.5,)) > 9.0
    assert judge(x).flagged and judge(x).reason == "high_evalue"


def test_excluded_tokens_and_missing_statistics() -> None:
    rng = random.Random(3)
    x = _output(rng, 8, 1.0, 1.0)
    bad = dataclasses.replace(x, sample_logprobs=(-math.inf,) + x.sample_logprobs[1:], excluded=(True,) + x.excluded[1:])
    v = judge(bad, DEFAULT_POLICY)
    assert v.flagged and v.reason == "excluded_token" and v.excluded == 1
    assert not judge(bad, VerifyPolicy(max_excluded=1)).flagged
    raw_only = ScoredOutput(x.logprobs, x.ranks)
    v = judge(raw_only, DEFAULT_POLICY)  # a verifier that could not rebuild the distribution
    assert not v.flagged and v.inconclusive
    nan = dataclasses.replace(x, sample_logprobs=(math.nan,) + x.sample_logprobs[1:])
    assert judge(nan, DEFAULT_POLICY).flagged
    with pytest.raises(ValueError):
        dataclasses.replace(x, entropies=x.entropies[1:])
    with pytest.raises(ValueError):
        dataclasses.replace(x, tilts=(0.5,))
    # one policy for every temperature now; min_z is the optional Gaussian rule
    assert DEFAULT_POLICIES.for_temperature(0.0) == DEFAULT_POLICIES.for_temperature(1.0) == DEFAULT_POLICY
    assert judge(_output(rng, 16, 2.5, 1.0), VerifyPolicy(max_log_evalue=math.inf, min_z=-2.0)).reason == "low_z"


@given(st.lists(st.tuples(st.floats(-30, -0.01), st.floats(0, 5)), min_size=1, max_size=32), st.floats(0, 3))
def test_evalue_is_monotone_in_token_likelihood(tokens, boost) -> None:
    """A more likely token (under the sampling distribution) never raises the e-value."""
    tilts = tuple(tuple(th * h for th in THETAS) for _, h in tokens)  # any fixed values
    def make(lps):
        return ScoredOutput(tuple(lps), tuple(0 for _ in lps), sample_logprobs=tuple(lps), entropies=tuple(h for _, h in tokens),
                            variances=tuple(1.0 for _ in lps), log_tilts=tilts, tilts=THETAS, excluded=tuple(False for _ in lps))
    base = make([lp for lp, _ in tokens])
    better = make([min(0.0, lp + boost) for lp, _ in tokens])
    assert log_evalue(better) <= log_evalue(base) + 1e-9
    if not judge(base, DEFAULT_POLICY).flagged:
        assert not judge(better, DEFAULT_POLICY).flagged


def test_sampled_stats_reproduce_the_mlx_sampler() -> None:
    """The verifier's distribution is the one mlx-lm's sampler draws from: over 4000 draws per
    setting no token is excluded, empirical frequencies match exp(sample_logprob), and the
    mean log q equals minus the entropy."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from darkbloom.inference.scoring import TILTS, SamplingSpec, sampled_stats

    mx.random.seed(0)
    vocab, draws = 200, 4000
    logits = (mx.random.normal((1, vocab)) * 3).astype(mx.float32)
    specs = [SamplingSpec(temperature=0.7), SamplingSpec(temperature=1.0, top_p=0.9, top_k=50),
             SamplingSpec(temperature=0.7, min_p=0.05), SamplingSpec(temperature=1.3, top_p=0.5, logit_bias=((3, 5.0),)),
             SamplingSpec(temperature=0.0)]
    for spec in specs:
        biased = logits.at[:, mx.array([3])].add(mx.array([5.0])) if spec.logit_bias else logits
        lp = biased - mx.logsumexp(biased, axis=-1, keepdims=True)
        toks = make_sampler(spec.temperature, top_p=spec.top_p, min_p=spec.min_p, top_k=spec.top_k)(mx.broadcast_to(lp, (draws, vocab))).tolist()
        scored = sampled_stats(mx.broadcast_to(logits, (draws, vocab)), toks, spec)
        assert not any(t.excluded for t in scored), spec
        every = sampled_stats(mx.broadcast_to(logits, (vocab, vocab)), list(range(vocab)), spec)
        counts = [0] * vocab
        for t in toks:
            counts[t] += 1
        for v in range(vocab):
            p = 0.0 if every[v].excluded else math.exp(every[v].sample_logprob)
            assert abs(counts[v] / draws - p) < 0.03, (spec, v)
        assert sum(math.exp(t.sample_logprob) for t in every if not t.excluded) == pytest.approx(1.0, abs=1e-3)
        # each e-value factor has expectation exactly 1 under q (what makes the e-value sound)
        for j, th in enumerate(TILTS):
            factor = sum(math.exp(t.sample_logprob) * math.exp(-th * t.sample_logprob - t.log_tilts[j]) for t in every if not t.excluded)
            assert factor == pytest.approx(1.0, abs=1e-3), (spec, th)
        mean_lq = sum(t.sample_logprob for t in scored) / draws
        assert mean_lq == pytest.approx(-scored[0].entropy, abs=0.1)
        if spec.top_k:
            assert sum(not t.excluded for t in every) <= spec.top_k
    greedy = sampled_stats(logits, [int(mx.argmax(logits).item())], SamplingSpec(temperature=0.0))[0]
    assert greedy.sample_logprob == 0.0 and not greedy.excluded


def test_score_attestation_round_trip_keeps_the_verdict() -> None:
    """The sampled statistics survive signing, the wire (milli-nat integers) and the relay's re-check."""
    from darkbloom.api.trust.evidence import attest_scores, scored_from_attestation
    from darkbloom.errors import MalformedMessage
    from darkbloom.identity import Identity
    from darkbloom.inference.scoring import SampledToken
    from darkbloom.wire.codec import decode, encode
    from darkbloom.wire.trust import ScoreAttestation

    rng = random.Random(5)
    x = _output(rng, 12, 2.5, 1.0)
    tokens = [SampledToken(i, x.logprobs[i], 0, x.sample_logprobs[i], x.entropies[i], x.variances[i], x.log_tilts[i], i == 3)
              for i in range(12)]
    verifier = Identity.from_seed(b"\x07" * 32)
    att = attest_scores(verifier, model_digest="d", prompt_ids=[1, 2], output_ids=list(range(12)),
                        logprobs=x.logprobs, ranks=x.ranks, time_ms=1, sampled=tokens, sampling="temperature=1", tilts=THETAS)
    back = scored_from_attestation(decode(encode(att), ScoreAttestation))
    assert back.excluded == tuple(i == 3 for i in range(12)) and back.sample_logprobs[3] == -math.inf
    assert back.tilts == THETAS
    assert judge(back).reason == "excluded_token"
    no_ex = [dataclasses.replace(t, excluded=False) for t in tokens]
    att2 = attest_scores(verifier, model_digest="d", prompt_ids=[1, 2], output_ids=list(range(12)),
                         logprobs=x.logprobs, ranks=x.ranks, time_ms=1, sampled=no_ex, sampling="temperature=1", tilts=THETAS)
    back2 = scored_from_attestation(decode(encode(att2), ScoreAttestation))
    assert log_evalue(back2) == pytest.approx(log_evalue(x), abs=0.05)  # rounding to milli-nats
    assert judge(back2).flagged == judge(x).flagged
    # an old verifier (raw scores only) still decodes: inconclusive under the sampled policy
    raw = attest_scores(verifier, model_digest="d", prompt_ids=[1, 2], output_ids=list(range(12)),
                        logprobs=x.logprobs, ranks=x.ranks, time_ms=1)
    assert judge(scored_from_attestation(decode(encode(raw), ScoreAttestation))).inconclusive
    broken = dataclasses.replace(att2, log_tilts_mnats=att2.log_tilts_mnats[:-1])
    with pytest.raises(MalformedMessage):
        scored_from_attestation(broken)


async def test_engine_outputs_are_never_excluded_under_their_sampling(tiny_model_dir: Path) -> None:
    """Numerical agreement: the engine's batched decode (prompt cache, continuous batching) and
    the verifier's single forward pass agree on which tokens the sampler could produce, with
    tight filters (top_k 3, top_p 0.3, min_p 0.5) and greedy; honest e-values stay small."""
    from darkbloom.inference.scoring import SamplingSpec

    settings = [Sampling(temperature=0.0), Sampling(temperature=1.0, top_k=3), Sampling(temperature=0.8, top_p=0.3),
                Sampling(temperature=1.2, min_p=0.5), Sampling(temperature=1.0, logit_bias=((5, 4.0),))]
    with trio.fail_after(180):
        async with open_engine([("tiny", tiny_model_dir)], max_concurrent=4, self_benchmark=False) as eng:
            prompt = await eng.tokenize("tiny", "Once upon a time, in a small town,")
            results = []

            async def one(s: Sampling) -> None:
                req = GenerationRequest(kind="completion", prompt=tuple(prompt), max_tokens=24, sampling=s)
                async for ev in eng.generate("tiny", req):
                    if isinstance(ev, ChoiceFinished):
                        results.append((s, list(ev.token_ids)))

            async with trio.open_nursery() as n:  # concurrently: batched decode
                for s in settings * 2:
                    n.start_soon(one, s)
            scored = [(s, await eng.score_sampled("tiny", prompt, out, SamplingSpec.from_sampling(s))) for s, out in results]
            wrong = await eng.score_sampled("tiny", prompt, [t + 1 for t in results[0][1]], SamplingSpec(temperature=0.0))
    assert len(scored) == 10
    for s, toks in scored:
        assert len(toks) == 24 and not any(t.excluded for t in toks), s
        x = scored_from_sampled(toks, THETAS)
        assert not judge(x).flagged and log_evalue(x) < 6.0, s
        if s.temperature == 0:
            assert all(t.rank == 0 and t.sample_logprob == 0.0 for t in toks)
    assert judge(scored_from_sampled(wrong, THETAS)).reason == "excluded_token"
    assert SamplingSpec.from_sampling(Sampling(presence_penalty=1.0)) is None
