"""darkbloom/log.py: one handler, writing to the stderr of the moment."""

from __future__ import annotations

import io
import logging
import sys

from darkbloom.log import configure


def test_logging_follows_stderr_when_it_is_swapped(monkeypatch) -> None:
    # pytest swaps sys.stderr per test and closes the old one; a handler bound to the stream it
    # was created with would then fail on every record ("Logging error ... closed file").
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure("INFO")
    log = logging.getLogger("darkbloom.test_log")
    log.info("to the first stream")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    log.info("to the second stream")
    text = second.getvalue()
    assert "darkbloom.test_log: to the second stream" in text
    assert "Logging error" not in text and "to the first stream" not in text


def test_an_explicit_stream_is_kept(monkeypatch) -> None:
    import darkbloom.log as dlog

    monkeypatch.setattr(dlog, "_configured", False)
    root = logging.getLogger()
    before = list(root.handlers)
    out = io.StringIO()
    try:
        configure("INFO", stream=out)
        monkeypatch.setattr(sys, "stderr", io.StringIO())
        logging.getLogger("darkbloom.test_log").info("kept")
        assert "kept" in out.getvalue()
    finally:
        for h in root.handlers[:]:
            if h not in before:
                root.removeHandler(h)
