"""Admission and scheduling decisions for the engine: pure functions over counts, no MLX.

A request holds `n` sequences (one per choice). The batch holds at most `max_concurrent`
sequences; requests wait FIFO in a queue of at most `max_queue`; beyond that, `NoCapacity`.
"""

from __future__ import annotations

from collections.abc import Sequence

from darkbloom.errors import InvalidRequest, NoCapacity

__all__ = ["check_admission", "startable", "clamp_max_tokens", "prompt_cache_budget_bytes", "MEMORY_SHARE_FOR_PROMPT_CACHE"]

# With node.max_memory_mb set, the prompt cache may take at most this share of it; the rest is
# for the weights, the running batch's own KV caches and activations.
MEMORY_SHARE_FOR_PROMPT_CACHE = 0.25


def check_admission(in_flight: int, n: int, *, max_concurrent: int, max_queue: int) -> None:
    """Raise unless a request with `n` choices may join `in_flight` admitted requests."""
    if n > max_concurrent:
        raise InvalidRequest(
            f"n={n} is more than this node's {max_concurrent} concurrent sequences; lower n", param="n"
        )
    if in_flight >= max_concurrent + max_queue:
        raise NoCapacity(f"{in_flight} requests in flight and the queue ({max_queue}) is full")


def startable(waiting_n: Sequence[int], running_seqs: int, max_concurrent: int) -> int:
    """How many requests at the head of the FIFO queue can start now.

    `waiting_n[i]` is the number of sequences of the i-th waiting request. Strict FIFO: a large
    request at the head is not overtaken (no starvation), so the answer is a prefix length.
    """
    free = max_concurrent - running_seqs
    count = 0
    for n in waiting_n:
        if n > free:
            break
        free -= n
        count += 1
    return count


def clamp_max_tokens(prompt_tokens: int, requested: int | None, *, default: int, context_length: int) -> int | None:
    """max_tokens to generate, or None when the prompt plus the request does not fit.

    An explicit `requested` must fit entirely; the default is shortened to what fits.
    """
    room = context_length - prompt_tokens
    if requested is not None:
        return requested if requested <= room else None
    if room < 1:
        return None
    return min(default, room)


def prompt_cache_budget_bytes(prompt_cache_mb: int, max_memory_mb: int = 0) -> int:
    """Bytes the prompt cache (per model) may hold: `inference.prompt_cache_mb`, capped by a share
    of `node.max_memory_mb` when that is set (0 = no node limit), so the node does not pause
    itself for memory its own cache took. 0 disables the prompt cache."""
    budget = max(0, prompt_cache_mb)
    if max_memory_mb > 0:
        budget = min(budget, int(max_memory_mb * MEMORY_SHARE_FOR_PROMPT_CACHE))
    return budget << 20
