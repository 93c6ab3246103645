"""Self-benchmark at start: prefill and single-stream decode tokens/s of a loaded model.

Runs on the engine thread (it owns MLX) in a few seconds, with random token ids so no prompt
text is involved. The numbers go into the node's capability record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

__all__ = ["BenchResult", "measure"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchResult:
    prefill_tps: float  # prompt tokens per second, one sequence
    decode_tps: float  # generated tokens per second, one sequence
    prompt_tokens: int
    decode_tokens: int


def measure(model: Any, vocab_size: int, *, prompt_tokens: int = 128, decode_tokens: int = 24, seed: int = 0) -> BenchResult:
    """Time one prefill of `prompt_tokens` and `decode_tokens` greedy steps (after a warm-up)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    rng = mx.random.key(seed)
    ids = mx.random.randint(0, vocab_size, (1, prompt_tokens), key=rng)

    # Warm-up: compile paths and touch the weights once.
    cache = make_prompt_cache(model)
    mx.eval(model(ids[:, :8], cache=cache))

    cache = make_prompt_cache(model)
    t0 = time.perf_counter()
    logits = model(ids, cache=cache)
    y = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(y)
    prefill_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        logits = model(y[:, None], cache=cache)
        y = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(y)
    decode_s = time.perf_counter() - t0
    return BenchResult(
        prefill_tps=prompt_tokens / max(prefill_s, 1e-9),
        decode_tps=decode_tokens / max(decode_s, 1e-9),
        prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
    )
