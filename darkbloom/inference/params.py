"""OpenAI request bodies into a validated `GenerationRequest`: pure, no MLX.

`parse_chat` takes a `/v1/chat/completions` body, `parse_completion` a `/v1/completions` body.
Every bad value raises `InvalidRequest(param=...)` naming the field and what would be accepted.
Fields the node does not act on (`stream`, `user`, `metadata`, `store`, ...) are ignored.
Schema compilation (tools, `json_schema`) is checked here too, through llguidance, so a bad
schema is refused before the request reaches the engine.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from darkbloom.errors import InvalidRequest

__all__ = [
    "GenerationRequest",
    "ResponseFormat",
    "Sampling",
    "ToolSpec",
    "parse_chat",
    "parse_completion",
    "MAX_N",
    "MAX_STOPS",
    "MAX_TOP_LOGPROBS",
]

MAX_N = 16
MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
_ROLES = ("system", "developer", "user", "assistant", "tool")
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Sampling:
    """How to pick each token. temperature 0 is greedy; OpenAI's defaults otherwise."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off (extension)
    min_p: float = 0.0  # 0: off (extension)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 0.0  # 0: off (extension; multiplicative, >1 penalises)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in -100..100)


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolSpec:
    """One function tool as OpenAI describes it; `parameters` is a JSON schema object."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    strict: bool = False

    def as_openai(self) -> dict[str, Any]:
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters or {"type": "object", "properties": {}}}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseFormat:
    type: Literal["text", "json_object", "json_schema"] = "text"
    schema: dict[str, Any] | None = None  # for json_schema
    name: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    """A validated request; the engine turns it into prompt tokens and generates."""

    kind: Literal["chat", "completion"]
    messages: tuple[dict[str, Any], ...] = ()  # chat: normalised (content is a str or None)
    prompt: str | tuple[int, ...] = ""  # completion: text or token ids
    max_tokens: int | None = None  # None: up to the engine default / context
    n: int = 1
    stop: tuple[str, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    logprobs: bool = False
    top_logprobs: int = 0
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: Literal["none", "auto", "required"] = "auto"
    tool_name: str | None = None  # a named tool_choice forces this function
    parallel_tool_calls: bool = True
    response_format: ResponseFormat = field(default_factory=ResponseFormat)
    echo: bool = False  # completion: prepend the prompt (not supported yet, refused)

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forces_tool(self) -> bool:
        return bool(self.tools) and (self.tool_choice == "required" or self.tool_name is not None)


# --- small validators ---------------------------------------------------------


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {message}", param=param)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(key, f"must be a number between {lo} and {hi}, got {value!r}")
    if not lo <= value <= hi:
        raise _bad(key, f"must be between {lo} and {hi}, got {value}")
    return float(value)


def _integer(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise _bad(key, f"must be an integer between {lo} and {hi}, got {value!r}")
    if not lo <= value <= hi:
        raise _bad(key, f"must be between {lo} and {hi}, got {value}")
    return value


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(key, f"must be true or false, got {value!r}")
    return value


def _max_tokens(body: dict[str, Any]) -> int | None:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, f"must be a positive integer, got {value!r}")
    if value <= 0:
        raise _bad(key, f"must be at least 1, got {value}")
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad("stop", "must be a string or a list of strings")
    if len(items) > MAX_STOPS:
        raise _bad("stop", f"at most {MAX_STOPS} stop sequences, got {len(items)}")
    for s in items:
        if not s:
            raise _bad("stop", "stop sequences must not be empty strings")
        if len(s) > MAX_STOP_CHARS:
            raise _bad("stop", f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
    return tuple(dict.fromkeys(items))


def _logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _bad("logit_bias", "must be an object mapping token ids to a bias between -100 and 100")
    if len(value) > MAX_LOGIT_BIAS:
        raise _bad("logit_bias", f"at most {MAX_LOGIT_BIAS} entries")
    out = []
    for k, v in value.items():
        try:
            tok = int(k)
        except (TypeError, ValueError):
            raise _bad("logit_bias", f"keys must be token ids (integers as strings), got {k!r}") from None
        if tok < 0:
            raise _bad("logit_bias", f"token id {tok} is negative")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not -100 <= v <= 100:
            raise _bad("logit_bias", f"bias for token {tok} must be a number between -100 and 100, got {v!r}")
        out.append((tok, float(v)))
    return tuple(sorted(out))


def _sampling(body: dict[str, Any]) -> Sampling:
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("seed", f"must be an integer, got {seed!r}")
    if seed is not None:
        seed = seed % (1 << 64)
    return Sampling(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_integer(body, "top_k", 0, 0, 1_000_000) or 0,
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        seed=seed,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 0.0, 0.0, 10.0),
        logit_bias=_logit_bias(body),
    )


def _text_content(content: Any, param: str) -> str:
    """A message's content as one string: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"{param}[{j}]", f"only text content parts are supported, got {kind!r}")
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{param}[{j}].text", "must be a string")
            parts.append(text)
        return "".join(parts)
    raise _bad(param, "must be a string or a list of text parts")


def _messages(body: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise _bad("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(p, "must be an object with role and content")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"{p}.role", f"must be one of {', '.join(_ROLES)}, got {role!r}")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role}
        content = m.get("content")
        tool_calls = m.get("tool_calls")
        if role == "assistant" and tool_calls:
            msg["tool_calls"] = _assistant_tool_calls(tool_calls, f"{p}.tool_calls")
            msg["content"] = "" if content is None else _text_content(content, f"{p}.content")
        else:
            if content is None:
                raise _bad(f"{p}.content", "is required")
            msg["content"] = _text_content(content, f"{p}.content")
        if role == "tool":
            tcid = m.get("tool_call_id")
            if not isinstance(tcid, str) or not tcid:
                raise _bad(f"{p}.tool_call_id", "a tool message needs the id of the call it answers")
            msg["tool_call_id"] = tcid
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return tuple(out)


def _assistant_tool_calls(value: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _bad(param, "must be a list of tool calls")
    calls = []
    for j, c in enumerate(value):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"{param}[{j}].function", "must be an object with name and arguments")
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args)
        calls.append({"id": str(c.get("id", "")), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return calls


def _tools(body: dict[str, Any]) -> tuple[ToolSpec, ...]:
    value = body.get("tools")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _bad("tools", "must be a list of {type: function, function: {...}} objects")
    out = []
    names = set()
    for i, t in enumerate(value):
        p = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise _bad(p, "must be {type: 'function', function: {name, description, parameters}}")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise _bad(f"{p}.function.name", "must be 1-64 letters, digits, underscores or dashes")
        if name in names:
            raise _bad(f"{p}.function.name", f"duplicate tool name {name!r}")
        names.add(name)
        desc = fn.get("description", "")
        if not isinstance(desc, str):
            raise _bad(f"{p}.function.description", "must be a string")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise _bad(f"{p}.function.parameters", "must be a JSON schema object")
        if params.get("type", "object") != "object":
            raise _bad(f"{p}.function.parameters", "the schema's type must be 'object'")
        _check_schema(params, f"{p}.function.parameters")
        out.append(ToolSpec(name=name, description=desc, parameters=params, strict=bool(fn.get("strict", False))))
    return tuple(out)


def _tool_choice(body: dict[str, Any], tools: tuple[ToolSpec, ...]) -> tuple[str, str | None]:
    value = body.get("tool_choice")
    if value is None:
        return ("auto", None)
    if value in ("none", "auto", "required"):
        if value == "required" and not tools:
            raise _bad("tool_choice", "'required' needs at least one tool in tools")
        return (value, None)
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if not any(t.name == name for t in tools):
            raise _bad("tool_choice", f"names function {name!r}, which is not in tools")
        return ("required", name)
    raise _bad("tool_choice", "must be 'none', 'auto', 'required' or {type: 'function', function: {name}}")


def _response_format(body: dict[str, Any]) -> ResponseFormat:
    value = body.get("response_format")
    if value is None:
        return ResponseFormat()
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise _bad("response_format", "type must be 'text', 'json_object' or 'json_schema'")
    kind = value["type"]
    if kind != "json_schema":
        return ResponseFormat(type=kind)
    js = value.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
        raise _bad("response_format.json_schema", "must be {name, schema: {...JSON schema...}}")
    schema = js.get("schema") or {}
    _check_schema(schema, "response_format.json_schema.schema")
    name = js.get("name", "")
    return ResponseFormat(type="json_schema", schema=schema, name=name if isinstance(name, str) else "")


def _check_schema(schema: dict[str, Any], param: str) -> None:
    # Compiling through llguidance is the only check that matches what decoding will enforce.
    from darkbloom.inference.constrained import schema_error

    err = schema_error(schema)
    if err:
        raise _bad(param, f"not a usable JSON schema: {err}")


# --- entry points -------------------------------------------------------------


def _common(body: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", param=None)
    n = _integer(body, "n", 1, 1, MAX_N)
    assert n is not None
    return {
        "max_tokens": _max_tokens(body),
        "n": n,
        "stop": _stop(body),
        "sampling": _sampling(body),
    }


def parse_chat(body: dict[str, Any]) -> GenerationRequest:
    """Validate a chat completions body."""
    common = _common(body)
    messages = _messages(body)
    logprobs = _bool(body, "logprobs", False)
    top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) or 0
    if top and not logprobs:
        raise _bad("top_logprobs", "needs logprobs: true")
    tools = _tools(body)
    choice, name = _tool_choice(body, tools)
    fmt = _response_format(body)
    if fmt.type != "text" and choice == "required" and tools:
        raise _bad("response_format", "cannot be combined with a required tool_choice")
    return GenerationRequest(
        kind="chat",
        messages=messages,
        logprobs=logprobs,
        top_logprobs=top,
        tools=tools,
        tool_choice=choice,  # type: ignore[arg-type]
        tool_name=name,
        parallel_tool_calls=_bool(body, "parallel_tool_calls", True),
        response_format=fmt,
        **common,
    )


def parse_completion(body: dict[str, Any]) -> GenerationRequest:
    """Validate a (legacy) completions body: `prompt` is a string or a list of token ids."""
    common = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt", "must not be empty")
        value: str | tuple[int, ...] = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        value = tuple(prompt)
    else:
        raise _bad("prompt", "must be a non-empty string or a list of token ids (one prompt per request)")
    lp = body.get("logprobs")
    if lp is None or lp is False:
        top = 0
        logprobs = False
    elif isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 5:
        raise _bad("logprobs", f"must be an integer between 0 and 5, got {lp!r}")
    else:
        top, logprobs = lp, True
    if _bool(body, "echo", False):
        raise _bad("echo", "echo is not supported; send echo: false")
    if body.get("suffix"):
        raise _bad("suffix", "suffix is not supported")
    best_of = body.get("best_of")
    if best_of not in (None, 1) and best_of != common["n"]:
        raise _bad("best_of", "best_of is not supported; use n")
    return GenerationRequest(kind="completion", prompt=value, logprobs=logprobs, top_logprobs=top, **common)
