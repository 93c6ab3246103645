"""Which requests the shim seeds, pure: every sampled chat/completion request gets a seed, so a spot check can replay its draws.

A node draws a seeded request's tokens with noise that is a function of (seed, step, vocabulary
index) (darkbloom.inference.replay), which a verifier rebuilds: the honest token at every
position is then the argmax of the verifier's perturbed logprobs. The shim gives every request
sampled at temperature > 0 that has no seed a random 63-bit one, drawn fresh per request: for
the developer the answer is distributed exactly as an unseeded one, and the node cannot tell
which requests will be checked (all carry seeds). A developer's own seed is kept (and replayed).
Greedy requests need no seed: their check is the argmax itself.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

__all__ = ["replay_seeded"]


def replay_seeded(params: dict[str, Any], kind: str, draw: Callable[[], int] = lambda: secrets.randbits(63)) -> dict[str, Any]:
    """`params` (an OpenAI body as forwarded to the node) with a seed added when the request is
    sampled and has none; the same dict when nothing changes."""
    if kind not in ("chat", "completion") or params.get("seed") is not None:
        return params
    temperature = params.get("temperature")
    if temperature is None:
        temperature = 1.0  # the OpenAI default, as darkbloom.inference.params parses it
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature <= 0:
        return params  # greedy, or invalid (the node refuses it with a clear error)
    return {**params, "seed": draw()}
