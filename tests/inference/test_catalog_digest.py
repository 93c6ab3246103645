"""Weights digest: covers every weight file, cached by size and mtime, recomputed when a file changes."""

from __future__ import annotations

import json
import os

import pytest

from darkbloom.errors import InferenceError
from darkbloom.inference import digest as digest_mod
from darkbloom.inference.digest import CACHE_NAME, compute_digest, weight_files, weights_digest


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model-00001-of-00002.safetensors").write_bytes(b"A" * 1000)
    (d / "model-00002-of-00002.safetensors").write_bytes(b"B" * 500)
    (d / "config.json").write_text("{}")
    return d


def test_digest_is_cached_and_not_recomputed(model_dir, monkeypatch):
    first = weights_digest(model_dir)
    assert first.startswith("sha256:")
    cache = json.loads((model_dir / CACHE_NAME).read_text())
    assert cache["digest"] == first and len(cache["files"]) == 2

    def boom(files, progress=None):
        raise AssertionError("recomputed although nothing changed")

    monkeypatch.setattr(digest_mod, "compute_digest", boom)
    assert weights_digest(model_dir) == first


def test_digest_reports_progress_in_mb_and_matches_the_silent_one(tmp_path):
    d = tmp_path / "big"
    d.mkdir()
    (d / "model.safetensors").write_bytes(os.urandom(3 << 20))  # 3 MB: several reads of the file
    seen: list[tuple[int, int]] = []
    with_progress = weights_digest(d, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1] == (3, 3) and all(t == 3 for _, t in seen)
    assert [x for x, _ in seen] == sorted(x for x, _ in seen)
    assert with_progress == compute_digest(weight_files(d))
    seen.clear()
    assert weights_digest(d, progress=lambda done, total: seen.append((done, total))) == with_progress
    assert seen == []  # cached: nothing to follow


def test_digest_changes_when_a_weight_file_changes(model_dir):
    first = weights_digest(model_dir)
    path = model_dir / "model-00002-of-00002.safetensors"
    before = path.stat()
    path.write_bytes(b"C" * 500)  # same size, new bytes
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    second = weights_digest(model_dir)
    assert second != first
    assert second == compute_digest(weight_files(model_dir))
    path.write_bytes(b"C" * 501)  # new size
    assert weights_digest(model_dir) not in (first, second)


def test_digest_ignores_non_weight_files_but_not_renames(model_dir):
    first = weights_digest(model_dir)
    (model_dir / "config.json").write_text('{"changed": true}')
    assert weights_digest(model_dir) == first
    (model_dir / "model-00002-of-00002.safetensors").rename(model_dir / "model-00003-of-00002.safetensors")
    assert weights_digest(model_dir) != first


def test_corrupt_cache_is_recomputed(model_dir):
    first = weights_digest(model_dir)
    (model_dir / CACHE_NAME).write_text("{not json")
    assert weights_digest(model_dir) == first
    (model_dir / CACHE_NAME).write_text(json.dumps({"files": [], "digest": "sha256:forged"}))
    assert weights_digest(model_dir) == first


def test_read_only_model_dir_uses_fallback_cache(model_dir, tmp_path, monkeypatch):
    # Root may write anywhere, so simulate a read-only model dir (e.g. site-packages) instead.
    real_access = os.access
    monkeypatch.setattr(digest_mod.os, "access", lambda p, mode: False if p == model_dir else real_access(p, mode))
    first = weights_digest(model_dir, fallback_dir=tmp_path / "cache")
    assert not (model_dir / CACHE_NAME).exists()
    assert [p.name.startswith("digest-") for p in (tmp_path / "cache").iterdir()] == [True]

    def boom(files, progress=None):
        raise AssertionError("recomputed although nothing changed")

    monkeypatch.setattr(digest_mod, "compute_digest", boom)
    assert weights_digest(model_dir, fallback_dir=tmp_path / "cache") == first


def test_no_weights_is_an_error(tmp_path):
    with pytest.raises(InferenceError, match="no \\*.safetensors"):
        weights_digest(tmp_path)
