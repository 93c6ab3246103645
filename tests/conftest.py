"""Shared pytest fixtures."""

import pytest

# --- models (darkbloom.inference.catalog / testmodel) ------------------------------------------
# Shared, session-scoped model directories for engine, API and node tests.
#   tiny_model_dir   random llama ~1M params, real BPE tokenizer, ChatML+tools template (seed 0)
#   small_model_dir  the same recipe at ~20M params
#   bundled_models_dir  the prepared bundled models: $DARKBLOOM_INFERENCE_MODELS_DIR or
#                    ~/.cache/darkbloom/models (what `make setup` prepares); prepared here if needed
#   smollm2_dir      bundled_models_dir / "smollm2-135m-instruct" (real chat model, float32 on Linux)
#   minilm_dir       bundled_models_dir / "all-minilm-l6-v2" (real embedding model)
from darkbloom.inference.blas import ensure_blas as _ensure_blas  # noqa: E402

_ensure_blas()  # before any test imports mlx, so MLX uses OpenBLAS (no mlx import here)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from darkbloom.inference.testmodel import make_test_model

    return make_test_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory):
    from darkbloom.inference.testmodel import make_test_model

    return make_test_model(tmp_path_factory.mktemp("models") / "small", "small", seed=0)


@pytest.fixture(scope="session")
def bundled_models_dir():
    import os

    from darkbloom.config import load_config
    from darkbloom.inference.catalog import models_dir, prepare_bundled

    key = "DARKBLOOM_INFERENCE_MODELS_DIR"
    root = models_dir(load_config(env={key: os.environ[key]} if os.environ.get(key) else {}).inference)
    prepare_bundled(root)  # a no-op when already prepared (stamp + digest cache)
    return root


@pytest.fixture(scope="session")
def smollm2_dir(bundled_models_dir):
    return bundled_models_dir / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def minilm_dir(bundled_models_dir):
    return bundled_models_dir / "all-minilm-l6-v2"
