"""Replayable sampling: counter-based Gumbel noise for (seed, step, vocab index), the seeded sampler a node draws with, and the verifier's replay of it.

A categorical draw at temperature T is argmax_v(logprob_v / T + g_v) with g_v independent
standard Gumbel noise (the Gumbel-max trick; mlx's own `mx.random.categorical` works so). When
the noise is a pure function of (seed, step, v), a verifier who knows the seed and scores the
output teacher-forced can rebuild, at every position, the exact noise the node had to use:
an honest node's token is then the argmax of the verifier's perturbed logprobs up to numerical
noise, while a token from another model or another sampler is the argmax only by chance
(roughly with its probability under the right model). `replay_gaps` measures, per token, by
how many nats (logprob units, i.e. T x the perturbed gap) the best competitor beats it.

Why not replay `mx.random.categorical` itself: its noise depends on MLX internals that differ
between array shapes (measured with mlx 0.32.4: a (1, V) row draws from split(key)[0], a batch
from the key itself) and may change between MLX versions or builds; the noise here is defined
by integer arithmetic alone (splitmix64 per (seed, step) in Python, two murmur3 fmix32 rounds
per vocabulary index in uint32 MLX ops), so every platform draws the same bits. Only the
float32 `log` of the Gumbel transform may differ by an ulp between CPU and Metal.

The noise needs no cryptographic strength: the node knows the seed; what matters is that
the verifier can rebuild it and that it is a good uniform source (tests check the draws
follow the sampling distribution). MLX calls must run on the thread that owns the arrays
(the engine thread on a node).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "NOISE_BLOCK",
    "REPLAY_SLACK",
    "ReplayableSampler",
    "gumbel_noise",
    "replay_gaps",
    "step_key",
]

# A token whose replay gap is at most this many nats counts as the sampler's draw. Measured on
# CPU float32 (bench/calibrate_verify.py): honest gaps are <= 1e-3 nats (batched decode against
# one teacher-forced pass); a Metal node's float16/bfloat16 logits may differ by more, hence room.
REPLAY_SLACK = 0.05

_M64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def step_key(seed: int, step: int) -> tuple[int, int]:
    """Two 32-bit words that key the noise of draw number `step` (0 = first output token) under `seed` (pure)."""
    k = _splitmix64(_splitmix64(seed & _M64) ^ (step & _M64))
    return k & 0xFFFFFFFF, k >> 32


def _fmix32(x: Any) -> Any:
    import mlx.core as mx

    x = x ^ (x >> 16)
    x = x * mx.array(0x85EBCA6B, dtype=mx.uint32)
    x = x ^ (x >> 13)
    x = x * mx.array(0xC2B2AE35, dtype=mx.uint32)
    return x ^ (x >> 16)


def _noise(k1: Any, k2: Any, vocab: int) -> Any:
    """Gumbel noise (float32, shape (..., vocab)) from uint32 keys k1, k2 of shape (..., 1)."""
    import mlx.core as mx

    v = mx.arange(vocab, dtype=mx.uint32)
    x = _fmix32(_fmix32(v ^ k1) + k2)
    # 23 bits: u in [2^-24, 1 - 2^-24], exact in float32, so the noise is always finite. (24 bits
    # would round the top value to 1.0: infinite noise, and a filtered-out token (-inf + inf = nan)
    # would win the argmax about once per 340 draws over a 49k vocabulary.)
    u = ((x >> 9).astype(mx.float32) + 0.5) * (1.0 / (1 << 23))
    return -mx.log(-mx.log(u))


def gumbel_noise(seed: int, steps: Sequence[int], vocab: int) -> Any:
    """The noise of draws `steps` under `seed`: float32 array (len(steps), vocab)."""
    import mlx.core as mx

    keys = [step_key(seed, s) for s in steps]
    k1 = mx.array([k for k, _ in keys], dtype=mx.uint32)[:, None]
    k2 = mx.array([k for _, k in keys], dtype=mx.uint32)[:, None]
    return _noise(k1, k2, vocab)


# Noise is made for this many draws at once per sequence (bounded to ~4 MB of float32 per sequence):
# per-row sampler calls then cost a slice instead of ~20 small ops each (bench/sampler_cost.py).
NOISE_BLOCK = 16
_BLOCK_FLOATS = 1 << 20


class ReplayableSampler:
    """An mlx-lm sampler for one sequence: filters as mlx-lm's make_sampler (top_p, min_p, top_k on
    the logprobs), then argmax(logprobs / T + noise(seed, step)), step counting the draws. The
    noise of the next few draws is computed in one block; the draws do not depend on the block size."""

    __slots__ = ("temperature", "top_p", "min_p", "top_k", "seed", "step", "_inv_temp", "_block", "_block_start")

    def __init__(self, *, temperature: float, seed: int, top_p: float = 1.0, min_p: float = 0.0, top_k: int = 0) -> None:
        if temperature <= 0:
            raise ValueError("a replayable sampler draws at a positive temperature")
        self.temperature, self.top_p, self.min_p, self.top_k = temperature, top_p, min_p, top_k
        self.seed, self.step, self._inv_temp = seed, 0, 1.0 / temperature
        self._block: Any = None
        self._block_start = 0

    def __call__(self, logprobs: Any) -> Any:
        import mlx.core as mx
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        vocab = logprobs.shape[-1]
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p > 0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if 0 < self.top_k < vocab:
            logprobs = apply_top_k(logprobs, self.top_k)
        i = self.step - self._block_start
        if self._block is None or i >= self._block.shape[0] or self._block.shape[1] != vocab:
            size = max(1, min(NOISE_BLOCK, _BLOCK_FLOATS // vocab))
            self._block, self._block_start, i = gumbel_noise(self.seed, range(self.step, self.step + size), vocab), self.step, 0
        self.step += 1
        return mx.argmax(logprobs * self._inv_temp + self._block[i], axis=-1)


def replay_gaps(lp: Any, output: Sequence[int], *, temperature: float, seed: int, strict_cut: Any) -> list[float]:
    """Per output token, how many nats the sampler's best competitor beats it after the replayed
    noise: T * max(0, max_{v != x} (lp_v / T + g_v) - (lp_x / T + g_x)); 0 for the sampler's own draw.

    `lp`: the verifier's (n, V) float32 logprobs after logit_bias, before filters; `strict_cut`:
    per row, the logprob above which a token is certainly inside the node's filters too (the
    verifier's cut plus its numerical slack; -inf without filters). Tokens near a filter's edge
    are no competitors, in the honest node's favour. Must run on the model's MLX thread."""
    import mlx.core as mx

    n, vocab = lp.shape
    if n != len(output):
        raise ValueError("one row of logprobs per output token")
    if temperature <= 0:
        raise ValueError("replay needs a positive temperature")
    y = lp * (1.0 / temperature) + gumbel_noise(seed, range(n), vocab)
    target = mx.array(list(output))[:, None]
    mine = mx.take_along_axis(y, target, axis=-1)[:, 0]
    rival = mx.where(lp >= strict_cut[:, None], y, mx.array(-math.inf, dtype=mx.float32))
    rival = mx.put_along_axis(rival, target, mx.array(-math.inf, dtype=mx.float32), axis=-1)
    raw = rival.max(axis=-1) - mine
    gap = mx.where(mx.isnan(raw), math.inf, mx.maximum(raw, 0.0)) * temperature  # nan (broken logits): a miss
    mx.eval(gap)
    return [float(g) for g in gap.tolist()]
