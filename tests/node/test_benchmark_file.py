"""The node keeps its self-benchmark in its data dir so later starts skip the measurement."""

from __future__ import annotations

from darkbloom.config import Config
from darkbloom.inference.selfbench import BenchResult
from darkbloom.node.daemon import BENCHMARK_KEEP_S, BenchmarkFile, _benchmark_key

RESULT = BenchResult(prefill_tps=812.5, decode_tps=41.25, prompt_tokens=128, decode_tokens=24)


class Model:
    def __init__(self, digest: str) -> None:
        self.digest = digest


def test_a_kept_result_comes_back_until_it_is_a_week_old(tmp_path):
    kept = BenchmarkFile(tmp_path / "self-benchmark.json")
    assert kept.get("k", 1000.0) is None
    kept.put("k", RESULT, 1000.0)
    assert BenchmarkFile(tmp_path / "self-benchmark.json").get("k", 1000.0 + BENCHMARK_KEEP_S) == RESULT
    assert kept.get("k", 1000.0 + BENCHMARK_KEEP_S + 1) is None
    assert kept.get("other", 1000.0) is None


def test_a_damaged_file_means_measure_again(tmp_path):
    path = tmp_path / "self-benchmark.json"
    path.write_text("{not json")
    kept = BenchmarkFile(path)
    assert kept.get("k", 0.0) is None
    kept.put("k", RESULT, 0.0)  # and it is replaced by a good one
    assert kept.get("k", 0.0) == RESULT
    path.write_text('{"k": {"prefill_tps": "fast"}}')
    assert kept.get("k", 0.0) is None


def test_the_key_changes_with_the_weights_and_the_engine_settings():
    import dataclasses

    config = Config()
    slower = dataclasses.replace(config, inference=dataclasses.replace(config.inference, blas_threads=4))
    stock = dataclasses.replace(config, inference=dataclasses.replace(config.inference, native_jit=False))
    keys = {_benchmark_key(config, Model("sha256:aa")), _benchmark_key(config, Model("sha256:bb")),
            _benchmark_key(slower, Model("sha256:aa")), _benchmark_key(stock, Model("sha256:aa"))}
    assert len(keys) == 4
