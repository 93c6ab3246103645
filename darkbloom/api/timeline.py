"""One request's timeline: monotonic timestamps at each hop, logged at DEBUG (ids and timings only).

Every role logs `timeline <request id> <event> t=<time.monotonic()>` on the logger
`darkbloom.timeline.<role>` when that logger is enabled for DEBUG; otherwise `mark` costs one
level check. CLOCK_MONOTONIC is shared by every process on one machine, so the lines of the
client, the shim and the node line up (bench/api.py --timeline collects and aligns them).
Never pass prompt or output text: request ids, peer ids, counts and event names only.

Events, in order along the path: shim `http_in` (handler entered), `parsed`, `routed`
(candidate chosen), `lane` (payment lane in hand), `stream_open` (stream negotiated, request
sent), `accepted`, `first_frame` (first content frame read), `sse_first` (first body bytes
handed to the HTTP server); node `stream_in`, `request_read`, `submit` (engine.generate
entered), `admitted` (the engine's Admitted event reached the node's trio loop),
`first_token` (first TextDelta), `first_write` (first Delta written to the stream).
"""

from __future__ import annotations

import logging
import time

__all__ = ["Timeline", "timeline"]


class Timeline:
    """`mark(request_id, event, **fields)` on one role's timeline logger."""

    __slots__ = ("log",)

    def __init__(self, role: str) -> None:
        self.log = logging.getLogger(f"darkbloom.timeline.{role}")

    @property
    def enabled(self) -> bool:
        return self.log.isEnabledFor(logging.DEBUG)

    def mark(self, request_id: str, event: str, *, at: float | None = None, **fields: object) -> None:
        """Log `event` now (or at `at`, an earlier time.monotonic() reading)."""
        if self.log.isEnabledFor(logging.DEBUG):
            extra = "".join(f" {k}={v}" for k, v in fields.items())
            self.log.debug("timeline %s %s t=%.6f%s", request_id, event, time.monotonic() if at is None else at, extra)


def timeline(role: str) -> Timeline:
    return Timeline(role)
