"""Spot-check verdicts, pure: teacher-forced scores of a node's output -> pass or flag.

A spot check: the shim sends a finished request (its body, so the sampling parameters too)
and the first node's output token ids to a second node serving the same weights digest; that
node runs one forward pass (darkbloom.inference.scoring.score_sampled) and returns, per output
token x_i, its log-probability log q_i(x_i) under the distribution q_i the request samples
from (temperature, top_p, top_k, min_p, logit_bias, as mlx-lm applies them), whether the
sampler could have produced it at all, and of q_i: the entropy H_i, the variance of log q_i
and the Renyi tilts log sum_v q_i(v)^(1-theta). The first node is flagged when

  * a token is excluded: outside top_k / the top_p nucleus / min_p, or, greedy, not the argmax
    (beyond a numerical slack of 0.01 nats: batched decode and one forward pass differ ~1e-5), or
  * the e-process (`log_evalue`) reaches 1/alpha at some prefix (alpha = 1e-3 by default).
    Under honest sampling it is a mean-1 martingale, so an honest node is flagged with
    probability <= alpha per check whatever the model, prompt, temperature or length: no
    threshold is fitted to data, and short outputs carry less evidence (pass) instead of
    producing false flags, or
  * replay (seeded requests at temperature > 0): the node drew token i as argmax_v(log q_i(v) / T
    + g_i(v)) with noise g_i the verifier rebuilds from the request's seed
    (darkbloom.inference.replay); a token the replayed draw beats by more than `replay_slack`
    nats (numerical noise is ~1e-3 on CPU) is a miss, and more than `max_replay_misses` misses
    flag the node. An honest node misses only through numerical noise; another model's or a
    random token is the replayed draw about as often as the right model would have drawn it, or
  * (optional, off by default) z = (sum log q + sum H) / sqrt(sum Var) < min_z: the Gaussian
    form of the same idea, which needs a calibrated threshold because its left tail is heavy.

Requests whose distribution the verifier cannot rebuild from the logits (repetition, presence
or frequency penalties; grammars: JSON mode, tools) carry no sampled statistics and get an
inconclusive verdict, unless a policy turns on the raw-distribution rules of the first
calibration (top-k rank count, mean raw logprob, improbable tokens), kept for such policies.

No I/O, no clock, no randomness except through the `rng` argument of `should_spot_check`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "DEFAULT_MAX_LOG_EVALUE",
    "DEFAULT_POLICIES",
    "DEFAULT_POLICY",
    "GREEDY_POLICY",
    "HIGH_TEMPERATURE_POLICY",
    "LOW_TEMPERATURE_POLICY",
    "NO_RANK_RULE",
    "PolicySet",
    "SAMPLED_POLICY",
    "ScoredOutput",
    "Verdict",
    "VerifyPolicy",
    "calibrate",
    "final_log_evalue",
    "stopped_log_evalue",
    "judge",
    "log_evalue",
    "policy_to_dict",
    "scored_from_ranked",
    "scored_from_sampled",
    "scored_from_token_scores",
    "should_spot_check",
    "spot_check_window",
    "z_score",
]


NO_RANK_RULE = 10**9  # max_outside that turns the top-k rule off
# Flag when the e-process reaches 10^3: an honest node is flagged with probability <= 1e-3 per check.
DEFAULT_MAX_LOG_EVALUE = math.log(1e3)


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyPolicy:
    # Sampling-distribution rules (need the verifier's SampledToken statistics):
    max_log_evalue: float = DEFAULT_MAX_LOG_EVALUE  # flag when ln(e-value) >= this (inf: rule off)
    bet_fractions: tuple[float, ...] = (1.0,)  # lam grid of the e-process (see `log_evalue`), each in (0, 1]
    max_excluded: int = 0  # tokens the request's sampler could not have produced, allowed per check
    # Replay (seeded sampled requests, darkbloom.inference.replay): a token whose replay gap exceeds
    # replay_slack nats is not the draw the seed's noise forces; more than max_replay_misses of them: flagged.
    replay_slack: float = 0.05
    max_replay_misses: int = 0
    min_z: float = -math.inf  # optional Gaussian rule: flag when z < min_z (-inf: off; see `z_score`)
    # The check's e-value for per-node accumulation (`stopped_log_evalue`): the e-process stopped at
    # its first crossing of each ln level here (inf: not stopped, the last token), averaged.
    accumulate_stops: tuple[float, ...] = (3.0, 5.0)
    min_tokens: int = 1  # fewer scored tokens: inconclusive (the e-value is sound at any length)
    max_scored_tokens: int = 32  # only the first this many output tokens are sent for scoring
    # Raw-distribution rules (legacy, off by default; for verifiers that send only logprob and rank):
    top_k: int = 100  # a token is "inside" when fewer than top_k vocabulary entries beat it
    max_outside: int = NO_RANK_RULE  # tokens allowed outside the top_k per check
    min_mean_logprob: float = -math.inf  # nats per token; below it the output is flagged
    far_logprob: float = -math.inf  # a token below this logprob is "far" (-inf: rule off)
    max_far: int = 0  # far tokens allowed per check


# Measured with bench/calibrate_verify.py on the bundled SmolLM2 (outputs of <= 24 tokens, all
# out of sample: no threshold is fitted; alpha = 1e-3 by Ville; bet fraction 1 caught the most
# of the variants compared: lam 0.5 / {1, .5, .2} / alpha 1e-4, see the bench). Honest answers
# from our engine, scored under their own sampling; cheats under each claimed sampling:
#   honest greedy 120/120 pass, t=0.7 240/240, t=1.0 240/240, t=0.7 top_p .9 top_k 50 60/60
#   (0/660 flagged; largest honest ln E 4.51 against the threshold 6.91)
#   another model (random 20M, re-tokenized): greedy 240/240 caught, t=0.7 239/240,
#   t=1.0 196/240, t=0.7 filtered 240/240; random tokens 120/120 caught in every regime.
# At t=1.0 SmolLM2's own distribution is broad and the cheat's text (often a repetition loop the
# verifier soon predicts) carries little evidence after its first tokens: 39% caught from the
# first token alone, 68% from 4, 82% from 24. The legacy raw rules caught 158/240 there.
# Per node (accumulate.py: e-detector over each check's e-value stopped at ln 3 / ln 5, flag at
# ln 1000, or any single flag; bench/calibrate_verify.py --accumulate, 4000 simulated nodes drawing
# k distinct samples): another model at t=1.0 caught 81.5% (k=1), 99.0% (2), 100% (3..8); single
# flags alone 96.7% at k=2, 99.4% at 3. At t=0.7: 99.5% (1), 100% (2..). Honest nodes: 0 flagged at
# every k; 1000 lifetimes of 200 checks each per regime: 0 flagged, largest ln detector 5.79
# (t=0.7 filtered, 60 samples), 2.50 (t=1.0). A node honest for 100 checks that then cheats at t=1.0
# is caught by accumulation alone in 3 checks 89%, 4: 98% (the plain product: 0% within 8).
# The stop levels (3, 5) were picked on these samples among a few variants (inf, 3, 4, 5, ...):
# their catch rates are in-sample, the honest bound is not (any fixed stop levels give an e-value).
# With replay (the shim seeds every sampled request; bench/calibrate_verify.py --regimes/--claims,
# bench/results/verify_replay.json; 24-token outputs, SmolLM2 honest and verifier, CPU float32):
#   honest t=0.7 240/240 pass, t=1.0 240/240, t=0.7 top_p .9 top_k 50 60/60 (0/540 flagged; one-sided
#   95% Clopper-Pearson upper bound on the honest flag rate 1.2% / 1.2% / 4.9%, pooled 0.55%); the
#   largest honest replay gap over 12,950 tokens was 0.0 nats (the slack is 0.05), so replay adds
#   no false flags here and the e-value's bound (<= 1e-3 per check) stands;
#   another model caught 240/240 at t=0.7, t=1.0 (196/240 without replay) and t=0.7 filtered;
#   random tokens 120/120 in every sampled regime. Greedy is unchanged (no seed; argmax rule).
#   A coupled cheat (--coupled: SmolLM2 with the right seed and noise but the other temperature,
#   t=0.7 served as t=1.0 and the reverse) 238/240 caught each (without replay: 0/240 and 76/240).
#   A second honest run for the 99.9 % target (four runs, --seed 11-14, 400 prompts x t=0.7 and t=1.0
#   each, 24 tokens): 0/3,200 flagged, largest replay gap 0.0 nats, largest ln E 6.27 (threshold
#   6.91). With the first run, 0 of 3,740 honest sampled checks flagged: the one-sided 95 % upper
#   bound on the honest flag rate is 0.08 %, i.e. >= 99.92 % pass. Greedy honest checks: 120/120
#   only (the prompt set has 400 prompts and greedy output does not vary with the seed).
SAMPLED_POLICY = VerifyPolicy()
GREEDY_POLICY = SAMPLED_POLICY  # greedy: the e-value is 1; any non-argmax token is excluded
LOW_TEMPERATURE_POLICY = SAMPLED_POLICY
HIGH_TEMPERATURE_POLICY = SAMPLED_POLICY
DEFAULT_POLICY = SAMPLED_POLICY


@dataclass(frozen=True, slots=True)
class ScoredOutput:
    """The verifier's view of one output: per-token raw logprob and rank (0 = argmax), and,
    when the verifier knew the request's sampling parameters, per token under the sampling
    distribution q: log q(token) (-inf when excluded), H(q), Var[log q], and
    log sum_v q(v)^(1-theta) for each theta in `tilts` (darkbloom.inference.scoring.SampledToken)."""

    logprobs: tuple[float, ...]
    ranks: tuple[int, ...]
    sample_logprobs: tuple[float, ...] = ()  # () when the verifier sent no sampled statistics
    entropies: tuple[float, ...] = ()
    variances: tuple[float, ...] = ()
    log_tilts: tuple[tuple[float, ...], ...] = ()
    tilts: tuple[float, ...] = ()
    excluded: tuple[bool, ...] = ()
    replay_gaps: tuple[float, ...] = ()  # seeded requests: per token, nats the replayed draw beats it by (() when not replayed)

    def __post_init__(self) -> None:
        n = len(self.logprobs)
        if len(self.ranks) != n:
            raise ValueError("logprobs and ranks must have the same length")
        if self.sample_logprobs:
            if not (len(self.sample_logprobs) == len(self.entropies) == len(self.variances) == len(self.log_tilts)
                    == len(self.excluded) == n):
                raise ValueError("sampled statistics must cover every scored token")
            if not self.tilts or any(len(row) != len(self.tilts) for row in self.log_tilts):
                raise ValueError("one log tilt per tilt exponent and token")
            if any(not 0.0 < th <= 1.0 for th in self.tilts):
                raise ValueError("tilt exponents must be in (0, 1]")
        if self.replay_gaps and (len(self.replay_gaps) != n or not self.sample_logprobs):
            raise ValueError("replay gaps must cover every scored token, with the sampled statistics")

    @property
    def has_sampled(self) -> bool:
        return bool(self.sample_logprobs)


@dataclass(frozen=True, slots=True)
class Verdict:
    flagged: bool
    inconclusive: bool
    reason: str  # "" when passed; a short machine-readable reason when flagged
    tokens: int
    outside_top_k: int
    mean_logprob: float
    log_evalue: float = 0.0  # ln of the e-value (0 without sampled statistics)
    z: float = 0.0  # standardized sum of log q (0 without sampled statistics or variance)
    excluded: int = 0  # tokens the sampler could not have produced
    check_log_evalue: float = 0.0  # ln of this check's e-value for accumulation (`stopped_log_evalue`; accumulate.py)
    accumulated_log_evalue: float = 0.0  # set on a flag for accumulated evidence (reason "accumulated_evalue")
    accumulated_checks: int = 0  # checks of this node the accumulated flag rests on
    replay_misses: int = -1  # tokens that are not the replayed draw (-1: no replay, e.g. unseeded or greedy)


def scored_from_ranked(tokens: Iterable[Any]) -> ScoredOutput:
    """From darkbloom.inference.scoring.RankedToken (or anything with .logprob and .rank)."""
    ts = list(tokens)
    return ScoredOutput(tuple(float(t.logprob) for t in ts), tuple(int(t.rank) for t in ts))


def scored_from_sampled(tokens: Iterable[Any], tilts: Sequence[float]) -> ScoredOutput:
    """From darkbloom.inference.scoring.SampledToken computed with tilt exponents `tilts`."""
    ts = list(tokens)
    if not ts:
        return ScoredOutput((), ())
    return ScoredOutput(
        tuple(float(t.logprob) for t in ts), tuple(int(t.rank) for t in ts),
        sample_logprobs=tuple(float(t.sample_logprob) for t in ts), entropies=tuple(float(t.entropy) for t in ts),
        variances=tuple(float(t.variance) for t in ts), log_tilts=tuple(tuple(float(x) for x in t.log_tilts) for t in ts),
        tilts=tuple(float(x) for x in tilts), excluded=tuple(bool(t.excluded) for t in ts),
        replay_gaps=tuple(float(t.replay_gap) for t in ts) if all(getattr(t, "replay_gap", None) is not None for t in ts) else (),
    )


def log_evalue(scored: ScoredOutput, n: int | None = None, fractions: Sequence[float] = (1.0,)) -> float:
    """ln of the spot-check e-process over the first `n` scored tokens, at its highest point.

    For a tilt theta and a bet fraction lam, each token contributes the factor
        f_i = (1 - lam) + lam * q_i(x_i)^(-theta) / sum_v q_i(v)^(1-theta),
    the likelihood ratio of x_i under the alternative (1-lam) q_i + lam q_i^(1-theta)/Z (a
    flatter q, theta = 1 the uniform over what the sampler can produce) against q_i. When each
    x_i is drawn from q_i (an honest node) every factor has conditional expectation 1, so each
    product, and their average M_n over the (theta, lam) grid, is a nonnegative martingale with
    mean 1; by Ville's inequality P(sup_n M_n >= 1/alpha) <= alpha, whatever q_i, the length
    or how the output stopped. So the running maximum of M_n is a sound statistic. A node whose
    tokens are less likely under q than q's own samples (another model, random tokens, a higher
    temperature) drives M up; lam < 1 caps what a too-likely token (a repetition loop) costs.
    Excluded tokens are skipped here (they are judged on their own).
    """
    return _log_evalue(scored, n, fractions)[0]


def final_log_evalue(scored: ScoredOutput, n: int | None = None, fractions: Sequence[float] = (1.0,)) -> float:
    """ln M_n: the e-process of `log_evalue` at the last scored token, not at its highest point.
    M at the (bounded) stopping time has mean <= 1 for an honest node, so it is an e-value and
    e-values of separate checks multiply (accumulate.NodeEvidence); the running maximum is not."""
    return _log_evalue(scored, n, fractions)[1]


def stopped_log_evalue(scored: ScoredOutput, n: int | None = None, fractions: Sequence[float] = (1.0,),
                       stops: Sequence[float] = (math.inf,)) -> float:
    """ln of the mean over c in `stops` of M_tau_c, tau_c = the first token at which ln M >= c
    (the last token when it never does; c = inf: always the last). Each tau_c is a bounded
    stopping time, so by optional stopping E[M_tau_c] <= 1 for an honest node: each is an
    e-value, and so is their mean. Stopping keeps the evidence of an early peak that later
    tokens (a repetition loop the verifier predicts) would give back."""
    return _log_evalue(scored, n, fractions, stops)[2]


def _log_evalue(scored: ScoredOutput, n: int | None, fractions: Sequence[float],
                stops: Sequence[float] = (math.inf,)) -> tuple[float, float, float]:
    """(running maximum, final value, stopped mean): see `log_evalue`, `stopped_log_evalue`."""
    m = len(scored.sample_logprobs) if n is None else min(n, len(scored.sample_logprobs))
    if not scored.has_sampled or m == 0:
        return 0.0, 0.0, 0.0
    stopped: list[float | None] = [None] * len(stops)
    bets = [(j, th, lam) for j, th in enumerate(scored.tilts) for lam in fractions]
    acc = [0.0] * len(bets)
    best = last = 0.0  # M_0 = 1
    for i in range(m):
        if scored.excluded[i]:
            continue
        lq, lt = scored.sample_logprobs[i], scored.log_tilts[i]
        for b, (j, th, lam) in enumerate(bets):
            lr = -th * lq - lt[j]  # ln q^(-theta)/Z
            acc[b] += lr if lam >= 1.0 else math.log1p(-lam) + math.log1p(lam / (1.0 - lam) * math.exp(lr)) if lr < 700 else math.log(lam) + lr
        top = max(acc)
        last = top + math.log(sum(math.exp(a - top) for a in acc) / len(acc))
        best = max(best, last)
        for c, level in enumerate(stops):
            if stopped[c] is None and last >= level:
                stopped[c] = last
    vals = [last if v is None else v for v in stopped] or [last]
    top = max(vals)
    return best, last, top + math.log(sum(math.exp(v - top) for v in vals) / len(vals))


def z_score(scored: ScoredOutput, n: int | None = None) -> float:
    """(sum log q(x_i) + sum H_i) / sqrt(sum Var_i): about N(0, 1) for an honest node over many
    tokens (left tail heavier than Gaussian for few). 0 when there is no variance to speak of."""
    m = len(scored.sample_logprobs) if n is None else min(n, len(scored.sample_logprobs))
    idx = [i for i in range(m) if not scored.excluded[i]]
    var = sum(scored.variances[i] for i in idx)
    if var <= 1e-9:
        return 0.0
    return (sum(scored.sample_logprobs[i] for i in idx) + sum(scored.entropies[i] for i in idx)) / math.sqrt(var)


def scored_from_token_scores(tokens: Iterable[Any], top_k: int) -> ScoredOutput:
    """From Engine.score's TokenScore (.logprob, .in_top_k) computed with the same `top_k`:
    the exact rank is unknown, so inside counts as rank 0 and outside as rank top_k."""
    ts = list(tokens)
    return ScoredOutput(tuple(float(t.logprob) for t in ts), tuple(0 if t.in_top_k else top_k for t in ts))


def spot_check_window(output_token_ids: Sequence[int], policy: VerifyPolicy = DEFAULT_POLICY) -> tuple[int, ...]:
    """The output tokens to send for scoring: the first `max_scored_tokens` (bounded cost)."""
    return tuple(output_token_ids[: policy.max_scored_tokens])


def judge(scored: ScoredOutput, policy: VerifyPolicy = DEFAULT_POLICY) -> Verdict:
    """Pass or flag one scored output. Raw-distribution rules first (when the policy turns them
    on), then the sampling-distribution rules: an excluded token, the e-value, the optional z.
    Without sampled statistics and without raw rules on, the verdict is inconclusive."""
    n = min(len(scored.logprobs), policy.max_scored_tokens)
    lps = scored.logprobs[:n]
    ranks = scored.ranks[:n]
    if any(math.isnan(x) for x in lps) or any(math.isnan(x) for x in scored.sample_logprobs[:n]):
        return Verdict(True, False, "nan_logprob", n, 0, math.nan)
    outside = sum(1 for r in ranks if r >= policy.top_k)
    mean = sum(lps) / n if n else 0.0
    if n < policy.min_tokens:
        return Verdict(False, True, "", n, outside, mean)
    if outside > policy.max_outside:
        return Verdict(True, False, "outside_top_k", n, outside, mean)
    if sum(1 for x in lps if x < policy.far_logprob) > policy.max_far:
        return Verdict(True, False, "improbable_token", n, outside, mean)
    if mean < policy.min_mean_logprob:
        return Verdict(True, False, "low_mean_logprob", n, outside, mean)
    legacy_on = policy.max_outside < NO_RANK_RULE or policy.far_logprob > -math.inf or policy.min_mean_logprob > -math.inf
    if not scored.has_sampled:
        return Verdict(False, not legacy_on, "", n, outside, mean)
    excluded = sum(1 for e in scored.excluded[:n] if e)
    (le, _, fin), z = _log_evalue(scored, n, policy.bet_fractions, policy.accumulate_stops), z_score(scored, n)
    misses = -1
    if scored.replay_gaps:
        misses = sum(1 for i in range(n) if not scored.excluded[i] and not scored.replay_gaps[i] <= policy.replay_slack)
    if excluded > policy.max_excluded:
        return Verdict(True, False, "excluded_token", n, outside, mean, le, z, excluded, fin, replay_misses=misses)
    if misses > policy.max_replay_misses:
        return Verdict(True, False, "replay_mismatch", n, outside, mean, le, z, excluded, fin, replay_misses=misses)
    if le >= policy.max_log_evalue:
        return Verdict(True, False, "high_evalue", n, outside, mean, le, z, excluded, fin, replay_misses=misses)
    if z < policy.min_z:
        return Verdict(True, False, "low_z", n, outside, mean, le, z, excluded, fin, replay_misses=misses)
    return Verdict(False, False, "", n, outside, mean, le, z, excluded, fin, replay_misses=misses)


def should_spot_check(probability: float, rng: random.Random, *, eligible: bool = True) -> bool:
    """Draw whether to spot-check one finished request (ApiConfig.spot_check_probability).

    `eligible` is False for outputs a second node cannot reproduce the distribution of:
    penalties and grammars (JSON mode, tools) change what the first node sampled from in ways
    the teacher-forced pass does not rebuild; temperature, top_p, top_k, min_p and logit_bias
    it does (darkbloom.inference.scoring.SamplingSpec).
    """
    if not eligible or probability <= 0.0:
        return False
    return rng.random() < probability


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicySet:
    """One verdict policy per sampling regime. With the sampled statistics one policy serves
    every temperature (the e-value adapts to the distribution); raw-distribution policies need
    looser rules at higher temperatures."""

    greedy: VerifyPolicy  # temperature 0
    low: VerifyPolicy  # 0 < temperature <= low_max_temperature (calibrated at 0.7)
    high: VerifyPolicy  # above (calibrated at 1.0)
    low_max_temperature: float = 0.8

    def for_temperature(self, temperature: float) -> VerifyPolicy:
        if temperature <= 0.0:
            return self.greedy
        return self.low if temperature <= self.low_max_temperature else self.high


DEFAULT_POLICIES = PolicySet(greedy=GREEDY_POLICY, low=LOW_TEMPERATURE_POLICY, high=HIGH_TEMPERATURE_POLICY)


def _passes(x: ScoredOutput, k: int, max_outside: int, threshold: float, min_tokens: int) -> bool:
    return not judge(x, VerifyPolicy(top_k=k, max_outside=max_outside, min_mean_logprob=threshold, min_tokens=min_tokens)).flagged


def calibrate(
    honest: Sequence[ScoredOutput],
    cheats: Sequence[ScoredOutput],
    *,
    ks: Sequence[int] = (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
    max_outsides: Sequence[int] = tuple(range(0, 11)),
    margin_nats: float = 0.75,
    min_tokens: int = 4,
) -> VerifyPolicy:
    """Choose (top_k, max_outside, min_mean_logprob) from measured outputs.

    The threshold is the lowest honest mean logprob minus `margin_nats` (so every honest
    calibration sample passes it with room to spare). For each (k, max_outside) that lets
    every honest sample pass, count the cheaters caught; keep the best, preferring (on ties)
    the smaller max_outside and then the larger k (more room for honest sampling).
    """
    if not honest:
        raise ValueError("calibration needs honest samples")
    means = [sum(x.logprobs) / len(x.logprobs) for x in honest if len(x.logprobs) >= min_tokens]
    threshold = math.floor((min(means) - margin_nats) * 100) / 100
    best: tuple[tuple[int, int, int], VerifyPolicy] | None = None
    for k in ks:
        for mo in max_outsides:
            if not all(_passes(x, k, mo, threshold, min_tokens) for x in honest):
                continue
            caught = sum(1 for x in cheats if not _passes(x, k, mo, threshold, min_tokens))
            key = (caught, -mo, k)
            if best is None or key > best[0]:
                best = (key, VerifyPolicy(top_k=k, max_outside=mo, min_mean_logprob=threshold, min_tokens=min_tokens))
    if best is None:  # no rank rule lets every honest sample through: rely on the mean alone
        return VerifyPolicy(top_k=max(ks), max_outside=10**9, min_mean_logprob=threshold, min_tokens=min_tokens)
    return best[1]


def policy_to_dict(policy: VerifyPolicy) -> dict[str, Any]:
    return asdict(policy)
