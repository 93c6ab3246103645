"""The exception tree: every error Darkbloom raises on purpose.

    DarkbloomError
    ├── ConfigError                 bad config file, env var or flag
    │   └── IdentityError           key file missing, corrupt or readable by others
    ├── MalformedMessage            a wire frame or message failed strict decoding
    ├── P2PError
    │   ├── PeerUnreachable         no path to a peer (direct or relayed)
    │   ├── ProtocolMismatch        the peer speaks another protocol version
    │   ├── RecordRejected          a capability record failed validation
    │   └── StreamClosed            the remote ended a stream mid-exchange
    ├── InferenceError
    │   ├── ModelNotFound           no such model in the catalog
    │   ├── NoCapacity              queue full or no free slot
    │   ├── InvalidRequest          bad parameters; carries the offending `param`
    │   │   └── ContextLengthExceeded
    │   ├── EngineFailed            the engine thread died or a model failed to load
    │   └── ModelUnavailable        a model's files are missing, corrupt or not prepared
    ├── LedgerError
    │   ├── InvalidSignature        a signature did not verify
    │   ├── ReceiptReplay           the same or an older voucher
    │   ├── InsufficientFunds       a balance or a reservation would go negative
    │   ├── UnknownLane             a voucher names a lane the ledger never opened
    │   ├── VoucherRejected         any other reason a voucher is refused
    │   └── EvidenceRejected        a spot-check report that proves nothing (forged, stale, self-made)
    │       └── LaneBusy            the lane is serving another request (use another lane)
    └── ApiError                    raised by the shim with an OpenAI status/type

Carry structured fields, never parse messages. Translate once per boundary.
"""

from __future__ import annotations

__all__ = [
    "DarkbloomError",
    "ConfigError",
    "IdentityError",
    "MalformedMessage",
    "P2PError",
    "PeerUnreachable",
    "ProtocolMismatch",
    "RecordRejected",
    "StreamClosed",
    "InferenceError",
    "ModelNotFound",
    "NoCapacity",
    "InvalidRequest",
    "ContextLengthExceeded",
    "EngineFailed",
    "ModelUnavailable",
    "LedgerError",
    "InvalidSignature",
    "ReceiptReplay",
    "InsufficientFunds",
    "UnknownLane",
    "VoucherRejected",
    "EvidenceRejected",
    "LaneBusy",
    "ApiError",
]


class DarkbloomError(Exception):
    """Root of every error Darkbloom raises on purpose.

    `hint` says what the user can do about it; the CLI prints it after the message.
    """

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint


# --- config -----------------------------------------------------------------


class ConfigError(DarkbloomError):
    """A config file, environment variable or flag is wrong."""

    def __init__(self, message: str, *, key: str = "", source: str = "", hint: str = "") -> None:
        where = f"{source}: " if source else ""
        what = f"{key}: " if key else ""
        super().__init__(f"{where}{what}{message}", hint=hint)
        self.key = key
        self.source = source


class IdentityError(ConfigError):
    """The role's identity key cannot be used."""


# --- wire -------------------------------------------------------------------


class MalformedMessage(DarkbloomError):
    """A frame or message failed strict decoding; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"malformed message: {reason}")
        self.reason = reason


# --- p2p --------------------------------------------------------------------


class P2PError(DarkbloomError):
    """Base for network-layer failures."""


class PeerUnreachable(P2PError):
    def __init__(self, peer_id: str, reason: str = "") -> None:
        super().__init__(f"peer {peer_id[-8:]} unreachable" + (f": {reason}" if reason else ""))
        self.peer_id = peer_id
        self.reason = reason


class ProtocolMismatch(P2PError):
    def __init__(self, peer_id: str, wanted: str, offered: str = "") -> None:
        super().__init__(
            f"peer {peer_id[-8:]} does not speak {wanted}" + (f" (offers {offered})" if offered else ""),
            hint="upgrade darkbloom on one side",
        )
        self.peer_id = peer_id
        self.wanted = wanted
        self.offered = offered


class RecordRejected(P2PError):
    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"record {key} rejected: {reason}")
        self.key = key
        self.reason = reason


class StreamClosed(P2PError):
    def __init__(self, peer_id: str = "", reason: str = "") -> None:
        super().__init__(f"stream closed by peer {peer_id[-8:]}" + (f": {reason}" if reason else ""))
        self.peer_id = peer_id
        self.reason = reason


# --- inference --------------------------------------------------------------


class InferenceError(DarkbloomError):
    """Base for model and engine failures."""


class ModelNotFound(InferenceError):
    def __init__(self, model: str, available: tuple[str, ...] = ()) -> None:
        avail = f"; available: {', '.join(available)}" if available else ""
        super().__init__(f"model {model!r} not found{avail}")
        self.model = model
        self.available = tuple(available)


class NoCapacity(InferenceError):
    def __init__(self, reason: str = "all slots busy and the queue is full", *, retry_after_s: float = 1.0) -> None:
        super().__init__(reason, hint="retry later or lower concurrency")
        self.reason = reason
        self.retry_after_s = retry_after_s


class InvalidRequest(InferenceError):
    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(InvalidRequest):
    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int) -> None:
        super().__init__(
            f"this model's maximum context length is {context_length} tokens; the request has "
            f"{prompt_tokens} prompt tokens and asks for {max_tokens} more: shorten the messages "
            f"or lower max_tokens",
            param="messages",
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length


class EngineFailed(InferenceError):
    """The engine thread died or a model failed to load."""


class ModelUnavailable(InferenceError):
    """A model cannot be used: its source is missing or corrupt, or it was never prepared."""

    def __init__(self, model: str, reason: str, *, path: str = "", hint: str = "") -> None:
        where = f" ({path})" if path else ""
        super().__init__(f"model {model!r}{where}: {reason}", hint=hint)
        self.model = model
        self.reason = reason
        self.path = path


# --- ledger -----------------------------------------------------------------


class LedgerError(DarkbloomError):
    """Base for receipt and settlement failures."""


class InvalidSignature(LedgerError):
    def __init__(self, what: str, signer: str = "") -> None:
        super().__init__(f"invalid signature on {what}" + (f" by {signer[:16]}" if signer else ""))
        self.what = what
        self.signer = signer


class ReceiptReplay(LedgerError):
    def __init__(self, lane: str, seq: int, settled_seq: int) -> None:
        super().__init__(f"lane {lane[:16]}: voucher seq {seq} is not above settled seq {settled_seq}")
        self.lane = lane
        self.seq = seq
        self.settled_seq = settled_seq


class InsufficientFunds(LedgerError):
    def __init__(self, account: str, needed: int, available: int) -> None:
        super().__init__(
            f"account {account[:16]} needs {needed} but has {available}",
            hint="deposit credits with `darkbloom ledger deposit`",
        )
        self.account = account
        self.needed = needed
        self.available = available


class UnknownLane(LedgerError):
    def __init__(self, lane: str) -> None:
        super().__init__(f"unknown lane {lane[:16]}")
        self.lane = lane


class VoucherRejected(LedgerError):
    def __init__(self, lane: str, reason: str) -> None:
        super().__init__(f"lane {lane[:16]}: voucher rejected: {reason}")
        self.lane = lane
        self.reason = reason


class EvidenceRejected(LedgerError):
    def __init__(self, suspect: str, reason: str) -> None:
        super().__init__(f"spot-check report on {suspect[:16]} refused: {reason}")
        self.suspect = suspect
        self.reason = reason


class LaneBusy(VoucherRejected):
    """The node is still serving another request on this lane; another lane (or a moment later) works."""

    def __init__(self, lane: str) -> None:
        super().__init__(lane, "the lane is serving another request")


# --- api --------------------------------------------------------------------


class ApiError(DarkbloomError):
    """An error the shim answers with an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s
