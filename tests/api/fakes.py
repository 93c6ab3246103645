"""A fake backend for tests about HTTP shape only (routing and engines are tested elsewhere).

`FakeEngineBackend` answers from a script instead of a model; its name says it is fake.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import trio

from darkbloom.api import errors as api_errors
from darkbloom.api.backend import ModelListing
from darkbloom.api.router import RouteHints
from darkbloom.errors import ModelNotFound, StreamClosed
from darkbloom.wire.infer import Accepted, ChoiceEnd, Delta, Done, Embeddings, InferRequest, NodeLoad, Usage

FAKE_WORDS = ("Hello", " from", " the", " fake", " engine", ".")
FAKE_DIGEST = "ab" * 32


@dataclass
class FakeSession:
    node_id: str
    route: str
    accepted: Accepted
    frames: list[Any]
    gate: trio.Event | None = None  # when set, wait for it before each frame after the first
    fail_after: int | None = None  # raise StreamClosed after this many frames
    closed: trio.Event = field(default_factory=trio.Event)
    sent: int = 0

    async def receive(self):
        if self.fail_after is not None and self.sent >= self.fail_after:
            raise StreamClosed(self.node_id, "fake node died")
        if self.sent and self.gate is not None:
            await self.gate.wait()
        if self.sent >= len(self.frames):
            return None
        frame = self.frames[self.sent]
        self.sent += 1
        await trio.lowlevel.checkpoint()
        return frame

    async def aclose(self) -> None:
        self.closed.set()


@dataclass
class FakeEngineBackend:
    """Scripted answers. `blocked` makes streams stall after the first frame until released."""

    models: tuple[str, ...] = ("fake-chat", "fake-embed")
    gate: trio.Event | None = None
    fail_after: int | None = None
    sessions: list[FakeSession] = field(default_factory=list)
    requests: list[InferRequest] = field(default_factory=list)

    async def list_models(self) -> list[ModelListing]:
        return [
            ModelListing(id="fake-chat", providers=2, digests=(FAKE_DIGEST,), features=("json", "tools"),
                         price_input_per_m=(100, 200), price_output_per_m=(400, 500), context_length=2048),
            ModelListing(id="fake-embed", providers=1, digests=(FAKE_DIGEST,), features=("embeddings",),
                         kind="embedding"),
        ]

    async def open_session(self, request: InferRequest, hints: RouteHints, *, exclude: frozenset[str] = frozenset()):
        self.requests.append(request)
        if request.model == "busy-model":
            raise api_errors.all_busy(request.model, 2.0)
        if request.model == "offline-model":
            raise api_errors.no_provider(request.model)
        if request.model not in self.models:
            raise ModelNotFound(request.model)
        load = NodeLoad(active=1, queued=0, max_concurrent=4)
        accepted = Accepted(request_id=request.request_id, node_version="fake", digest=FAKE_DIGEST,
                            prompt_tokens=7, load=load)
        frames = _script(request, load)
        session = FakeSession(node_id="12D3KooWFakeNode0000" + str(len(self.sessions)), route="direct",
                              accepted=accepted, frames=frames, gate=self.gate, fail_after=self.fail_after)
        self.sessions.append(session)
        return session


def _script(request: InferRequest, load: NodeLoad) -> list[Any]:
    rid = request.request_id
    p = request.params
    if request.kind == "embedding":
        inputs = p["input"]
        dim = 4
        vecs = b"".join(struct.pack("<4f", float(i), 0.5, -0.25, float(len(s))) for i, s in enumerate(inputs))
        return [Embeddings(request_id=rid, dim=dim, count=len(inputs), vectors=vecs, prompt_tokens=3 * len(inputs)),
                Done(request_id=rid, usage=Usage(prompt_tokens=3 * len(inputs), completion_tokens=0), load=load)]
    n = p.get("n") or 1
    cap = p.get("max_completion_tokens") or p.get("max_tokens") or 100
    frames: list[Any] = []
    total = 0
    tools = p.get("tools") or []
    choice = p.get("tool_choice", "auto")
    use_tool = bool(tools) and choice != "none"
    for index in range(n):
        if use_tool:
            name = choice["function"]["name"] if isinstance(choice, dict) else tools[0]["function"]["name"]
            frames.append(Delta(request_id=rid, index=index, tokens=3, tool_calls=(
                {"index": 0, "id": f"call_{index}", "type": "function", "function": {"name": name, "arguments": ""}},)))
            frames.append(Delta(request_id=rid, index=index, tokens=4, tool_calls=(
                {"index": 0, "function": {"arguments": '{"city": "Paris"}'}},)))
            frames.append(ChoiceEnd(request_id=rid, index=index, finish_reason="tool_calls", completion_tokens=7))
            total += 7
            continue
        rf = (p.get("response_format") or {}).get("type")
        words = ('{"answer":', ' "yes"}') if rf in ("json_object", "json_schema") else FAKE_WORDS
        used = 0
        for w in words[:cap]:
            frames.append(Delta(request_id=rid, index=index, text=w, tokens=1))
            used += 1
        frames.append(ChoiceEnd(request_id=rid, index=index, finish_reason="length" if cap < len(words) else "stop",
                                completion_tokens=used))
        total += used
    frames.append(Done(request_id=rid, usage=Usage(prompt_tokens=7, completion_tokens=total), load=load))
    return frames
