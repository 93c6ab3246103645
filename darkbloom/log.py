"""Logging set-up, done once per process: our loggers and libp2p's on one handler.

`import libp2p` sets its logger's `propagate=False` and logs a WARNING on every normal DHT
stream EOF; `configure` gives it our handler and lifts its threshold so that noise stays out
unless -v is given. Prompts, outputs and keys never appear in logs at any level: log ids,
model names, token counts and timings only.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["configure", "short_id"]

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_configured = False


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at each record, not the one it was created with: a
    program that swaps stderr (pytest's capture does, per test) would otherwise leave the handler
    writing to a closed file, and every later record would print a "Logging error"."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


def configure(level: str | int = "INFO", *, stream=None) -> None:
    """Install one stderr handler on the root logger and on `libp2p`. Idempotent."""
    global _configured
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            level = logging.INFO
    root = logging.getLogger()
    # `import libp2p` (done lazily, after this runs) clears the libp2p logger's handlers and
    # stops propagation, which leaves its warnings to Python's last-resort handler: they
    # would print bare lines such as "Failed to read DHT message from stream" on every
    # normal EOF. Every logger of ours propagates to the root handler, so nothing else
    # relies on the last resort. A NullHandler, not None: with None, Python prints "No handlers
    # could be found for logger ..." once per such logger instead.
    logging.lastResort = logging.NullHandler()
    if not _configured:
        handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
        lib = logging.getLogger("libp2p")
        lib.propagate = False
        lib.handlers[:] = [handler]
        _configured = True
    root.setLevel(level)
    logging.getLogger("darkbloom").setLevel(level)
    # libp2p is chatty at WARNING about normal events; show it only when debugging.
    logging.getLogger("libp2p").setLevel(logging.DEBUG if level <= logging.DEBUG else logging.ERROR)
    for noisy in ("hypercorn.access", "httpx", "httpcore", "multiaddr", "quart"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def short_id(peer_id: str | bytes) -> str:
    """The last 8 characters of a peer id (or 8 hex chars of a key), for log lines."""
    if isinstance(peer_id, bytes):
        return peer_id.hex()[:8]
    return str(peer_id)[-8:]
