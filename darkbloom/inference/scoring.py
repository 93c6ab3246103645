"""Teacher-forced scoring: the logprob and rank of given output tokens under a loaded model, in one forward pass.

Used for spot checks (a second node scores the first node's output tokens) and for the
calibration bench. `Engine.score` (engine.py) already offers the in-top-k flag through the
engine thread; this module adds the exact rank and a batched form.

THREADING: MLX streams are per thread. Call these functions on the thread that loaded the
model: on a node that is the engine thread (e.g. through `Engine._call` / a worker command),
in a script the thread that called `mlx_lm.load`. Calling from another thread may fail or
use a stream the model's arrays do not live on.

Numerics: logprobs are of the raw model distribution (log-softmax of the logits, no
temperature, no penalties, no grammar), computed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from darkbloom.errors import ContextLengthExceeded, InvalidRequest

__all__ = ["RankedToken", "score_tokens", "score_batch"]


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
