"""Pure admission and scheduling decisions of the engine (darkbloom.inference.batching)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from darkbloom.errors import InvalidRequest, NoCapacity
from darkbloom.inference.batching import check_admission, clamp_max_tokens, prompt_cache_budget_bytes, startable


def test_admission_until_slots_and_queue_are_full() -> None:
    for in_flight in range(6):
        check_admission(in_flight, 1, max_concurrent=2, max_queue=4)
    with pytest.raises(NoCapacity):
        check_admission(6, 1, max_concurrent=2, max_queue=4)


def test_more_choices_than_slots_is_a_bad_request() -> None:
    with pytest.raises(InvalidRequest) as info:
        check_admission(0, 3, max_concurrent=2, max_queue=10)
    assert info.value.param == "n"


def test_startable_is_fifo_without_overtaking() -> None:
    assert startable([1, 1, 1], running_seqs=0, max_concurrent=2) == 2
    assert startable([3, 1], running_seqs=0, max_concurrent=4) == 2
    assert startable([3, 1], running_seqs=2, max_concurrent=4) == 0  # the 1 does not jump the 3
    assert startable([], running_seqs=0, max_concurrent=4) == 0


@given(st.lists(st.integers(1, 4), max_size=10), st.integers(0, 8), st.integers(1, 8))
def test_startable_never_overfills(waiting: list[int], running: int, cap: int) -> None:
    running = min(running, cap)
    k = startable(waiting, running, cap)
    assert 0 <= k <= len(waiting)
    assert running + sum(waiting[:k]) <= cap
    if k < len(waiting):
        assert running + sum(waiting[: k + 1]) > cap  # it stopped only because the next one does not fit


def test_clamp_max_tokens() -> None:
    assert clamp_max_tokens(100, None, default=512, context_length=2048) == 512
    assert clamp_max_tokens(2000, None, default=512, context_length=2048) == 48
    assert clamp_max_tokens(2048, None, default=512, context_length=2048) is None
    assert clamp_max_tokens(100, 1948, default=512, context_length=2048) == 1948
    assert clamp_max_tokens(100, 1949, default=512, context_length=2048) is None


def test_prompt_cache_budget_counts_against_the_node_memory_limit() -> None:
    assert prompt_cache_budget_bytes(256) == 256 << 20
    assert prompt_cache_budget_bytes(256, max_memory_mb=0) == 256 << 20  # no node limit
    assert prompt_cache_budget_bytes(256, max_memory_mb=4096) == 256 << 20
    assert prompt_cache_budget_bytes(256, max_memory_mb=512) == 128 << 20  # a quarter of the limit
    assert prompt_cache_budget_bytes(0, max_memory_mb=4096) == 0
    assert prompt_cache_budget_bytes(-5) == 0


def test_engine_options_carry_the_prompt_cache_budget() -> None:
    from darkbloom.config import InferenceConfig, NodeConfig
    from darkbloom.inference.engine import engine_options

    assert InferenceConfig().prompt_cache_mb == 256
    assert engine_options(InferenceConfig())["prompt_cache_bytes"] == 256 << 20
    opts = engine_options(InferenceConfig(prompt_cache_mb=1024), NodeConfig(max_memory_mb=2000))
    assert opts["prompt_cache_bytes"] == 500 << 20
