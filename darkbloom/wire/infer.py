"""Messages of the inference protocol `/darkbloom/infer/1.0.0` and the status protocol.

One request per stream. The client sends `InferRequest`; the node answers `Accepted` (or
`ErrorFrame`), then `Delta` frames, a `ChoiceEnd` per choice, and `Done`. Embedding requests
get one `Embeddings` frame instead of deltas. Closing the stream cancels the work.
Voucher frames of the ledger (see `darkbloom.wire.ledger`) may interleave on the same stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from darkbloom.wire.codec import message

__all__ = [
    "INFER_PROTOCOL",
    "STATUS_PROTOCOL",
    "PROTOCOL_VERSION",
    "Accepted",
    "ChoiceEnd",
    "Delta",
    "Done",
    "Embeddings",
    "ErrorFrame",
    "InferRequest",
    "NodeLoad",
    "StatusReply",
    "StatusRequest",
    "TokenLogprob",
    "Usage",
]

PROTOCOL_VERSION = "1.0.0"
INFER_PROTOCOL = f"/darkbloom/infer/{PROTOCOL_VERSION}"
STATUS_PROTOCOL = f"/darkbloom/status/{PROTOCOL_VERSION}"

RequestKind = Literal["chat", "completion", "embedding", "score"]


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeLoad:
    """Live load, piggybacked on replies. Set by the node."""

    active: int  # requests generating now
    queued: int  # requests waiting for a slot
    max_concurrent: int  # slots the operator allows
    paused: bool = False  # operator controls paused serving (battery, user active, window)


@message("infer.request")
@dataclass(frozen=True, slots=True, kw_only=True)
class InferRequest:
    """Client -> node, first frame of a stream. Set by the shim."""

    request_id: str  # opaque id chosen by the shim, echoed in every reply
    kind: RequestKind
    model: str  # catalog id, e.g. "smollm2-135m-instruct"
    digest: str | None = None  # pin: refuse unless the node's weights digest matches
    params: dict[str, Any] = field(default_factory=dict)  # OpenAI body fields (messages, prompt, ...)
    session: bytes = b""  # encoded lane reservation (ledger); empty when the node serves free
    # Secret the shim draws per request (16 bytes; b"": none): the node's and a spot-check verifier's
    # attestations commit to token ids salted with it (trust.token_hash); it never goes to the relay.
    # A score request carries the nonce of the request it scores.
    nonce: bytes = b""


@message("infer.accepted")
@dataclass(frozen=True, slots=True, kw_only=True)
class Accepted:
    """Node -> client: the request is admitted (queued or running)."""

    request_id: str
    node_version: str
    digest: str  # weights digest of the model that will serve it
    prompt_tokens: int  # after templating, counted by the node's tokenizer
    load: NodeLoad


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes_: bytes = b""  # UTF-8 bytes of the token (may be a partial character)
    top: tuple[tuple[str, float], ...] = ()  # top alternatives, most likely first


@message("infer.delta")
@dataclass(frozen=True, slots=True, kw_only=True)
class Delta:
    """Node -> client: new text for one choice. `tokens` counts generated tokens it covers."""

    request_id: str
    index: int = 0  # choice index (n > 1)
    text: str = ""  # decoded text; never a broken UTF-8 sequence
    tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[dict[str, Any], ...] = ()  # OpenAI tool_call delta objects


@message("infer.choice_end")
@dataclass(frozen=True, slots=True, kw_only=True)
class ChoiceEnd:
    request_id: str
    index: int = 0
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "cancelled"]
    completion_tokens: int = 0
    token_ids: tuple[int, ...] = ()  # output token ids, for verification of work
    # encode(trust.OutputAttestation) signed by the node over the prompt ids and the first
    # trust.evidence.ATTESTED_TOKENS output ids (choice 0, nodes with an identity): spot-check evidence
    attestation: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@message("infer.embeddings")
@dataclass(frozen=True, slots=True, kw_only=True)
class Embeddings:
    """Node -> client: all vectors, float32 little-endian, row-major, normalized."""

    request_id: str
    dim: int
    count: int
    vectors: bytes  # count * dim * 4 bytes
    prompt_tokens: int

    def __post_init__(self) -> None:
        if self.dim < 0 or self.count < 0 or len(self.vectors) != self.dim * self.count * 4:
            raise ValueError("vectors length does not match count * dim * 4")


@message("infer.done")
@dataclass(frozen=True, slots=True, kw_only=True)
class Done:
    """Node -> client: last frame of a served request."""

    request_id: str
    usage: Usage
    load: NodeLoad
    receipt: bytes = b""  # the node's signed voucher frame, when a lane is in use


@message("infer.error")
@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorFrame:
    """Either side: the request failed. `code` is one of the names below."""

    request_id: str
    code: Literal[
        "bad_request",
        "model_not_found",
        "no_capacity",
        "context_length_exceeded",
        "version_mismatch",
        "payment_required",
        "internal",
        "cancelled",
    ]
    message: str
    param: str | None = None
    retry_after_s: float | None = None


@message("status.request")
@dataclass(frozen=True, slots=True, kw_only=True)
class StatusRequest:
    version: str = PROTOCOL_VERSION


@message("status.reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class StatusReply:
    version: str  # software version
    protocol: str  # PROTOCOL_VERSION
    load: NodeLoad
    models: tuple[str, ...] = ()
