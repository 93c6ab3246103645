"""Constrained decoding through llguidance: JSON mode, JSON schemas and forced tool calls.

Grammars are built and checked here (pure; llguidance only). `GrammarProcessor` is an mlx-lm
logits processor that masks every token the grammar forbids; it runs on the engine thread,
one matcher per sequence. llguidance's own MLX helper uses a Metal kernel, so the mask is
applied with `mx.where` instead, which works on every MLX backend.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import llguidance
from llguidance import LLMatcher

from darkbloom.inference.params import GenerationRequest, ToolSpec

__all__ = [
    "schema_error",
    "json_grammar",
    "tool_grammar",
    "request_grammar",
    "make_llg_tokenizer",
    "GrammarProcessor",
]

# Compact JSON with the usual separators: small models otherwise wander into endless whitespace.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def schema_error(schema: dict[str, Any]) -> str:
    """Empty if llguidance can compile `schema`, else its complaint."""
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        return str(exc)
    return LLMatcher.validate_grammar(grammar)


def json_grammar(schema: dict[str, Any] | None) -> str:
    """Grammar for one JSON value: any object when `schema` is None."""
    return LLMatcher.grammar_from_json_schema(schema or {"type": "object"}, overrides=_JSON_OPTIONS)  # type: ignore[arg-type]


def _call_schema(tool: ToolSpec) -> dict[str, Any]:
    params = tool.parameters or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_grammar(
    tools: Sequence[ToolSpec],
    *,
    only: str | None,
    parallel: bool,
    start: str,
    end: str,
    start_token: int | None = None,
    end_token: int | None = None,
) -> str:
    """Lark grammar forcing Hermes-style calls: `start {"name", "arguments"} end`, one or more."""
    chosen = [t for t in tools if only is None or t.name == only]
    schemas = [_call_schema(t) for t in chosen]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    open_ = f"<[{start_token}]>" if start_token is not None else json.dumps(start)
    close = f"<[{end_token}]>" if end_token is not None else json.dumps(end)
    schema = {**schema, "x-guidance": _JSON_OPTIONS}
    body = json.dumps(schema, ensure_ascii=False)
    more = ' ("\\n" call)*' if parallel else ""
    lark = (
        f"start: call{more}\n"
        f'call: {open_} "\\n" obj "\\n" {close}\n'
        f"obj: %json {body}\n"
    )
    grammar = LLMatcher.grammar_from_lark(lark)
    return grammar


def request_grammar(req: GenerationRequest, tool_start: str, tool_end: str, *, start_token: int | None = None, end_token: int | None = None) -> str | None:
    """The grammar a request must follow, or None when decoding is free."""
    if req.forces_tool:
        return tool_grammar(
            req.tools,
            only=req.tool_name,
            parallel=req.parallel_tool_calls,
            start=tool_start,
            end=tool_end,
            start_token=start_token,
            end_token=end_token,
        )
    if req.response_format.type == "json_object":
        return json_grammar(None)
    if req.response_format.type == "json_schema":
        return json_grammar(req.response_format.schema)
    return None


def make_llg_tokenizer(hf_tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """An llguidance tokenizer over a transformers fast tokenizer (about 1 s; cache it)."""
    from llguidance.hf import from_tokenizer

    return from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=list(eos_ids))


class GrammarProcessor:
    """mlx-lm logits processor: advance the matcher by the last token, mask the logits.

    mlx-lm calls processors with the whole context (prompt + generated so far, the last token
    being the one just fed to the model); the first call sees only the prompt.
    """

    def __init__(self, matcher: LLMatcher, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)
        self._started = False
        self.consumed = 0

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx
        import numpy as np

        if self._started:
            self.matcher.consume_token(int(tokens[-1].item()))
            self.consumed += 1
        self._started = True
        if self.matcher.is_error():
            allowed = np.zeros(self.vocab_size, dtype=bool)
            allowed[self.eos_ids] = True
        else:
            bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
            allowed = np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)
            if allowed.shape[0] < self.vocab_size:
                allowed = np.concatenate([allowed, np.zeros(self.vocab_size - allowed.shape[0], dtype=bool)])
        return mx.where(mx.array(allowed)[None, :], logits, mx.array(-mx.inf, dtype=logits.dtype))

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but EOS may follow."""
        return self.matcher.is_stopped()
