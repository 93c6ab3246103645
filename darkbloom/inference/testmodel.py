"""Build small random-weight llama models with a real BPE tokenizer, for fast tests.

`make_test_model(dir, size, seed)` writes an mlx-lm loadable directory: float32 random weights
(normal, std 0.02, from numpy's PCG64 seeded with `seed`), a byte-level BPE tokenizer trained
offline with the `tokenizers` library on text generated here from the same seed, and a ChatML
chat template with tool support (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, which
mlx-lm recognises as its `json_tools` parser). Same size and seed, same bytes. The output is
gibberish, of course; the shapes, tokenizer and template are real.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from darkbloom.errors import InvalidRequest

__all__ = ["SIZES", "TestModelSize", "CHATML_TOOLS_TEMPLATE", "make_test_model", "corpus"]

log = logging.getLogger(__name__)

STAMP_NAME = ".darkbloom-testmodel.json"
_VERSION = 1  # bump when the recipe changes, so stamps from an older recipe are rebuilt

Size = Literal["tiny", "small"]


@dataclass(frozen=True, slots=True)
class TestModelSize:
    __test__ = False  # not a pytest class, despite the name
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    corpus_lines: int
    max_position_embeddings: int = 4096


SIZES: dict[str, TestModelSize] = {
    # ~1.0M parameters: embeddings 262k (tied) + 4 x 197k
    "tiny": TestModelSize(128, 4, 4, 2, 384, 2048, 6000),
    # ~20M parameters: embeddings 1.6M (tied) + 12 x 1.57M
    "small": TestModelSize(384, 12, 6, 2, 1024, 4096, 16000),
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added (non-special) tokens, so tool-call markers are single tokens as in real models.
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# ChatML; with `tools`, the system turn lists them and the assistant answers a call as
# <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>. Tool results come back as
# user turns wrapped in <tool_response>. Newlines right after a block tag are written as
# {{ '\n' }} because transformers renders templates with trim_blocks=True.
CHATML_TOOLS_TEMPLATE = (
    "{% set sys = messages[0].content if messages and messages[0].role == 'system' else '' %}"
    "{% if tools %}"
    "<|im_start|>system\n{{ sys if sys else 'You are a helpful assistant.' }}\n\n"
    "You can call these tools. Their JSON schemas are listed between <tools> and </tools>:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ (tool.function if tool.function is defined else tool) | tojson }}{% endfor %}{{ '\\n' }}"
    "</tools>\n\nTo call one, answer with a JSON object inside <tool_call></tool_call> tags:\n"
    "<tool_call>\n{\"name\": <tool name>, \"arguments\": <arguments object>}\n</tool_call><|im_end|>\n"
    "{% elif sys %}"
    "<|im_start|>system\n{{ sys }}<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' and loop.first %}"
    "{% elif m.role == 'tool' %}"
    "{% if loop.first or loop.previtem.role != 'tool' %}<|im_start|>user{% endif %}{{ '\\n' }}"
    "<tool_response>\n{{ m.content }}\n</tool_response>"
    "{% if loop.last or loop.nextitem.role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% elif m.role == 'assistant' and m.tool_calls %}"
    "<|im_start|>assistant{% if m.content %}\n{{ m.content }}{% endif %}"
    "{% for tc in m.tool_calls %}"
    "{% set tool_call = tc.function if tc.function is defined else tc %}{{ '\\n' }}"
    "<tool_call>\n{\"name\": \"{{ tool_call.name }}\", \"arguments\": "
    "{{ tool_call.arguments if tool_call.arguments is string else tool_call.arguments | tojson }}}\n</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ m.role }}\n{{ m.content if m.content is string else '' }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the of and to in is was for on that with as by at from it this be are have not or an but "
    "which one all were when there can more if has their will would about so what up out into "
    "time than them only new some could these two may first then do any like other such also "
    "after our most made over its where how make did many before must through back years much "
    "way well down should because each just those people take day good very world still own "
    "see men work long get here between both life being under never same another know while "
    "last might great old year off come since against go came right used three small large next "
    "early place city country water light house number answer question model token peer node "
    "network relay ledger request stream weather capital France Paris London Tokyo Berlin sun "
    "rain cloud mountain river ocean forest music code function value list string true false "
    "none null hello thanks please sorry yes no I you he she we they my your his her"
).split()
_SYLLABLES = "ka lo mi ne ru sa ti vo ze qua ber dan el for gi hal is jo ken lum or pre st tion ing ed ly er ph th sh ch".split()
_PUNCT = [".", ".", ".", "?", "!", ",", ":", ";"]


def corpus(seed: int, lines: int) -> Iterator[str]:
    """Deterministic training text: prose, pseudo-words, numbers, JSON and ChatML-shaped turns."""
    r = random.Random(seed)
    for i in range(lines):
        kind = i % 5
        if kind == 4:
            args = {r.choice(_WORDS): r.choice([r.randint(0, 999), r.choice(_WORDS), r.random() < 0.5])}
            yield (
                f'<tool_call>\n{{"name": "{r.choice(_WORDS)}_{r.choice(_WORDS)}", '
                f'"arguments": {json.dumps(args)}}}\n</tool_call>'
            )
            continue
        words = []
        for _ in range(r.randint(4, 18)):
            roll = r.random()
            if roll < 0.6:
                words.append(r.choice(_WORDS))
            elif roll < 0.85:
                words.append("".join(r.choice(_SYLLABLES) for _ in range(r.randint(1, 4))))
            else:
                words.append(str(r.randint(0, 100_000)))
        text = " ".join(words)
        text = text[0].upper() + text[1:] + r.choice(_PUNCT)
        if kind == 3:
            text = f"<|im_start|>{r.choice(['user', 'assistant', 'system'])}\n{text}<|im_end|>"
        yield text


def _train_tokenizer(seed: int, size: TestModelSize) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=size.vocab_size - len(ADDED_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed, size.corpus_lines), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tok.to_str()


def _random_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.Generator(np.random.PCG64(seed))
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg["head_dim"]
    q_out, kv_out = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(cfg["vocab_size"], h), "model.norm.weight": np.ones(h, np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(q_out, h)
        w[p + "self_attn.k_proj.weight"] = normal(kv_out, h)
        w[p + "self_attn.v_proj.weight"] = normal(kv_out, h)
        w[p + "self_attn.o_proj.weight"] = normal(h, q_out)
        w[p + "mlp.gate_proj.weight"] = normal(inter, h)
        w[p + "mlp.up_proj.weight"] = normal(inter, h)
        w[p + "mlp.down_proj.weight"] = normal(h, inter)
        w[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
    return w


def param_count(size: str) -> int:
    """Parameters of a test model of this size (embeddings counted once: they are tied)."""
    s = SIZES[size]
    hd = s.hidden_size // s.num_attention_heads
    attn = s.hidden_size * hd * (2 * s.num_attention_heads + 2 * s.num_key_value_heads)
    mlp = 3 * s.hidden_size * s.intermediate_size
    return s.vocab_size * s.hidden_size + s.hidden_size + s.num_hidden_layers * (attn + mlp + 2 * s.hidden_size)


def make_test_model(out_dir: str | Path, size: str = "tiny", seed: int = 0, *, force: bool = False) -> Path:
    """Write (or keep, when already built with the same recipe) a random test model at `out_dir`."""
    if size not in SIZES:
        raise InvalidRequest(f"unknown test model size {size!r}; choose one of {', '.join(SIZES)}", param="size")
    from darkbloom.inference.blas import ensure_blas

    ensure_blas()
    import mlx.core as mx

    out_dir = Path(out_dir)
    spec = SIZES[size]
    stamp = {"version": _VERSION, "size": size, "seed": seed, **asdict(spec)}
    stamp_file = out_dir / STAMP_NAME
    if not force and stamp_file.exists():
        try:
            if json.loads(stamp_file.read_text()) == stamp:
                return out_dir
        except (OSError, ValueError):
            pass  # unreadable stamp: rebuild
    if out_dir.exists() and not stamp_file.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        # Never replace a directory we did not build: it may hold someone's files.
        raise InvalidRequest(
            f"{out_dir} exists and is not a Darkbloom test model; choose a new or empty directory", param="dir"
        )
    started = time.monotonic()
    tokenizer_json = _train_tokenizer(seed, spec)
    vocab_size = json.loads(tokenizer_json)["model"]["vocab"].__len__() + len(ADDED_TOKENS)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.hidden_size // spec.num_attention_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": 10000.0,
        "rope_traditional": False,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    weights = _random_weights(config, seed)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
        "chat_template": CHATML_TOOLS_TEMPLATE,
        "tool_parser_type": "json_tools",  # mlx-lm: <tool_call>{json}</tool_call>
    }
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    mx.save_safetensors(
        str(tmp / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()}, metadata={"format": "mlx"}
    )
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "tokenizer.json").write_text(tokenizer_json)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}) + "\n")
    (tmp / STAMP_NAME).write_text(json.dumps(stamp) + "\n")
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)
    log.info("test model %s (seed %d, %d params) built in %.1f s at %s",
             size, seed, param_count(size), time.monotonic() - started, out_dir)
    return out_dir
