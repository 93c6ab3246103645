"""Weights digest of a model directory: sha256 over its weight files, cached by size and mtime.

The digest is what a node advertises and what a client may pin. It covers every
`*.safetensors` file (sorted by name; each contributes its name, its size and its bytes), so
renaming, truncating or editing any weight file changes it. Hashing 500 MB takes a couple of
seconds, so the result is cached in `.darkbloom-digest.json` inside the directory (or in a
fallback cache dir when the model directory is read-only), keyed by each file's size and
mtime_ns: an unchanged directory is never re-read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from darkbloom.errors import InferenceError

__all__ = ["CACHE_NAME", "DIGEST_PREFIX", "weight_files", "weights_digest", "compute_digest"]

log = logging.getLogger(__name__)

CACHE_NAME = ".darkbloom-digest.json"
DIGEST_PREFIX = "sha256:"
_CHUNK = 1 << 20


def weight_files(model_dir: Path) -> list[Path]:
    """The files the digest covers, sorted by name."""
    return sorted(p for p in Path(model_dir).glob("*.safetensors") if p.is_file())


def _fingerprint(files: list[Path]) -> list[list]:
    out = []
    for p in files:
        st = p.stat()
        out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def compute_digest(files: list[Path], progress: Callable[[int, int], None] | None = None) -> str:
    """Hash the files' names, sizes and bytes; no cache. `progress(mb_done, mb_total)` as it reads."""
    h = hashlib.sha256()
    total = sum(p.stat().st_size for p in files)
    done = 0
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done >> 20, total >> 20)
    return DIGEST_PREFIX + h.hexdigest()


def _cache_path(model_dir: Path, fallback_dir: Path | None) -> Path:
    inside = model_dir / CACHE_NAME
    if os.access(model_dir, os.W_OK) or fallback_dir is None:
        return inside
    key = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:16]
    return fallback_dir / f"digest-{key}.json"


def weights_digest(model_dir: str | Path, *, fallback_dir: Path | None = None,
                   progress: Callable[[int, int], None] | None = None) -> str:
    """The model's weights digest, from the cache when no weight file changed size or mtime.

    Raises `InferenceError` when the directory holds no `*.safetensors` file.
    """
    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    if not files:
        raise InferenceError(
            f"{model_dir} holds no *.safetensors weight files",
            hint="point the model's path at an mlx-lm model directory",
        )
    fingerprint = _fingerprint(files)
    cache = _cache_path(model_dir, fallback_dir)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("files") == fingerprint and str(cached.get("digest", "")).startswith(DIGEST_PREFIX):
            return cached["digest"]
    except (OSError, ValueError, AttributeError):
        pass  # no cache or an unreadable one: recompute below
    digest = compute_digest(files, progress)
    log.info("weights digest of %s computed: %s", model_dir.name, digest[:19])
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.write_text(json.dumps({"files": fingerprint, "digest": digest}))
        os.replace(tmp, cache)
    except OSError as exc:  # a read-only model dir without fallback: work, just slower next time
        log.warning("cannot cache the weights digest of %s: %s", model_dir.name, exc.strerror)
    return digest
