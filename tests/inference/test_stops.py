"""Stop strings on streamed text: never past a stop, never losing text before it, split-invariant."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from darkbloom.inference.stops import StopMatcher, find_first_stop, partial_suffix_len


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """What the whole text should give: everything before the earliest-ending stop."""
    hit = find_first_stop(text, stops)
    return (text, False) if hit is None else (text[: hit[0]], True)


def stream(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = []
    hit = False
    for p in pieces:
        emitted, hit = m.feed(p)
        out.append(emitted)
        if hit:
            break
    if not hit:
        out.append(m.flush())
    return "".join(out), hit


def test_stop_inside_one_piece() -> None:
    assert stream(["Hello END world"], ["END"]) == ("Hello ", True)


def test_stop_split_over_pieces_is_found_and_held_back() -> None:
    m = StopMatcher(["</answer>"])
    assert m.feed("The answer is 4</") == ("The answer is 4", False)
    assert m.held == "</"
    assert m.feed("ans") == ("", False)
    assert m.feed("wer> and more") == ("", True)
    assert m.feed("ignored") == ("", True)


def test_false_alarm_is_released() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ("", False)
    assert m.feed("ART") == ("START", False)


def test_held_text_flushes_at_the_end() -> None:
    m = StopMatcher(["\n\n"])
    assert m.feed("line\n") == ("line", False)
    assert m.flush() == "\n"


def test_first_completing_stop_wins() -> None:
    # "bc" completes before "abcd" does, so the text ends before "bc".
    assert stream(["abcd"], ["abcd", "bc"]) == ("a", True)
    assert stream(["a", "b", "c", "d"], ["abcd", "bc"]) == ("a", True)


def test_partial_suffix() -> None:
    assert partial_suffix_len("xxab", ["abc"]) == 2
    assert partial_suffix_len("xxabc", ["abc"]) == 0  # a full match is not a partial one
    assert partial_suffix_len("", ["abc"]) == 0


def test_no_stops_passes_text_through() -> None:
    m = StopMatcher([])
    assert m.feed("anything") == ("anything", False)


alphabet = st.sampled_from(list("ab\n <>é中"))
texts = st.text(alphabet=alphabet, max_size=40)
stop_lists = st.lists(st.text(alphabet=alphabet, min_size=1, max_size=4), min_size=1, max_size=3)


@settings(max_examples=400, deadline=None)
@given(text=texts, stops=stop_lists, cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8))
def test_any_split_gives_the_whole_text_answer(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({c for c in cuts if c <= len(text)} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    got, hit = stream(pieces, stops)
    want, want_hit = reference(text, stops)
    assert (got, hit) == (want, want_hit)
    # Never past a stop: no stop string appears in what was emitted.
    assert not any(s in got for s in stops)
    # Never loses text: the output is a prefix of the input.
    assert text.startswith(got)
