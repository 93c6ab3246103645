"""Server-sent events exactly as OpenAI writes them: `data: <json>\\n\\n`, ending with `data: [DONE]`."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["DONE", "sse_data", "sse_error"]

DONE = b"data: [DONE]\n\n"


def sse_data(obj: dict[str, Any]) -> bytes:
    """One event; compact JSON on one line (JSON never contains a raw newline)."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def sse_error(error_body: dict[str, Any]) -> bytes:
    """The in-stream error event the official SDK turns into an `APIError`."""
    return sse_data(error_body)
