"""`darkbloom models`: prepare the bundled models, build test models, list configured models.

    darkbloom models prepare [ID ...] [--force] [--precision float32|quantized] [--models-dir DIR]
    darkbloom models make-test DIR --size tiny|small [--seed N] [--force]
    darkbloom models list [--json]

Heavy imports (mlx, tokenizers) happen inside `run`, so `darkbloom --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from darkbloom.config import Config

__all__ = ["add_arguments", "run", "ProgressBar"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    models_dir = argparse.ArgumentParser(add_help=False)
    models_dir.add_argument(
        "--models-dir", dest="cfg__inference__models_dir", metavar="DIR",
        help="where bundled models are prepared (default: [inference] models_dir or ~/.cache/darkbloom/models)",
    )
    p = sub.add_parser("prepare", parents=[models_dir], help="convert/copy the bundled models for offline use (idempotent)")
    p.add_argument("ids", nargs="*", metavar="ID", help="bundled model ids (default: all)")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument(
        "--precision", choices=("float32", "quantized"),
        help="chat model weights: float32 (default on Linux) or the GGUF's 4-bit blocks (default on macOS)",
    )
    p = sub.add_parser("make-test", help="build a random-weight llama model with a real tokenizer, for tests")
    p.add_argument("dir", metavar="DIR", help="output directory (new, empty, or an earlier test model)")
    p.add_argument("--size", choices=("tiny", "small"), default="tiny", help="tiny ~1M params, small ~20M")
    p.add_argument("--seed", type=int, default=0, help="same size and seed give the same files")
    p.add_argument("--force", action="store_true", help="rebuild even when the directory holds this model")
    p = sub.add_parser("list", parents=[models_dir], help="show the configured models: id, kind, path, digest")
    p.add_argument("--json", action="store_true", help="one JSON object per model")


class ProgressBar:
    """A one-line progress bar on a terminal; plain start/end lines otherwise."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self._current = ""

    def __call__(self, model_id: str, done: int, total: int) -> None:
        if model_id != self._current:
            self.finish()
            self._current = model_id
            if not self.tty:
                print(f"preparing {model_id} ...", file=self.stream, flush=True)
        if self.tty and total:
            filled = int(self.width * done / total)
            bar = "#" * filled + "." * (self.width - filled)
            print(f"\r{model_id:24} [{bar}] {done}/{total}", end="", file=self.stream, flush=True)

    def finish(self) -> None:
        if self._current and self.tty:
            print(file=self.stream, flush=True)
        self._current = ""


def run(args: argparse.Namespace, config: Config) -> int:
    action = getattr(args, "models_command", None)
    if action == "prepare":
        return _prepare(args, config)
    if action == "make-test":
        return _make_test(args)
    if action == "list":
        return _list(args, config)
    print("usage: darkbloom models {prepare,make-test,list} ... (see darkbloom models --help)", file=sys.stderr)
    return 2


def _prepare(args: argparse.Namespace, config: Config) -> int:
    from darkbloom.inference.catalog import models_dir, prepare_bundled

    root = models_dir(config.inference)
    bar = ProgressBar()
    try:
        results = prepare_bundled(root, args.ids or None, precision=args.precision, force=args.force, progress=bar)
    finally:
        bar.finish()
    for r in results:
        print(f"{r.id}: {r.action} in {r.seconds:.1f} s at {r.path} ({r.digest[:19]}...)")
    return 0


def _make_test(args: argparse.Namespace) -> int:
    from darkbloom.inference.testmodel import make_test_model, param_count

    started = time.monotonic()
    path = make_test_model(args.dir, args.size, args.seed, force=args.force)
    print(f"{args.size} test model ({param_count(args.size):,} params, seed {args.seed}) at {path} "
          f"in {time.monotonic() - started:.1f} s")
    return 0


def _list(args: argparse.Namespace, config: Config) -> int:
    from darkbloom.errors import DarkbloomError
    from darkbloom.inference.catalog import BUNDLED, STAMP_NAME, model_info, models_dir

    root = models_dir(config.inference)
    rows = []
    for spec in config.inference.models:
        bundled = not spec.path and spec.id in BUNDLED
        kind = BUNDLED[spec.id].kind if bundled else spec.kind
        path = str(root / spec.id) if bundled else spec.path
        row = {"id": spec.id, "kind": kind, "path": path, "digest": "", "status": "ok", "served": True}
        try:
            info = model_info(spec.id, path, kind, bundled=bundled) if path else None
        except DarkbloomError as exc:
            info = None
            row["status"] = "not prepared: run `darkbloom models prepare`" if bundled else str(exc)
        if info is None and not path:
            row["status"] = "no path and not bundled"
        if info is not None:
            row.update(digest=info.digest, context_length=info.context_length,
                       quantization=info.quantization, features=list(info.features))
        rows.append(row)
    configured = {spec.id for spec in config.inference.models}
    for model in BUNDLED.values():
        # Prepared bundled models the config does not serve: shown so operators know they exist.
        target = root / model.id
        if model.id not in configured and (target / STAMP_NAME).exists():
            try:
                info = model_info(model.id, target, model.kind, bundled=True)
            except DarkbloomError:
                continue
            rows.append({"id": model.id, "kind": model.kind, "path": str(target), "digest": info.digest,
                         "status": "ok", "served": False, "context_length": info.context_length,
                         "quantization": info.quantization, "features": list(info.features)})
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'ID':24} {'KIND':9} {'DIGEST':21} PATH")
    for row in rows:
        digest = row["digest"][:19] + ".." if row["digest"] else "-"
        extra = "" if row["status"] == "ok" else f"  ({row['status']})"
        if not row["served"]:
            extra += "  (prepared, not in [inference] models)"
        print(f"{row['id']:24} {row['kind']:9} {digest:21} {row['path']}{extra}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1
