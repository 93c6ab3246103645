"""Incremental detokenization: token ids in, text deltas out, never a broken UTF-8 character.

mlx-lm's streaming detokenizers drop the first leading space of an answer (right for some chat
UIs, wrong for completions: "Once upon a time" + " there" must not become "Once upon a
timethere"). This one is exact: the concatenated deltas always equal `tokenizer.decode(ids)`.
It decodes a short sliding window (the last few tokens) and emits only text that later tokens
cannot change; a window ending inside a multi-byte character ("\\ufffd" at its end) waits.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IncrementalDecoder"]


class IncrementalDecoder:
    """Feed ids with `add`, which returns the new text; `finish` returns what is left."""

    __slots__ = ("_decode", "ids", "_prefix", "_read", "emitted")

    def __init__(self, tokenizer: Any) -> None:
        self._decode = tokenizer.decode
        self.ids: list[int] = []
        self._prefix = 0  # window start: text before it is final
        self._read = 0  # tokens whose text has been emitted
        self.emitted = 0  # characters emitted so far

    def add(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self._prefix : self._read]) if self._read > self._prefix else ""
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix = self._read
            self._read = len(self.ids)
            self.emitted += len(delta)
            return delta
        return ""

    def finish(self) -> str:
        """The held-back rest (a trailing partial character comes out as U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read]) if self._read > self._prefix else ""
        new_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        delta = new_text[len(prefix_text) :]
        self.emitted += len(delta)
        return delta
