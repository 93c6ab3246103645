"""OpenAI request bodies checked at the shim, pure: body dict -> `ShimRequest` or a 400 naming the param.

The shim checks what it needs to route (model, stream, n, the `darkbloom` extras, required
features) and rejects known-but-unsupported fields; unknown fields are ignored as OpenAI
does. Generation parameters are checked by the engine's own parser
(`darkbloom.inference.params`), so shim and node agree on one rule set.
What goes to the node is the body without the shim-only fields (`stream`, `stream_options`,
`user`, `darkbloom`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from darkbloom.api.errors import unsupported
from darkbloom.api.router import RouteHints
from darkbloom.errors import ApiError, InvalidRequest
from darkbloom.inference.params import parse_chat, parse_completion

__all__ = ["ShimRequest", "parse_chat_request", "parse_completion_request", "parse_embedding_request"]

Kind = Literal["chat", "completion", "embedding"]

# Fields OpenAI defines that Darkbloom cannot honour. A value listed as allowed is accepted.
_UNSUPPORTED: dict[Kind, dict[str, tuple[Any, ...]]] = {
    "chat": {
        "audio": (None,),
        "modalities": (None, ["text"]),
        "prediction": (None,),
        "web_search_options": (None,),
        "reasoning_effort": (None,),
        "verbosity": (None,),
        "functions": (None,),
        "function_call": (None,),
        "store": (None, False),
        "service_tier": (None, "auto", "default"),
    },
    "completion": {
        "suffix": (None, ""),
        "best_of": (None, 1),
        "echo": (None, False),
        "service_tier": (None, "auto", "default"),
    },
    "embedding": {},
}
_WHY = {
    "store": "Darkbloom never retains prompts or outputs",
    "functions": "use tools instead",
    "function_call": "use tool_choice instead",
}
_SHIM_ONLY = ("stream", "stream_options", "user", "darkbloom", "safety_identifier", "prompt_cache_key", "metadata")
_DARKBLOOM_KEYS = {"region", "node_class", "max_price", "digest", "prefer"}
MAX_PROMPTS = 16  # a /v1/completions list: each prompt is its own answer from the network


@dataclass(frozen=True, slots=True, kw_only=True)
class ShimRequest:
    kind: Kind
    model: str
    stream: bool
    include_usage: bool
    n: int
    params: dict[str, Any]  # forwarded to the node as InferRequest.params
    hints: RouteHints
    encoding_format: Literal["float", "base64"] = "float"  # embeddings only
    inputs: tuple[str, ...] = ()  # embeddings only
    prompts: tuple[str, ...] = ()  # completions given a list of prompts: one answer each, merged by the shim


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, code="invalid_value", param=param)


def _require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise ApiError(400, "you must provide a model parameter", code="missing_required_parameter", param="model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("model must be a non-empty string", "model")
    return model


def _check_unsupported(kind: Kind, body: dict[str, Any]) -> None:
    for name, allowed in _UNSUPPORTED[kind].items():
        if name in body and body[name] not in allowed:
            raise unsupported(name, _WHY.get(name, ""))


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise _bad("stream_options must be an object", "stream_options")
        if not stream:
            raise _bad("stream_options is only allowed when stream is true", "stream_options")
        iu = opts.get("include_usage", False)
        if not isinstance(iu, bool):
            raise _bad("stream_options.include_usage must be a boolean", "stream_options.include_usage")
        include_usage = iu
    return stream, include_usage


def _n(body: dict[str, Any]) -> int:
    n = body.get("n", 1)
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 16:
        raise _bad("n must be an integer from 1 to 16", "n")
    return n


def _hints(body: dict[str, Any], model: str, features: frozenset[str]) -> RouteHints:
    extra = body.get("darkbloom")
    if extra is None:
        return RouteHints(model=model, features=features)
    if not isinstance(extra, dict):
        raise _bad("darkbloom must be an object", "darkbloom")
    for key in extra:
        if key not in _DARKBLOOM_KEYS:
            raise _bad(f"unknown darkbloom option {key!r}; known: {', '.join(sorted(_DARKBLOOM_KEYS))}", f"darkbloom.{key}")

    def text(key: str) -> str | None:
        value = extra.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise _bad(f"darkbloom.{key} must be a non-empty string", f"darkbloom.{key}")
        return value

    max_price = extra.get("max_price")
    if max_price is not None and (isinstance(max_price, bool) or not isinstance(max_price, (int, float)) or max_price < 0):
        raise _bad("darkbloom.max_price must be a number >= 0 (micro-credits per 1M tokens)", "darkbloom.max_price")
    prefer = extra.get("prefer")
    if prefer not in (None, "latency", "cost"):
        raise _bad("darkbloom.prefer must be 'latency' or 'cost'", "darkbloom.prefer")
    return RouteHints(
        model=model,
        digest=text("digest"),
        features=features,
        region=text("region"),
        node_class=text("node_class"),
        max_price=None if max_price is None else int(max_price),
        prefer=prefer,
    )


def _engine_check(kind: Literal["chat", "completion"], body: dict[str, Any]) -> None:
    """Run the engine's own parser (pure, no MLX): one rule set for shim and node."""
    parse = parse_chat if kind == "chat" else parse_completion
    try:
        parse(body)
    except InvalidRequest as exc:
        raise ApiError(400, str(exc), code="invalid_value" if exc.param else None, param=exc.param) from None


def _forward(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in _SHIM_ONLY}


def _messages(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "you must provide messages", code="missing_required_parameter", param="messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty array", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad("each message must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise _bad(f"messages[{i}].role must be one of system, developer, user, assistant, tool", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                ptype = part.get("type") if isinstance(part, dict) else None
                if ptype in ("image_url", "input_audio", "file"):
                    raise unsupported(f"messages[{i}].content[{j}].type", f"{ptype} parts: only text is served")
                if ptype not in ("text", "refusal") or not isinstance(part.get(ptype), str):
                    raise _bad("content parts must be {'type': 'text', 'text': ...}", f"messages[{i}].content[{j}]")
        elif content is not None and not isinstance(content, str):
            raise _bad("content must be a string or an array of text parts", f"messages[{i}].content")
        elif content is None and role != "assistant":
            raise _bad("content is required", f"messages[{i}].content")


def _chat_features(body: dict[str, Any]) -> frozenset[str]:
    features = set()
    if body.get("tools") and body.get("tool_choice") != "none":
        features.add("tools")
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema"):
        features.add("json")
    if body.get("logprobs"):
        features.add("logprobs")
    return frozenset(features)


def parse_chat_request(body: Any) -> ShimRequest:
    body = _require_object(body)
    model = _model(body)
    _check_unsupported("chat", body)
    stream, include_usage = _stream(body)
    n = _n(body)
    _messages(body)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _bad("tools must be an array", "tools")
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema")):
        raise _bad("response_format.type must be text, json_object or json_schema", "response_format")
    hints = _hints(body, model, _chat_features(body))
    _engine_check("chat", _forward(body))
    return ShimRequest(kind="chat", model=model, stream=stream, include_usage=include_usage, n=n,
                       params=_forward(body), hints=hints)


def parse_completion_request(body: Any) -> ShimRequest:
    body = _require_object(body)
    model = _model(body)
    _check_unsupported("completion", body)
    stream, include_usage = _stream(body)
    n = _n(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "you must provide a prompt", code="missing_required_parameter", param="prompt")
    prompts: tuple[str, ...] = ()
    if isinstance(prompt, list):
        if prompt and all(isinstance(x, (int, list)) and not isinstance(x, bool) for x in prompt):
            raise unsupported("prompt", "token-id prompts; send text")
        if not prompt or not all(isinstance(x, str) for x in prompt):
            raise _bad("prompt must be a string or a non-empty array of strings", "prompt")
        if len(prompt) > MAX_PROMPTS:
            raise _bad(f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}; split the list", "prompt")
        if len(prompt) > 1:
            prompts = tuple(prompt)
        body = {**body, "prompt": prompt[0]}  # each answer is asked of a node as one prompt
    elif not isinstance(prompt, str):
        raise _bad("prompt must be a string or a non-empty array of strings", "prompt")
    features = frozenset({"logprobs"}) if body.get("logprobs") else frozenset()
    hints = _hints(body, model, features)
    for text in prompts or (body["prompt"],):
        _engine_check("completion", {**_forward(body), "prompt": text})
    return ShimRequest(kind="completion", model=model, stream=stream, include_usage=include_usage, n=n,
                       params=_forward(body), hints=hints, prompts=prompts)


def parse_embedding_request(body: Any) -> ShimRequest:
    body = _require_object(body)
    model = _model(body)
    raw = body.get("input")
    if raw is None:
        raise ApiError(400, "you must provide an input", code="missing_required_parameter", param="input")
    if isinstance(raw, str):
        inputs: tuple[str, ...] = (raw,)
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = tuple(raw)
    elif isinstance(raw, list) and raw and all(isinstance(x, (int, list)) and not isinstance(x, bool) for x in raw):
        raise unsupported("input", "token-id input; send text")
    else:
        raise _bad("input must be a string or a non-empty array of strings", "input")
    if len(inputs) > 2048:
        raise _bad("at most 2048 inputs per request", "input")
    if any(not s for s in inputs):
        raise _bad("inputs must not be empty strings", "input")
    fmt = body.get("encoding_format", "float") or "float"
    if fmt not in ("float", "base64"):
        raise _bad("encoding_format must be 'float' or 'base64'", "encoding_format")
    if body.get("dimensions") is not None:
        raise unsupported("dimensions", "embeddings have the model's native size")
    hints = _hints(body, model, frozenset({"embeddings"}))
    return ShimRequest(kind="embedding", model=model, stream=False, include_usage=False, n=1,
                       params={"input": list(inputs)}, hints=hints, encoding_format=fmt, inputs=inputs)
