"""OpenAI response objects from infer frames, pure: chunks for SSE and whole responses.

`Completion` consumes a request's frames (`Delta`, `ChoiceEnd`) in order and returns the
`chat.completion.chunk` / `text_completion` chunks to send, exactly as OpenAI shapes them
(role first, tool call deltas, finish_reason, a usage chunk when asked), or accumulates them
into one `chat.completion` / `text_completion`. Usage counts only what was passed on.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

from darkbloom.wire.infer import ChoiceEnd, Delta, TokenLogprob

__all__ = ["Completion", "embedding_response", "fingerprint", "model_object"]


def fingerprint(node_id: str, digest: str) -> str:
    """`system_fingerprint`: the serving node's short id and the weights digest."""
    short = digest.rsplit(":", 1)[-1][:16]  # "sha256:<hex>" -> the first 16 hex digits
    return f"fp_{node_id[-8:]}_{short}" if short else f"fp_{node_id[-8:]}"


def _top(top: tuple[tuple[str, float], ...]) -> list[dict[str, Any]]:
    return [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]


def _chat_logprob(lp: TokenLogprob) -> dict[str, Any]:
    raw = lp.bytes_ or lp.token.encode()
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(raw), "top_logprobs": _top(lp.top)}


@dataclass(slots=True)
class _Choice:
    text: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tokens: int = 0  # completion tokens passed on
    finish_reason: str | None = None
    started: bool = False  # role chunk sent
    token_ids: tuple[int, ...] = ()  # output token ids from ChoiceEnd (for spot checks; never sent)
    attestation: bytes = b""  # the node's signed OutputAttestation from ChoiceEnd (spot-check evidence; never sent)


@dataclass(slots=True)
class Completion:
    """One chat or text completion being assembled. Feed frames; read chunks or `response()`."""

    kind: Literal["chat", "completion"]
    id: str  # chatcmpl-... / cmpl-...
    model: str
    created: int  # unix seconds
    n: int = 1
    include_usage: bool = False
    want_logprobs: bool = False
    fingerprint: str | None = None
    prompt_tokens: int = 0
    choices: list[_Choice] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.choices = [_Choice() for _ in range(self.n)]

    # --- counts -------------------------------------------------------------------------

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    # --- frames in, chunks out ------------------------------------------------------------

    def _choice(self, index: int) -> _Choice:
        if not 0 <= index < self.n:
            raise ValueError(f"choice index {index} out of range for n={self.n}")
        return self.choices[index]

    def on_delta(self, d: Delta) -> list[dict[str, Any]]:
        c = self._choice(d.index)
        chunks: list[dict[str, Any]] = []
        if self.kind == "chat" and not c.started:
            chunks.append(self._chunk(d.index, {"role": "assistant", "content": ""}))
        c.started = True
        c.tokens += d.tokens
        if d.text:
            c.text.append(d.text)
        if self.want_logprobs:
            c.logprobs.extend(d.logprobs)
        for i, tc in enumerate(d.tool_calls):
            self._merge_tool_call(c, tc, i)
        if not d.text and not d.tool_calls and not (self.want_logprobs and d.logprobs):
            return chunks
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if d.text:
                delta["content"] = d.text
            if d.tool_calls:
                delta["tool_calls"] = [dict(tc, index=tc.get("index", i)) for i, tc in enumerate(d.tool_calls)]
            lp = {"content": [_chat_logprob(x) for x in d.logprobs], "refusal": None} if self.want_logprobs and d.logprobs else None
            chunks.append(self._chunk(d.index, delta, logprobs=lp))
        else:
            lp = self._completion_logprobs(d.logprobs) if self.want_logprobs and d.logprobs else None
            chunks.append(self._chunk(d.index, None, text=d.text, logprobs=lp))
        return chunks

    def on_choice_end(self, e: ChoiceEnd) -> list[dict[str, Any]]:
        c = self._choice(e.index)
        chunks: list[dict[str, Any]] = []
        if self.kind == "chat" and not c.started:
            chunks.append(self._chunk(e.index, {"role": "assistant", "content": ""}))
            c.started = True
        # The node may fold the last (stop) token into ChoiceEnd; the whole choice reached us.
        c.tokens = max(c.tokens, e.completion_tokens)
        c.token_ids = tuple(e.token_ids)
        c.attestation = e.attestation
        reason = e.finish_reason
        if reason == "stop" and c.tool_calls:
            reason = "tool_calls"
        c.finish_reason = reason
        if self.kind == "chat":
            chunks.append(self._chunk(e.index, {}, finish_reason=reason))
        else:
            chunks.append(self._chunk(e.index, None, text="", finish_reason=reason))
        return chunks

    def usage_chunk(self) -> dict[str, Any] | None:
        if not self.include_usage:
            return None
        chunk = self._base("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        chunk["choices"] = []
        chunk["usage"] = self.usage()
        return chunk

    # --- whole response ---------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        body = self._base("chat.completion" if self.kind == "chat" else "text_completion")
        choices = []
        for i, c in enumerate(self.choices):
            text = "".join(c.text)
            if self.kind == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
                if c.tool_calls:
                    message["tool_calls"] = [
                        {k: v for k, v in tc.items() if k != "index"} for _, tc in sorted(c.tool_calls.items())
                    ]
                    if not text:
                        message["content"] = None
                lp = {"content": [_chat_logprob(x) for x in c.logprobs], "refusal": None} if self.want_logprobs else None
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": c.finish_reason})
            else:
                lp = self._completion_logprobs(c.logprobs) if self.want_logprobs else None
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
        body["choices"] = choices
        body["usage"] = self.usage()
        return body

    # --- helpers ----------------------------------------------------------------------

    def _base(self, obj: str) -> dict[str, Any]:
        base: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        base["system_fingerprint"] = self.fingerprint
        return base

    def _chunk(
        self,
        index: int,
        delta: dict[str, Any] | None,
        *,
        text: str | None = None,
        logprobs: Any = None,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        chunk = self._base("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        if self.kind == "chat":
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        chunk["choices"] = [choice]
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    @staticmethod
    def _merge_tool_call(c: _Choice, tc: dict[str, Any], position: int) -> None:
        index = tc.get("index", position)
        if not isinstance(index, int):
            index = position
        merged = c.tool_calls.setdefault(index, {"index": index, "id": "", "type": "function",
                                                 "function": {"name": "", "arguments": ""}})
        if tc.get("id"):
            merged["id"] = tc["id"]
        if tc.get("type"):
            merged["type"] = tc["type"]
        fn = tc.get("function") or {}
        if fn.get("name"):
            merged["function"]["name"] = fn["name"]
        if fn.get("arguments"):
            merged["function"]["arguments"] += fn["arguments"]

    @staticmethod
    def _completion_logprobs(lps: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict[str, Any]:
        offsets, pos = [], 0
        for lp in lps:
            offsets.append(pos)
            pos += len(lp.token)
        return {
            "tokens": [lp.token for lp in lps],
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{t: v for t, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }


def embedding_response(
    *, model: str, vectors: bytes, dim: int, count: int, prompt_tokens: int, encoding_format: str
) -> dict[str, Any]:
    """The `list` of `embedding` objects; base64 is the raw little-endian float32 bytes, as OpenAI sends."""
    data = []
    row = dim * 4
    for i in range(count):
        raw = vectors[i * row : (i + 1) * row]
        if encoding_format == "base64":
            emb: Any = base64.b64encode(raw).decode("ascii")
        else:
            emb = list(struct.unpack(f"<{dim}f", raw))
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def model_object(
    model_id: str,
    *,
    created: int = 0,
    providers: int = 0,
    digests: list[str] | None = None,
    features: list[str] | None = None,
    price_input_per_m: tuple[int, int] | None = None,
    price_output_per_m: tuple[int, int] | None = None,
    context_length: int = 0,
) -> dict[str, Any]:
    """An OpenAI `model` object with Darkbloom's extras under `darkbloom`."""
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "darkbloom",
        "darkbloom": {
            "providers": providers,
            "digests": sorted(digests or []),
            "features": sorted(features or []),
            "price_input_per_m": list(price_input_per_m) if price_input_per_m else None,
            "price_output_per_m": list(price_output_per_m) if price_output_per_m else None,
            "context_length": context_length,
        },
    }
