"""Events and status records the engine hands to its callers (plain frozen dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from darkbloom.inference.selfbench import BenchResult
from darkbloom.wire.infer import TokenLogprob

__all__ = ["Admitted", "TextDelta", "ChoiceFinished", "Event", "EngineLoad", "ModelStatus", "TokenScore"]

@dataclass(frozen=True, slots=True)
class Admitted:
    """First event: the request is valid and queued or running."""

    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New output for choice `index`; `tokens` generated tokens since the previous delta."""

    index: int
    text: str
    tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[dict[str, Any], ...] = ()  # complete OpenAI tool calls (id, type, function)


@dataclass(frozen=True, slots=True)
class ChoiceFinished:
    index: int
    finish_reason: str  # stop | length | tool_calls
    completion_tokens: int
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EngineLoad:
    active: int  # requests generating
    queued: int  # admitted requests waiting for a slot
    max_concurrent: int  # sequences the batch holds


@dataclass(frozen=True, slots=True)
class ModelStatus:
    id: str
    context_length: int
    vocab_size: int
    supports_tools: bool  # the chat template renders tools itself
    bench: BenchResult | None


@dataclass(frozen=True, slots=True)
class TokenScore:
    token_id: int
    logprob: float
    in_top_k: bool


Event = Admitted | TextDelta | ChoiceFinished
