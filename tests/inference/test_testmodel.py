"""Random test models: mlx-lm loads and runs them, the tokenizer is real, the template supports tools, builds are deterministic."""

from __future__ import annotations

import hashlib
import json

import pytest

from darkbloom.errors import InvalidRequest
from darkbloom.inference.testmodel import SIZES, make_test_model, param_count

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _loaded_params(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize(("size", "target"), [("tiny", 1_000_000), ("small", 20_000_000)])
def test_sizes_are_about_as_promised(size, target):
    assert 0.9 * target <= param_count(size) <= 1.1 * target


def test_tiny_loads_and_generates(tiny_model_dir):
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(tiny_model_dir))
    assert _loaded_params(model) == param_count("tiny")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=16))
    assert 1 <= len(responses) <= 16
    assert all(0 <= r.token < len(tokenizer.get_vocab()) for r in responses)
    assert responses[-1].finish_reason in ("length", "stop")


def test_small_loads_and_generates(small_model_dir):
    from mlx_lm import generate, load

    model, tokenizer = load(str(small_model_dir))
    assert _loaded_params(model) == param_count("small")
    assert json.loads((small_model_dir / "config.json").read_text())["num_hidden_layers"] == SIZES["small"].num_hidden_layers
    prompt = tokenizer.encode("The weather in Paris")
    text = generate(model, tokenizer, prompt, max_tokens=4)
    assert isinstance(text, str)


def test_tokenizer_is_a_real_bpe_that_round_trips(tiny_model_dir):
    from mlx_lm import load

    _, tokenizer = load(str(tiny_model_dir))
    text = "The weather in Paris is sunny, 23 degrees! Grüße 東京"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges learned: fewer tokens than bytes
    for special in ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"):
        assert len(tokenizer.encode(special)) == 1, special
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_chatml_template_with_tools(tiny_model_dir):
    from mlx_lm import load

    _, tokenizer = load(str(tiny_model_dir))
    assert tokenizer.has_tool_calling and tokenizer.tool_call_start == "<tool_call>"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n")
    assert '"name": "get_weather"' in text and "<tools>\n" in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n' in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert plain == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    parsed = tokenizer.tool_parser('{"name": "get_weather", "arguments": {"city": "Paris"}}', TOOLS)
    assert parsed["name"] == "get_weather"


def test_deterministic_given_seed(tmp_path, tiny_model_dir):
    again = make_test_model(tmp_path / "again", "tiny", seed=0)
    other = make_test_model(tmp_path / "other", "tiny", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert _sha(again / name) == _sha(tiny_model_dir / name), name
    assert _sha(other / "model.safetensors") != _sha(again / "model.safetensors")


def test_rebuild_is_skipped_when_up_to_date(tmp_path):
    path = make_test_model(tmp_path / "m", "tiny", seed=5)
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert make_test_model(tmp_path / "m", "tiny", seed=5) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    make_test_model(tmp_path / "m", "tiny", seed=6)  # another seed: rebuilt in place
    assert (path / "model.safetensors").stat().st_mtime_ns != mtime


def test_bad_arguments(tmp_path):
    with pytest.raises(InvalidRequest, match="unknown test model size"):
        make_test_model(tmp_path / "x", "huge")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidRequest, match="not a Darkbloom test model"):
        make_test_model(tmp_path / "mine", "tiny")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
