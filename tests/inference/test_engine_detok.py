"""Incremental detokenization with a real byte-level BPE tokenizer: deltas always add up to decode(ids)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from darkbloom.inference.detok import IncrementalDecoder


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tiny_model_dir / "tokenizer.json"))


def stream(tokenizer: Any, ids: list[int]) -> list[str]:
    d = IncrementalDecoder(tokenizer)
    out = [d.add(t) for t in ids]
    out.append(d.finish())
    return out


def test_leading_space_of_a_continuation_is_kept(tokenizer: Any) -> None:
    ids = tokenizer.encode(" there was a fox", add_special_tokens=False)
    assert "".join(stream(tokenizer, ids)) == " there was a fox"


def test_multibyte_characters_are_never_split(tokenizer: Any) -> None:
    text = "naïve café — 東京 🦊!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_a_trailing_partial_character_comes_out_at_the_end(tokenizer: Any) -> None:
    ids = tokenizer.encode("🦊", add_special_tokens=False)
    if len(ids) < 2:
        pytest.skip("the emoji is one token in this vocabulary")
    pieces = stream(tokenizer, ids[:-1])
    assert pieces[:-1] == [""] * (len(ids) - 1)  # nothing emitted mid-character
    assert pieces[-1] == tokenizer.decode(ids[:-1])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_deltas_concatenate_to_the_full_decode(tokenizer: Any, data: st.DataObject) -> None:
    vocab = tokenizer.vocab_size
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=30))
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40))
def test_any_text_round_trips(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces[:-1]) or "\ufffd" in text
