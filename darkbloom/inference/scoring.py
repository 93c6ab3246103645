"""Teacher-forced scoring: the logprob and rank of given output tokens under a loaded model, in one forward pass.

Used for spot checks (a second node scores the first node's output tokens) and for the
calibration bench. `Engine.score` (engine.py) already offers the in-top-k flag through the
engine thread; this module adds the exact rank and a batched form.

THREADING: MLX streams are per thread. Call these functions on the thread that loaded the
model: on a node that is the engine thread (e.g. through `Engine._call` / a worker command),
in a script the thread that called `mlx_lm.load`. Calling from another thread may fail or
use a stream the model's arrays do not live on.

Numerics: `RankedToken` logprobs are of the raw model distribution (log-softmax of the logits,
no temperature, no penalties, no grammar), computed in float32. `SampledToken` (score_sampled,
sampled_stats) places each token in the distribution the node actually sampled from (the
request's temperature, top_p, top_k, min_p, logit_bias; see `SamplingSpec`) and adds that
distribution's entropy, variance of log q and Renyi tilts, the inputs of the spot-check
e-value (darkbloom.api.trust.verify); for a seeded request also the replay gap of each token
(darkbloom.inference.replay: how far the token is from the draw the seed's noise forces).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from darkbloom.errors import ContextLengthExceeded, InvalidRequest

__all__ = [
    "LOGPROB_SLACK",
    "RankedToken",
    "SampledToken",
    "SamplingSpec",
    "TILTS",
    "TOP_P_SLACK",
    "output_logits",
    "sampled_stats",
    "score_batch",
    "score_sampled",
    "score_tokens",
]


@dataclass(frozen=True, slots=True)
class RankedToken:
    token_id: int
    logprob: float  # natural log of the model's probability of this token at its position
    rank: int  # 0: the model's argmax; number of vocabulary entries with a strictly higher logprob


def _check(prompt: Sequence[int], output: Sequence[int], vocab_size: int, context_length: int | None) -> None:
    if not prompt or not output:
        raise InvalidRequest("scoring needs at least one prompt and one output token", param="prompt")
    if context_length is not None and len(prompt) + len(output) > context_length:
        raise ContextLengthExceeded(len(prompt), len(output), context_length)
    for t in (*prompt, *output):
        if t < 0 or t >= vocab_size:
            raise InvalidRequest(f"token id {t} is outside the vocabulary (size {vocab_size})", param="prompt")


def score_batch(
    model: Any,
    items: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    vocab_size: int,
    context_length: int | None = None,
    pad_id: int = 0,
) -> list[list[RankedToken]]:
    """Score several (prompt ids, output ids) pairs in one forward pass.

    Sequences are right-padded with `pad_id`: under a causal mask padding after a position
    cannot change that position's logits, so each item's scores equal its unbatched scores
    (up to float rounding of batched matmuls). Must run on the model's MLX thread.
    """
    import mlx.core as mx

    if not items:
        return []
    for prompt, output in items:
        _check(prompt, output, vocab_size, context_length)
    seqs = [list(p) + list(o) for p, o in items]
    width = max(len(s) for s in seqs) - 1  # the last token is never an input
    inputs = mx.array([s[:-1] + [pad_id] * (width - (len(s) - 1)) for s in seqs])
    logits = model(inputs).astype(mx.float32)  # (B, width, V)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    # Target at input position i is token i+1; padded positions get target pad_id (ignored).
    targets = mx.array([s[1:] + [pad_id] * (width - (len(s) - 1)) for s in seqs])
    chosen = mx.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]  # (B, width)
    rank = (logprobs > chosen[..., None]).sum(axis=-1)
    mx.eval(chosen, rank)
    chosen_l, rank_l = chosen.tolist(), rank.tolist()
    out: list[list[RankedToken]] = []
    for b, (prompt, output) in enumerate(items):
        start = len(prompt) - 1  # the position whose next token is output[0]
        out.append(
            [
                RankedToken(token_id=int(t), logprob=float(chosen_l[b][start + j]), rank=int(rank_l[b][start + j]))
                for j, t in enumerate(output)
            ]
        )
    return out


def score_tokens(
    model: Any,
    prompt: Sequence[int],
    output: Sequence[int],
    *,
    vocab_size: int,
    context_length: int | None = None,
) -> list[RankedToken]:
    """Logprob and rank of each output token given the prompt and the outputs before it.

    One forward pass over prompt + output[:-1]. Must run on the model's MLX thread.
    """
    return score_batch(model, [(prompt, output)], vocab_size=vocab_size, context_length=context_length)[0]


# --- scores under the request's sampling distribution (spot checks) ------------------------

# Tilt exponents theta of the spot-check e-value (darkbloom.api.trust.verify): per position the
# verifier reports log sum_v q(v)^(1 - theta) for each, q being the sampling distribution
# (theta = 1: log of the number of tokens the sampler can produce, the uniform alternative).
TILTS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0)
# Numerical slack between the serving node's batched decode and the verifier's single forward
# pass (both float32): a token within this many nats of a filter's cut (or of the argmax, for
# greedy) counts as allowed, and top_p is widened by TOP_P_SLACK of probability mass.
LOGPROB_SLACK = 0.01
TOP_P_SLACK = 1e-3


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingSpec:
    """The distribution a node samples each token from, as mlx-lm does it (worker.py): logit_bias
    added to the logits, log-softmax, then top_p, min_p and top_k filters on the untempered
    logprobs, then a categorical draw at `temperature` (0: argmax)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    logit_bias: tuple[tuple[int, float], ...] = ()
    # The request's seed (None: unseeded). With a seed and temperature > 0 the node drew with
    # replayable noise (darkbloom.inference.replay) and the verifier replays the draws.
    seed: int | None = None

    @classmethod
    def from_sampling(cls, s: Any) -> "SamplingSpec | None":
        """From darkbloom.inference.params.Sampling; None when the distribution depends on more
        than the logits (repetition/presence/frequency penalties): not reproducible here."""
        if s.presence_penalty or s.frequency_penalty or s.repetition_penalty:
            return None
        return cls(temperature=float(s.temperature), top_p=float(s.top_p), top_k=int(s.top_k), min_p=float(s.min_p),
                   logit_bias=tuple((int(t), float(b)) for t, b in s.logit_bias),
                   seed=None if s.seed is None else int(s.seed) % (1 << 63))  # as worker._sampler for choice 0

    def describe(self) -> str:
        """Canonical text, signed with the scores (what distribution they are under)."""
        bias = ";".join(f"{t}:{b:g}" for t, b in sorted(self.logit_bias))
        text = f"temperature={self.temperature:g},top_p={self.top_p:g},top_k={self.top_k},min_p={self.min_p:g},logit_bias={bias}"
        return text if self.seed is None else f"{text},seed={self.seed}"


@dataclass(frozen=True, slots=True)
class SampledToken:
    token_id: int
    logprob: float  # raw model logprob (as RankedToken)
    rank: int  # as RankedToken (after logit_bias)
    sample_logprob: float  # log q(token) under the sampling distribution q; -inf when excluded
    entropy: float  # H(q) in nats
    variance: float  # Var[log q(X)] for X ~ q, nats^2
    log_tilts: tuple[float, ...]  # log sum_v q(v)^(1 - theta), one per TILTS entry
    excluded: bool  # the sampler could not have produced this token (outside top_k / top_p / min_p, or not the argmax)
    replay_gap: float | None = None  # seeded requests: nats by which the replayed draw beats this token (replay.replay_gaps)


def output_logits(model: Any, items: Sequence[tuple[Sequence[int], Sequence[int]]], *, vocab_size: int,
                  context_length: int | None = None, pad_id: int = 0) -> list[Any]:
    """One batched forward pass; per item the float32 logits (len(output), V) that predicted each output token."""
    import mlx.core as mx

    for prompt, output in items:
        _check(prompt, output, vocab_size, context_length)
    if not items:
        return []
    seqs = [list(p) + list(o) for p, o in items]
    width = max(len(s) for s in seqs) - 1
    inputs = mx.array([s[:-1] + [pad_id] * (width - (len(s) - 1)) for s in seqs])
    logits = model(inputs).astype(mx.float32)
    out = []
    for b, (prompt, output) in enumerate(items):
        start = len(prompt) - 1
        out.append(logits[b, start : start + len(output), :])
    return out


def sampled_stats(logits: Any, output: Sequence[int], spec: SamplingSpec, *, tilts: Sequence[float] = TILTS) -> list[SampledToken]:
    """Per output token: where it stands under `spec`'s sampling distribution built from `logits`
    (shape (len(output), V), float32). Must run on the model's MLX thread."""
    import mlx.core as mx

    n, vocab = logits.shape
    if n != len(output):
        raise ValueError("one row of logits per output token")
    if spec.logit_bias:
        idx = mx.array([t for t, _ in spec.logit_bias if 0 <= t < vocab])
        val = mx.array([b for t, b in spec.logit_bias if 0 <= t < vocab], dtype=mx.float32)
        if idx.size:
            logits = logits.at[:, idx].add(val)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    target = mx.array(list(output))[:, None]
    chosen = mx.take_along_axis(lp, target, axis=-1)[:, 0]
    rank = (lp > chosen[:, None]).sum(axis=-1)
    top = lp.max(axis=-1)
    ninf = mx.array(-math.inf, dtype=mx.float32)
    if spec.temperature <= 0:
        excluded = chosen < top - LOGPROB_SLACK
        mx.eval(chosen, rank, excluded)
        zeros = tuple(0.0 for _ in tilts)
        return [
            SampledToken(int(t), float(c), int(r), -math.inf if e else 0.0, 0.0, 0.0, zeros, bool(e))
            for t, c, r, e in zip(output, chosen.tolist(), rank.tolist(), excluded.tolist())
        ]
    cut = mx.full((n,), -math.inf, dtype=mx.float32)  # the sampler keeps lp >= cut
    slack_cut = cut  # the same, widened by the numerical slack
    if 0 < spec.top_p < 1.0:
        cut = mx.maximum(cut, _top_p_cut(lp, spec.top_p))
        slack_cut = mx.maximum(slack_cut, _top_p_cut(lp, min(1.0, spec.top_p + TOP_P_SLACK)) - LOGPROB_SLACK)
    if spec.min_p > 0:
        m = top + math.log(spec.min_p)
        cut, slack_cut = mx.maximum(cut, m), mx.maximum(slack_cut, m - LOGPROB_SLACK)
    if 0 < spec.top_k < vocab:
        kth = mx.sort(lp, axis=-1)[:, vocab - spec.top_k]  # the k-th largest
        cut, slack_cut = mx.maximum(cut, kth), mx.maximum(slack_cut, kth - LOGPROB_SLACK)
    keep = lp >= cut[:, None]
    gaps: list[float | None] = [None] * n
    if spec.seed is not None:
        from darkbloom.inference.replay import replay_gaps

        # Competitors in the replay: tokens inside the filters beyond the numerical slack.
        strict = cut if spec.top_p >= 1.0 or spec.top_p <= 0 else mx.maximum(cut, _top_p_cut(lp, max(0.0, spec.top_p - TOP_P_SLACK)))
        gaps = list(replay_gaps(lp, output, temperature=spec.temperature, seed=spec.seed, strict_cut=strict + LOGPROB_SLACK))
    z = mx.where(keep, lp / spec.temperature, ninf)
    log_norm = mx.logsumexp(z, axis=-1)
    logq = z - log_norm[:, None]
    q = mx.exp(logq)  # 0 outside the kept set
    safe = mx.where(keep, logq, 0.0)
    entropy = -(q * safe).sum(axis=-1)
    variance = (q * mx.square(safe + entropy[:, None])).sum(axis=-1)
    log_tilts = mx.stack([mx.logsumexp(mx.where(keep, (1.0 - th) * logq, ninf), axis=-1) for th in tilts], axis=-1)
    excluded = chosen < slack_cut
    # Inside the slack but outside the exact cut: scored as if kept (in the honest node's favour).
    sample_lp = mx.where(excluded, ninf, chosen / spec.temperature - log_norm)
    mx.eval(chosen, rank, sample_lp, entropy, variance, log_tilts, excluded)
    return [
        SampledToken(int(t), float(c), int(r), float(s), max(0.0, float(h)), max(0.0, float(v)), tuple(float(x) for x in lt), bool(e), g)
        for t, c, r, s, h, v, lt, e, g in zip(output, chosen.tolist(), rank.tolist(), sample_lp.tolist(), entropy.tolist(),
                                              variance.tolist(), log_tilts.tolist(), excluded.tolist(), gaps)
    ]


def _top_p_cut(lp: Any, top_p: float) -> Any:
    """The smallest logprob mlx-lm's apply_top_p keeps, per row (same arithmetic)."""
    import mlx.core as mx

    s = mx.sort(lp, axis=-1)
    probs = mx.exp(s)
    mass_above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
    total = mass_above[:, :1] + probs[:, :1]
    dropped = (mass_above >= top_p * total).sum(axis=-1, keepdims=True)
    return mx.take_along_axis(s, dropped, axis=-1)[:, 0]


def score_sampled(model: Any, prompt: Sequence[int], output: Sequence[int], spec: SamplingSpec, *, vocab_size: int,
                  context_length: int | None = None) -> list[SampledToken]:
    """Teacher-forced scores of `output` under the sampling distribution `spec`, one forward pass.
    Must run on the model's MLX thread."""
    (logits,) = output_logits(model, [(prompt, output)], vocab_size=vocab_size, context_length=context_length)
    return sampled_stats(logits, output, spec)
