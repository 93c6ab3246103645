"""The seam between the HTTP app and whatever serves requests: `Backend` and `Session`.

The app hands a `Backend` an `InferRequest` plus routing hints and gets back a `Session` that
is already committed: the backend has done discovery, ranking and failover and holds the
first content frame, so a failure the app sees from `open_session` happened before any byte
reached the client (the app answers it with an HTTP error), and a failure from
`Session.receive` happened after (the app ends the stream with an error event).
`NetworkBackend` (darkbloom.api.network) is the real one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Union

from darkbloom.api.router import RouteHints
from darkbloom.wire.infer import Accepted, ChoiceEnd, Delta, Done, Embeddings, InferRequest

__all__ = ["Backend", "Frame", "ModelListing", "Route", "Session"]

Frame = Union[Delta, ChoiceEnd, Done, Embeddings]
Route = Literal["direct", "relayed", "hole-punched", "local"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelListing:
    """One model as discovery sees it right now, for GET /v1/models."""

    id: str
    providers: int
    digests: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    price_input_per_m: tuple[int, int] | None = None  # (min, max) over providers
    price_output_per_m: tuple[int, int] | None = None
    context_length: int = 0
    kind: Literal["chat", "embedding"] = "chat"


class Session(Protocol):
    """A request running on one node. `receive` returns frames in order, None after `Done`."""

    node_id: str
    route: Route
    accepted: Accepted

    async def receive(self) -> Frame | None: ...

    async def aclose(self) -> None:
        """Idempotent. Closing before `Done` cancels the generation on the node."""


class Backend(Protocol):
    async def list_models(self) -> list[ModelListing]: ...

    async def open_session(
        self, request: InferRequest, hints: RouteHints, *, exclude: frozenset[str] = frozenset()
    ) -> Session:
        """Route, connect, fail over; return once the first content frame is in hand.

        Raises an `ApiError` (503 no provider / all busy / all failed) or a Darkbloom error
        the node answered (`InvalidRequest`, `ModelNotFound`) that retrying cannot fix.
        """
        ...
