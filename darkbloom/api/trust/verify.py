"""Spot-check verdicts, pure: teacher-forced scores of a node's output -> pass or flag, and the calibration that picks the thresholds.

A spot check: the shim sends a finished request's prompt and output token ids to a second
node serving the same weights digest; that node scores them in one forward pass
(darkbloom.inference.scoring / Engine.score) and returns each output token's logprob and
rank. The first node is flagged when

  * more than `max_outside` of the scored tokens fall outside the verifier's top-`top_k`, or
  * the mean logprob of the scored tokens is below `min_mean_logprob`, or
  * more than `max_far` tokens have a logprob below `far_logprob` (tokens an honest sampler at
    that temperature practically never picks; a greedy token, the argmax over a vocabulary of
    V entries, can never be below -ln V).

Honest sampling (temperature 0.7-1.0) picks tokens outside a small top-k now and then, so
`top_k` and `max_outside` are calibrated, not guessed: `calibrate` chooses them on measured
honest and cheating outputs (bench/calibrate_verify.py) so that every honest calibration
sample passes with a margin, and the most cheaters are caught. Outputs shorter than
`min_tokens` are inconclusive (never flagged): too little evidence either way.

No I/O, no clock, no randomness except through the `rng` argument of `should_spot_check`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "DEFAULT_POLICIES",
    "DEFAULT_POLICY",
    "GREEDY_POLICY",
    "HIGH_TEMPERATURE_POLICY",
    "LOW_TEMPERATURE_POLICY",
    "NO_RANK_RULE",
    "PolicySet",
    "ScoredOutput",
    "Verdict",
    "VerifyPolicy",
    "calibrate",
    "judge",
    "policy_to_dict",
    "scored_from_ranked",
    "scored_from_token_scores",
    "should_spot_check",
    "spot_check_window",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyPolicy:
    top_k: int  # a token is "inside" when fewer than top_k vocabulary entries beat it
    max_outside: int  # tokens allowed outside the top_k per check
    min_mean_logprob: float  # nats per token; below it the output is flagged
    min_tokens: int = 4  # fewer scored tokens: inconclusive
    max_scored_tokens: int = 32  # only the first this many output tokens are sent for scoring
    far_logprob: float = -math.inf  # a token below this logprob is "far" (-inf: rule off)
    max_far: int = 0  # far tokens allowed per check


# Calibrated on the bundled SmolLM2-135M with bench/calibrate_verify.py (figures in the report):
# run 1, 240 prompts: per tier 240 honest answers of <= 20 tokens from the real engine, 240
# answers of another model (the project's random 20M model, text re-tokenized), 240 random-token
# answers; mean and rank thresholds chosen on half the prompts (`calibrate`), the improbable-
# token rule from the measured honest token tail. Run 2, 400 other prompts: 400 honest t=0.7
# answers of 32 tokens judged out of sample: 1 flagged by max_outside=2 (4 tokens ranked
# 104-375), so max_outside became 4 (0/640 honest flagged since; chosen after seeing run 2).
# k = 100 because a verifying node reports in/out of its top 100 (node.serve.SCORE_TOP_K).
#   greedy  honest 240/240 pass; other model 240/240 caught; random tokens 240/240 caught
#   t=0.7   honest 640/640 pass; other model 215/240 caught (exact ranks, k=1000 and
#           max_outside=0, would catch 236/240 with 640/640 honest passing); random 240/240
#   t=1.0   honest 240/240 pass; other model 159/240 caught; random tokens 240/240 caught
NO_RANK_RULE = 10**9  # max_outside that turns the top-k rule off
GREEDY_POLICY = VerifyPolicy(top_k=100, max_outside=0, min_mean_logprob=-2.04, far_logprob=-11.0, max_far=0)
LOW_TEMPERATURE_POLICY = VerifyPolicy(top_k=100, max_outside=4, min_mean_logprob=-3.47, far_logprob=-10.0, max_far=1)
HIGH_TEMPERATURE_POLICY = VerifyPolicy(top_k=100, max_outside=NO_RANK_RULE, min_mean_logprob=-8.07)
# When the request's temperature is unknown: the policy every honest tier passes.
DEFAULT_POLICY = HIGH_TEMPERATURE_POLICY


@dataclass(frozen=True, slots=True)
class ScoredOutput:
    """The verifier's view of one output: per-token logprob and rank (0 = argmax)."""

    logprobs: tuple[float, ...]
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.ranks):
            raise ValueError("logprobs and ranks must have the same length")


@dataclass(frozen=True, slots=True)
class Verdict:
    flagged: bool
    inconclusive: bool
    reason: str  # "" when passed; a short machine-readable reason when flagged
    tokens: int
    outside_top_k: int
    mean_logprob: float


def scored_from_ranked(tokens: Iterable[Any]) -> ScoredOutput:
    """From darkbloom.inference.scoring.RankedToken (or anything with .logprob and .rank)."""
    ts = list(tokens)
    return ScoredOutput(tuple(float(t.logprob) for t in ts), tuple(int(t.rank) for t in ts))


def scored_from_token_scores(tokens: Iterable[Any], top_k: int) -> ScoredOutput:
    """From Engine.score's TokenScore (.logprob, .in_top_k) computed with the same `top_k`:
    the exact rank is unknown, so inside counts as rank 0 and outside as rank top_k."""
    ts = list(tokens)
    return ScoredOutput(tuple(float(t.logprob) for t in ts), tuple(0 if t.in_top_k else top_k for t in ts))


def spot_check_window(output_token_ids: Sequence[int], policy: VerifyPolicy = DEFAULT_POLICY) -> tuple[int, ...]:
    """The output tokens to send for scoring: the first `max_scored_tokens` (bounded cost)."""
    return tuple(output_token_ids[: policy.max_scored_tokens])


def judge(scored: ScoredOutput, policy: VerifyPolicy = DEFAULT_POLICY) -> Verdict:
    n = min(len(scored.logprobs), policy.max_scored_tokens)
    lps = scored.logprobs[:n]
    ranks = scored.ranks[:n]
    if any(math.isnan(x) for x in lps):
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
    return Verdict(False, False, "", n, outside, mean)


def should_spot_check(probability: float, rng: random.Random, *, eligible: bool = True) -> bool:
    """Draw whether to spot-check one finished request (ApiConfig.spot_check_probability).

    `eligible` is False for outputs a second node cannot reproduce the distribution of:
    requests with logit_bias, penalties, a grammar (JSON mode, tools) or a non-default top_p /
    top_k / min_p change what the first node sampled from; the teacher-forced score uses the
    raw distribution. (Greedy and plain-temperature requests are the checkable ones.)
    """
    if not eligible or probability <= 0.0:
        return False
    return rng.random() < probability


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicySet:
    """One verdict policy per sampling regime: honest sampling at a higher temperature strays
    further from the verifier's top-k, so it needs looser rules (and catches less)."""

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
