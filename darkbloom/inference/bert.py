"""A BERT sentence encoder in MLX and the `Embedder` that serves embeddings with it.

Reads a sentence-transformers style directory (`config.json` of a `bert` model,
`model.safetensors` with Hugging Face BERT tensor names, `tokenizer.json`, and
`1_Pooling/config.json`), runs the encoder, mean-pools the last hidden states over the real
tokens and L2-normalizes: the recipe of all-MiniLM-L6-v2, reproduced to ~1e-7 against
sentence-transformers (see tests/data/minilm_reference.json).

Input length: every input is tokenized with [CLS] and [SEP]; an input longer than the model's
position table (512 tokens for MiniLM, counted with those two) is refused with
`InvalidRequest(param="input")`, as OpenAI's API refuses over-long inputs, rather than being
silently truncated. Note that sentence-transformers itself truncates at `max_seq_length` (256
for this model); for inputs of 257..512 tokens our vector covers the whole text and so differs
from what sentence-transformers would return.

Token counting: `prompt_tokens` counts every token the encoder processed, [CLS] and [SEP]
included. MLX streams are per thread: create and use an Embedder on one thread.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from darkbloom.errors import InvalidRequest, ModelUnavailable
from darkbloom.inference.blas import ensure_blas

ensure_blas()
import mlx.core as mx  # noqa: E402  (OpenBLAS must be loaded first)
import mlx.nn as nn  # noqa: E402

__all__ = ["BertConfig", "BertEncoder", "Embedder", "load_bert"]

log = logging.getLogger(__name__)

MAX_BATCH = 64  # sequences per forward pass; inputs are sorted by length first
MAX_INPUTS = 2048  # texts per request (OpenAI's limit)


@dataclass(frozen=True, slots=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        names = cls.__dataclass_fields__  # type: ignore[attr-defined]
        return cls(**{k: d[k] for k in names if k in d})


class _Attention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.dense = nn.Linear(h, h)
        self.norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, n, h = x.shape
        d = h // self.heads

        def split(t: mx.array) -> mx.array:
            return t.reshape(b, n, self.heads, d).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        ctx = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d), mask=mask)
        ctx = ctx.transpose(0, 2, 1, 3).reshape(b, n, h)
        return self.norm(x + self.dense(ctx))


class _Layer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = self.attention(x, mask)
        return self.norm(x + self.output(nn.gelu(self.intermediate(x))))


class BertEncoder(nn.Module):
    """Embeddings + transformer layers; returns the last hidden states [batch, seq, hidden]."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.embeddings_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = [_Layer(cfg) for _ in range(cfg.num_hidden_layers)]

    def __call__(self, ids: mx.array, attention_mask: mx.array) -> mx.array:
        n = ids.shape[1]
        x = (
            self.word_embeddings(ids)
            + self.position_embeddings(mx.arange(n))[None]
            + self.token_type_embeddings(mx.zeros_like(ids))
        )
        x = self.embeddings_norm(x)
        # Additive mask over keys: padded positions get a large negative score.
        mask = ((1.0 - attention_mask.astype(x.dtype)) * -1e9)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x


def _hf_to_ours(name: str) -> str | None:
    """Hugging Face BertModel tensor name -> BertEncoder parameter name (None: not used)."""
    if name.startswith("pooler.") or name.endswith("position_ids"):
        return None
    name = name.removeprefix("bert.")
    if name.startswith("embeddings."):
        rest = name[len("embeddings.") :]
        return "embeddings_norm." + rest[len("LayerNorm.") :] if rest.startswith("LayerNorm.") else rest
    if name.startswith("encoder.layer."):
        _, _, idx, rest = name.split(".", 3)
        for hf, ours in (
            ("attention.self.query.", "attention.query."),
            ("attention.self.key.", "attention.key."),
            ("attention.self.value.", "attention.value."),
            ("attention.output.dense.", "attention.dense."),
            ("attention.output.LayerNorm.", "attention.norm."),
            ("intermediate.dense.", "intermediate."),
            ("output.dense.", "output."),
            ("output.LayerNorm.", "norm."),
        ):
            if rest.startswith(hf):
                return f"layers.{idx}.{ours}{rest[len(hf):]}"
    return None


def load_bert(model_dir: str | Path, model_id: str = "") -> tuple[BertEncoder, dict]:
    """Build the encoder from a directory; raise ModelUnavailable naming what is wrong."""
    model_dir = Path(model_dir)
    model_id = model_id or model_dir.name
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(model_id, f"cannot read config.json ({exc})", path=str(model_dir)) from None
    if config.get("model_type") != "bert":
        raise ModelUnavailable(
            model_id, f"model_type {config.get('model_type')!r} is not a BERT encoder", path=str(model_dir)
        )
    pooling_file = model_dir / "1_Pooling" / "config.json"
    if pooling_file.exists():
        pooling = json.loads(pooling_file.read_text())
        if not pooling.get("pooling_mode_mean_tokens", False):
            raise ModelUnavailable(model_id, "only mean pooling is supported", path=str(model_dir))
    cfg = BertConfig.from_dict(config)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelUnavailable(model_id, "no *.safetensors weights", path=str(model_dir))
    model = BertEncoder(cfg)
    weights: list[tuple[str, mx.array]] = []
    try:
        for f in files:
            for name, value in mx.load(str(f)).items():
                if (ours := _hf_to_ours(name)) is not None:
                    weights.append((ours, value.astype(mx.float32)))
        model.load_weights(weights, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise ModelUnavailable(model_id, f"weights do not fit a BERT encoder ({exc})", path=str(model_dir)) from None
    mx.eval(model.parameters())
    return model, config


class Embedder:
    """Load once, then `embed(texts)` -> (float32 [n, dim] unit vectors, prompt_tokens)."""

    def __init__(self, model_dir: str | Path, *, model_id: str = "", max_batch: int = MAX_BATCH) -> None:
        from tokenizers import Tokenizer

        started = time.monotonic()
        self.path = Path(model_dir)
        self.model_id = model_id or self.path.name
        self.model, _ = load_bert(self.path, self.model_id)
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise ModelUnavailable(self.model_id, f"cannot read tokenizer.json ({exc})", path=str(self.path)) from None
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_batch = max_batch
        self.dim = self.model.config.hidden_size
        self.max_tokens = self.model.config.max_position_embeddings
        log.info("embedder %s loaded in %.2f s (dim %d)", self.model_id, time.monotonic() - started, self.dim)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, [CLS] and [SEP] included; checks types and lengths."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise InvalidRequest("input must be a list of strings", param="input")
        if not texts:
            raise InvalidRequest("input must not be empty", param="input")
        if len(texts) > MAX_INPUTS:
            raise InvalidRequest(f"at most {MAX_INPUTS} inputs per request, got {len(texts)}", param="input")
        if not all(isinstance(t, str) for t in texts):
            raise InvalidRequest("every input must be a string", param="input")
        encoded = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]
        for i, ids in enumerate(encoded):
            if len(ids) > self.max_tokens:
                raise InvalidRequest(
                    f"input[{i}] has {len(ids)} tokens; this model takes at most {self.max_tokens}: "
                    f"shorten or split it",
                    param="input",
                )
        return encoded

    def count_tokens(self, texts: Sequence[str]) -> int:
        """prompt_tokens that `embed(texts)` would report."""
        return sum(len(ids) for ids in self.tokenize(texts))

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """Unit vectors for `texts`, in order, and the number of tokens processed."""
        encoded = self.tokenize(texts)
        out = np.empty((len(encoded), self.dim), dtype=np.float32)
        # Sort by length so each batch pads little; results go back to their input order.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), self.max_batch):
            chunk = order[start : start + self.max_batch]
            out[chunk] = self._embed_ids([encoded[i] for i in chunk])
        return out, sum(len(ids) for ids in encoded)

    def _embed_ids(self, batch: list[list[int]]) -> np.ndarray:
        width = max(len(ids) for ids in batch)
        ids = np.zeros((len(batch), width), dtype=np.int32)
        mask = np.zeros((len(batch), width), dtype=np.float32)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1.0
        m = mx.array(mask)
        hidden = self.model(mx.array(ids), m)
        pooled = (hidden * m[:, :, None]).sum(axis=1) / mx.maximum(m.sum(axis=1, keepdims=True), 1e-9)
        norm = mx.sqrt((pooled * pooled).sum(axis=1, keepdims=True))
        vectors = pooled / mx.maximum(norm, 1e-12)
        return np.array(vectors, dtype=np.float32)
