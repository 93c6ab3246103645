"""The single table from exception to OpenAI error object and HTTP status.

Every error the shim answers goes through `to_api_error`: a Darkbloom exception (or an
`ApiError` raised by the shim itself) becomes an `ApiError` carrying status, OpenAI `type`,
`code` and `param`; `error_body` renders the JSON the official SDK parses, and `error_headers`
adds `Retry-After` (429/503) and `x-should-retry` (so the SDK does not retry what cannot work).
Anything not in the table is a bug: 500 `server_error` with no detail leaked.
"""

from __future__ import annotations

import math
from typing import Any

from darkbloom.errors import (
    ApiError,
    ContextLengthExceeded,
    EngineFailed,
    InsufficientFunds,
    InvalidRequest,
    LedgerError,
    MalformedMessage,
    ModelNotFound,
    NoCapacity,
    P2PError,
)

__all__ = [
    "all_busy",
    "error_body",
    "error_headers",
    "invalid_api_key",
    "no_provider",
    "rate_limited",
    "to_api_error",
    "too_large",
    "unsupported",
    "upstream_failed",
]


# --- constructors for the shim's own errors ----------------------------------------------


def invalid_api_key(reason: str = "Incorrect API key provided.") -> ApiError:
    return ApiError(401, reason, type="invalid_request_error", code="invalid_api_key")


def too_large(limit_bytes: int) -> ApiError:
    return ApiError(
        413,
        f"request body is larger than the {limit_bytes}-byte limit: send a shorter prompt",
        type="invalid_request_error",
        code="request_too_large",
    )


def rate_limited(what: str, retry_after_s: float) -> ApiError:
    return ApiError(
        429,
        f"rate limit reached for {what}: retry after {math.ceil(retry_after_s)} s",
        type="requests",
        code="rate_limit_exceeded",
        retry_after_s=retry_after_s,
    )


def no_provider(model: str, detail: str = "") -> ApiError:
    extra = f" ({detail})" if detail else ""
    return ApiError(503, f"no provider for model {model}{extra}", type="server_error", code="no_provider")


def all_busy(model: str, retry_after_s: float = 1.0) -> ApiError:
    return ApiError(
        503,
        f"all providers busy for model {model}: retry shortly",
        type="server_error",
        code="all_providers_busy",
        retry_after_s=retry_after_s,
    )


def upstream_failed(model: str, attempts: int, last: str) -> ApiError:
    return ApiError(
        503,
        f"all {attempts} providers tried for model {model} failed (last: {last})",
        type="server_error",
        code="providers_failed",
        retry_after_s=1.0,
    )


def unsupported(param: str, why: str = "") -> ApiError:
    return ApiError(
        400,
        f"{param} is not supported by Darkbloom" + (f": {why}" if why else ""),
        type="invalid_request_error",
        code="unsupported_parameter",
        param=param,
    )


# --- the table ----------------------------------------------------------------------------


def to_api_error(exc: BaseException) -> ApiError:
    """Translate once, at the HTTP boundary. Order matters: subclasses before bases."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextLengthExceeded):
        return ApiError(400, str(exc), code="context_length_exceeded", param=exc.param)
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc), code="invalid_value" if exc.param else None, param=exc.param)
    if isinstance(exc, ModelNotFound):
        return ApiError(
            404,
            f"The model `{exc.model}` does not exist or no provider serves it.",
            code="model_not_found",
            param="model",
        )
    if isinstance(exc, NoCapacity):
        return ApiError(
            503, f"provider busy: {exc.reason}", type="server_error", code="all_providers_busy",
            retry_after_s=exc.retry_after_s,
        )
    if isinstance(exc, InsufficientFunds):
        return ApiError(429, "your account's credit at the ledger cannot cover this request: deposit credits",
                        type="insufficient_quota", code="insufficient_quota")
    if isinstance(exc, LedgerError):
        return ApiError(503, f"the ledger refused to open a payment lane: {exc}", type="server_error",
                        code="ledger_unavailable")
    if isinstance(exc, (P2PError, MalformedMessage, EngineFailed)):
        return ApiError(502, f"provider failed: {exc}", type="server_error", code="provider_failed")
    return ApiError(500, "internal error in the shim", type="server_error", code="internal_error")


def error_body(err: ApiError) -> dict[str, Any]:
    """The OpenAI error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": str(err), "type": err.type, "param": err.param, "code": err.code}}


def error_headers(err: ApiError) -> dict[str, str]:
    headers: dict[str, str] = {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    if err.status in (429, 503) and err.retry_after_s is not None:
        headers["x-should-retry"] = "true"
    elif err.status in (400, 401, 404, 413, 503):
        # Retrying cannot help (bad input, no provider at all): tell the SDK not to.
        headers["x-should-retry"] = "false"
    return headers
