"""Tool calls: prompt the model with tools, spot calls in its output, parse them into OpenAI's shape.

Pure: no MLX. The call format is the tokenizer's (mlx-lm infers a parser from the chat
template); models without one use the Hermes/ChatML convention
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, which is also what
`tool_instructions` teaches a template that has no tools support.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from darkbloom.inference.params import ToolSpec
from darkbloom.inference.stops import partial_suffix_len

__all__ = [
    "ToolFormat",
    "HERMES",
    "ToolCallScanner",
    "parse_tool_calls",
    "new_call_id",
    "tool_instructions",
    "messages_for_template",
]


def _json_parser(text: str, tools: Any = None) -> Any:
    return json.loads(text.strip())


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """How a model writes a tool call: between `start` and `end`, parsed by `parse`."""

    start: str
    end: str
    parse: Callable[[str, Any], Any]
    json_body: bool = True  # the body is {"name", "arguments"} JSON (grammar-enforceable)


HERMES = ToolFormat("<tool_call>", "</tool_call>", _json_parser, True)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _to_openai(parsed: Any, names: set[str]) -> list[dict[str, Any]] | None:
    items = parsed if isinstance(parsed, list) else [parsed]
    out = []
    for item in items:
        if not isinstance(item, dict):
            return None
        name = item.get("name")
        args = item.get("arguments", item.get("parameters", {}))
        if not isinstance(name, str) or (names and name not in names):
            return None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        out.append(
            {
                "id": new_call_id(),
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
            }
        )
    return out


def parse_tool_calls(raw: str, fmt: ToolFormat, tools: Sequence[ToolSpec]) -> list[dict[str, Any]] | None:
    """All calls in `raw` (text from the first start tag on), or None if any is malformed.

    A final call whose end tag is missing (EOS or the token limit ended it) is still parsed if
    its body is complete, and dropped if it is not but earlier calls are complete.
    """
    names = {t.name for t in tools}
    schema_tools = [t.as_openai() for t in tools]
    calls: list[dict[str, Any]] = []
    rest = raw
    while True:
        i = rest.find(fmt.start)
        if i < 0:
            break
        if rest[:i].strip():
            return None  # text between calls: not a clean tool-call answer
        body_start = i + len(fmt.start)
        j = rest.find(fmt.end, body_start)
        body = rest[body_start:] if j < 0 else rest[body_start:j]
        rest = "" if j < 0 else rest[j + len(fmt.end) :]
        try:
            parsed = fmt.parse(body, schema_tools)
        except (ValueError, KeyError, TypeError, AttributeError):
            parsed = None
        got = None if parsed is None else _to_openai(parsed, names)
        if got is None:
            if j < 0 and calls:
                break  # a cut-off last call after complete ones: keep the complete ones
            return None
        calls.extend(got)
    if rest.strip() or not calls:
        return None
    return calls


class ToolCallScanner:
    """Splits streamed text into content (emitted) and tool-call text (held for parsing).

    Text before the first start tag streams as content; a partial start tag at the end of the
    text is held back; from the start tag on everything is captured.
    """

    __slots__ = ("fmt", "_held", "captured", "in_call")

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self._held = ""
        self.captured = ""
        self.in_call = False

    def feed(self, text: str) -> str:
        if self.in_call:
            self.captured += text
            return ""
        buf = self._held + text
        i = buf.find(self.fmt.start)
        if i >= 0:
            self.in_call = True
            self.captured = buf[i:]
            self._held = ""
            return buf[:i]
        keep = partial_suffix_len(buf, (self.fmt.start,))
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


def tool_instructions(tools: Sequence[ToolSpec]) -> str:
    """A system-prompt section teaching the Hermes call format, for templates without tools."""
    listing = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools)
    return (
        "You may call functions. The available functions are:\n<tools>\n"
        f"{listing}\n</tools>\n"
        "To call one, answer with exactly:\n"
        '<tool_call>\n{"name": <function name>, "arguments": <arguments object>}\n</tool_call>'
    )


def messages_for_template(
    messages: Sequence[dict[str, Any]], tools: Sequence[ToolSpec], template_has_tools: bool
) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: tool-call arguments as objects, and tool
    instructions in the system message when the template cannot render `tools` itself."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c["function"])
                try:
                    fn["arguments"] = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
                except json.JSONDecodeError:
                    pass  # keep the string: the template renders whatever it was given
                calls.append({**c, "function": fn})
            m["tool_calls"] = calls
            if not template_has_tools and not m.get("content"):
                m["content"] = "\n".join(
                    "<tool_call>\n"
                    + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
                    + "\n</tool_call>"
                    for c in calls
                )
        if not template_has_tools and m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        out.append(m)
    if tools and not template_has_tools:
        text = tool_instructions(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out
