"""Capability canaries, pure: small requests that prove a node really does tools, JSON mode and logprobs, their checkers, and a book of results.

Before routing a request that needs a feature to a node, the shim (and the relay,
periodically) sends that feature's canary; a node that fails it gets no such requests until
it passes again. Canaries are drawn with an `rng` so their wording and names vary: a node
cannot recognise a fixed probe and answer it specially. `Canary.params` is the OpenAI body
to put in `InferRequest(kind="chat", params=...)`; `reply_from_frames` folds the node's
Delta / ChoiceEnd frames into a `CanaryReply`; `Canary.check` judges it.

Checks are about form, which constrained decoding guarantees whatever the model's quality:
  json      the content parses as a JSON object with exactly the schema's one boolean key
  tools     a call to the forced function whose arguments parse and follow its (enum) schema
  logprobs  one entry per generated token, finite and <= 0, `top_logprobs` alternatives
            sorted most likely first, and (greedy) the chosen token first among them
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CANARY_FEATURES",
    "Canary",
    "CanaryBook",
    "CanaryReply",
    "CanaryResult",
    "features_of",
    "make_canary",
    "reply_from_frames",
]

CANARY_FEATURES = ("json", "tools", "logprobs")
_WORDS = "amber basil cedar delta ember fjord garnet harbor indigo juniper kestrel lagoon meadow nectar".split()
_CITIES = "Lisbon Nairobi Osaka Quito Tallinn Hobart Bergen Cusco Dakar Perth Tbilisi Recife".split()


@dataclass(frozen=True, slots=True)
class CanaryResult:
    ok: bool
    reason: str = ""  # why it failed ("" when ok)


@dataclass(slots=True)
class CanaryReply:
    """What a node answered, folded from its frames."""

    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # complete: {"name", "arguments"}
    logprobs: list[Any] = field(default_factory=list)  # TokenLogprob-like: .token .logprob .top
    finish_reason: str = ""
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Canary:
    feature: str
    params: dict[str, Any]  # OpenAI chat body fields (messages, response_format, tools, ...)
    check: Callable[[CanaryReply], CanaryResult]


def reply_from_frames(frames: Iterable[Any]) -> CanaryReply:
    """Fold infer Delta / ChoiceEnd frames (choice 0) into a reply. Tool-call deltas are merged by index."""
    reply = CanaryReply()
    calls: dict[int, dict[str, Any]] = {}
    for f in frames:
        if getattr(f, "index", 0) != 0:
            continue
        if hasattr(f, "finish_reason"):
            reply.finish_reason = f.finish_reason
            reply.completion_tokens = getattr(f, "completion_tokens", 0)
            continue
        reply.text += getattr(f, "text", "") or ""
        reply.logprobs.extend(getattr(f, "logprobs", ()) or ())
        for tc in getattr(f, "tool_calls", ()) or ():
            slot = calls.setdefault(int(tc.get("index", len(calls))), {"name": "", "arguments": ""})
            fn = tc.get("function") or {}
            slot["name"] += fn.get("name") or ""
            slot["arguments"] += fn.get("arguments") or ""
    reply.tool_calls = [calls[i] for i in sorted(calls)]
    return reply


def _json_canary(rng: random.Random) -> Canary:
    key = rng.choice(_WORDS) + "_" + rng.choice(_WORDS)
    schema = {"type": "object", "properties": {key: {"type": "boolean"}}, "required": [key], "additionalProperties": False}
    params = {
        "messages": [{"role": "user", "content": f"Answer in JSON: is the sky blue? Use the key {key}."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        "max_tokens": 48,
        "temperature": 0,
    }

    def check(r: CanaryReply) -> CanaryResult:
        try:
            value = json.loads(r.text)
        except ValueError:
            return CanaryResult(False, "content is not JSON")
        if not isinstance(value, dict) or set(value) != {key} or not isinstance(value[key], bool):
            return CanaryResult(False, "JSON does not follow the schema")
        return CanaryResult(True)

    return Canary("json", params, check)


def _tools_canary(rng: random.Random) -> Canary:
    name = "get_" + rng.choice(_WORDS) + "_report"
    cities = rng.sample(_CITIES, 3)
    city = cities[0]
    # An enum keeps the call short under constrained decoding, whatever the model's quality.
    tool = {
        "type": "function",
        "function": {
            "name": name,
            "description": "Look up the report for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": sorted(cities)}},
                           "required": ["city"]},
        },
    }
    params = {
        "messages": [{"role": "user", "content": f"What is the report for {city}?"}],
        "tools": [tool],
        "tool_choice": {"type": "function", "function": {"name": name}},
        "max_tokens": 64,
        "temperature": 0,
    }

    def check(r: CanaryReply) -> CanaryResult:
        if not r.tool_calls:
            return CanaryResult(False, "no tool call")
        call = r.tool_calls[0]
        if call.get("name") != name:
            return CanaryResult(False, "called another function")
        try:
            args = json.loads(call.get("arguments") or "")
        except ValueError:
            return CanaryResult(False, "arguments are not JSON")
        if not isinstance(args, dict) or args.get("city") not in cities:
            return CanaryResult(False, "arguments do not follow the schema")
        return CanaryResult(True)

    return Canary("tools", params, check)


def _logprobs_canary(rng: random.Random) -> Canary:
    top = rng.randint(2, 5)
    word = rng.choice(_WORDS)
    params = {
        "messages": [{"role": "user", "content": f"Say the word {word} three times."}],
        "logprobs": True,
        "top_logprobs": top,
        "max_tokens": 6,
        "temperature": 0,
    }

    def check(r: CanaryReply) -> CanaryResult:
        if not r.logprobs:
            return CanaryResult(False, "no logprobs")
        if r.completion_tokens and len(r.logprobs) != r.completion_tokens:
            return CanaryResult(False, "one logprob entry per token expected")
        for lp in r.logprobs:
            value = getattr(lp, "logprob", None)
            alts = list(getattr(lp, "top", ()) or ())
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value > 1e-6:
                return CanaryResult(False, "a logprob is not a finite number <= 0")
            if len(alts) != top:
                return CanaryResult(False, f"expected {top} top_logprobs")
            vals = [a[1] for a in alts]
            if any(not math.isfinite(v) or v > 1e-6 for v in vals) or vals != sorted(vals, reverse=True):
                return CanaryResult(False, "top_logprobs not sorted or out of range")
            if alts[0][0] != lp.token or abs(alts[0][1] - value) > 1e-3:
                return CanaryResult(False, "greedy token is not the most likely alternative")
        return CanaryResult(True)

    return Canary("logprobs", params, check)


_MAKERS = {"json": _json_canary, "tools": _tools_canary, "logprobs": _logprobs_canary}


def make_canary(feature: str, rng: random.Random) -> Canary:
    maker = _MAKERS.get(feature)
    if maker is None:
        raise ValueError(f"no canary for feature {feature!r}; known: {', '.join(CANARY_FEATURES)}")
    return maker(rng)


@dataclass(slots=True)
class CanaryBook:
    """Results per (peer, feature) with an expiry; pure, `now` passed in."""

    ttl_s: float = 3600.0  # a pass is trusted this long; then the feature needs a new canary
    fail_ttl_s: float = 600.0  # a failure bars the feature this long, then a retry is allowed
    results: dict[tuple[str, str], tuple[bool, float]] = field(default_factory=dict)

    def record(self, peer_id: str, feature: str, result: CanaryResult, now: float) -> None:
        self.results[(peer_id, feature)] = (result.ok, now)

    def status(self, peer_id: str, feature: str, now: float) -> str:
        """"passed", "failed" (barred) or "unknown" (never tried, or the result expired)."""
        r = self.results.get((peer_id, feature))
        if r is None:
            return "unknown"
        ok, at = r
        if ok:
            return "passed" if now - at < self.ttl_s else "unknown"
        return "failed" if now - at < self.fail_ttl_s else "unknown"

    def eligible(self, peer_id: str, features: Iterable[str], now: float) -> bool:
        """May this peer get a request needing `features`? Only canaried features gate."""
        return all(self.status(peer_id, f, now) == "passed" for f in features if f in _MAKERS)

    def needed(self, peer_id: str, features: Iterable[str], now: float) -> list[str]:
        """Canaries to send before the peer may take such a request (not while barred)."""
        return [f for f in features if f in _MAKERS and self.status(peer_id, f, now) == "unknown"]

    def barred(self, peer_id: str, features: Iterable[str], now: float) -> bool:
        return any(self.status(peer_id, f, now) == "failed" for f in features if f in _MAKERS)


def features_of(params: Mapping[str, Any]) -> frozenset[str]:
    """The canaried features an OpenAI body needs."""
    out = set()
    rf = params.get("response_format") or {}
    if isinstance(rf, Mapping) and rf.get("type") in ("json_object", "json_schema"):
        out.add("json")
    if params.get("tools") and params.get("tool_choice") != "none":
        out.add("tools")
    if params.get("logprobs"):
        out.add("logprobs")
    return frozenset(out)

