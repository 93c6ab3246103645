"""Inference: the model catalog, GGUF conversion, test models, embeddings and the generation engine.

Public API of the model side (the engine's own names live in `darkbloom.inference.engine`):

- `catalog`: `resolve_models(config, prepare=False) -> list[ModelInfo]`, `prepare_bundled(models_dir, ...)`,
  `find_model(infos, id)`, `models_dir(config)`, `BUNDLED`.
- `testmodel.make_test_model(dir, size="tiny"|"small", seed=0) -> Path`.
- `bert.Embedder(model_dir)`: `.embed(texts) -> (float32 [n, dim], prompt_tokens)`, `.dim`, `.max_tokens`.
- `digest.weights_digest(model_dir) -> "sha256:..."`; `blas.ensure_blas()` before importing mlx.

Modules that import mlx (bert, engine) are loaded lazily, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from darkbloom.inference.blas import ensure_blas
from darkbloom.inference.catalog import (
    BUNDLED,
    ModelInfo,
    PrepareResult,
    find_model,
    model_info,
    models_dir,
    prepare_bundled,
    resolve_models,
)
from darkbloom.inference.digest import weights_digest

__all__ = [
    "BUNDLED",
    "Embedder",
    "ModelInfo",
    "PrepareResult",
    "ensure_blas",
    "find_model",
    "make_test_model",
    "model_info",
    "models_dir",
    "prepare_bundled",
    "resolve_models",
    "weights_digest",
]

_LAZY = {"Embedder": "darkbloom.inference.bert", "make_test_model": "darkbloom.inference.testmodel"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
