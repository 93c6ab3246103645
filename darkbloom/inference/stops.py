"""Stop strings on decoded text: emit everything before the first stop, nothing after it.

Matching is on text, not tokens, so a stop string is found however the model happened to
tokenize it. Text that could still turn out to be the start of a stop string is held back
until the next piece decides it. Semantics: the stop that *completes* first wins; among stops
completing at the same character, the one starting earliest. Feeding the same text in any
split gives the same output as feeding it whole (tests/inference/test_stops.py checks this).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopMatcher", "partial_suffix_len", "find_first_stop"]


def partial_suffix_len(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


def find_first_stop(text: str, stops: Sequence[str]) -> tuple[int, int] | None:
    """(start, end) of the stop occurrence that ends first in `text`, or None."""
    best: tuple[int, int] | None = None
    for s in stops:
        i = text.find(s)
        if i < 0:
            continue
        cand = (i + len(s), i)
        if best is None or cand < (best[1], best[0]):
            best = (i, i + len(s))
    return best


class StopMatcher:
    """Feed text deltas; get back the text safe to emit and whether a stop was hit."""

    __slots__ = ("stops", "_held", "stopped")

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text to emit now, stopped). After a stop, further input is ignored."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        hit = find_first_stop(buf, self.stops)
        if hit is not None:
            self._held = ""
            self.stopped = True
            return buf[: hit[0]], True
        keep = partial_suffix_len(buf, self.stops)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """At the end of generation: the held-back text (it never became a stop)."""
        out, self._held = self._held, ""
        return "" if self.stopped else out

    @property
    def held(self) -> str:
        return self._held
