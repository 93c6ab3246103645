"""The MLX BERT embedder against sentence-transformers reference vectors, batching, limits and token counts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from darkbloom.errors import InvalidRequest, ModelUnavailable

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "minilm_reference.json"


@pytest.fixture(scope="module")
def embedder(minilm_dir):
    from darkbloom.inference.bert import Embedder

    return Embedder(minilm_dir, model_id="all-minilm-l6-v2")


def test_matches_sentence_transformers_reference(embedder):
    ref = json.loads(REFERENCE.read_text())
    expected = np.array(ref["vectors"], dtype=np.float32)
    vectors, tokens = embedder.embed(ref["sentences"])
    assert vectors.dtype == np.float32 and vectors.shape == (len(ref["sentences"]), ref["dim"])
    assert embedder.dim == ref["dim"] == 384
    cosine = (vectors * expected).sum(axis=1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(expected, axis=1))
    assert np.all(cosine > 1 - 1e-4), cosine
    assert tokens == embedder.count_tokens(ref["sentences"])


def test_vectors_are_unit_length(embedder):
    vectors, _ = embedder.embed(["short", "a somewhat longer sentence about trains and rivers", "x" * 300])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_batched_equals_single_and_keeps_order(embedder):
    texts = [
        "one",
        "a much longer sentence, so that the batch needs padding for the shorter ones",
        "",
        "two words",
        "Ünïcödé and 数字 1234",
    ]
    singles = np.stack([embedder.embed([t])[0][0] for t in texts])
    old = embedder.max_batch
    try:
        for batch in (2, 64):
            embedder.max_batch = batch
            batched, _ = embedder.embed(texts)
            np.testing.assert_allclose(batched, singles, atol=1e-5)
    finally:
        embedder.max_batch = old
    # Different texts give different vectors (the assertions above could not pass on constants).
    assert float(singles[0] @ singles[1]) < 0.9


def test_token_counting_includes_cls_and_sep(embedder):
    _, tokens = embedder.embed([""])
    assert tokens == 2
    _, tokens = embedder.embed(["hello world", "hello"])
    assert tokens == (2 + 2) + (2 + 1)
    assert embedder.count_tokens(["hello world", "hello"]) == tokens


def test_too_long_input_is_refused_not_truncated(embedder):
    limit = embedder.max_tokens
    assert limit == 512
    fits = " ".join(["word"] * (limit - 2))
    _, tokens = embedder.embed([fits])
    assert tokens == limit
    with pytest.raises(InvalidRequest) as err:
        embedder.embed(["ok", fits + " word"])
    assert err.value.param == "input" and "input[1]" in str(err.value) and "513 tokens" in str(err.value)


@pytest.mark.parametrize("bad", [[], "a bare string", ["ok", 3], None])
def test_bad_input_is_invalid_request(embedder, bad):
    with pytest.raises(InvalidRequest) as err:
        embedder.embed(bad)
    assert err.value.param == "input"


def test_not_a_bert_dir_is_model_unavailable(tmp_path, tiny_model_dir, minilm_dir):
    from darkbloom.inference.bert import Embedder

    with pytest.raises(ModelUnavailable, match="not a BERT encoder"):
        Embedder(tiny_model_dir)
    broken = tmp_path / "broken"
    shutil.copytree(minilm_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ModelUnavailable, match="weights do not fit"):
        Embedder(broken)
