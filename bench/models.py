"""Benchmark the model side: SmolLM2 GGUF conversion time and embedding throughput.

    .venv/bin/python bench/models.py [--out bench/results/models.json]

Prints a table and writes JSON. Converts into a temporary directory (the prepared models
are not touched); embeds synthetic sentences of ~16 words with the bundled MiniLM.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from darkbloom.inference.blas import blas_status, ensure_blas

ensure_blas()

from darkbloom.inference.bert import Embedder  # noqa: E402
from darkbloom.inference.catalog import BUNDLED, bundled_source, prepare_bundled  # noqa: E402
from darkbloom.inference.gguf import convert_gguf  # noqa: E402


def _sentences(n: int, seed: int = 0) -> list[str]:
    words = "the a model peer node network weather city river music code light small large early".split()
    r = random.Random(seed)
    return [" ".join(r.choice(words) for _ in range(16)) + "." for _ in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/models.json")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows: dict[str, float] = {}
    gguf = bundled_source(BUNDLED["smollm2-135m-instruct"])
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("float32", "quantized"):
            best = min(
                _timed(lambda: convert_gguf(gguf, Path(tmp) / precision, precision=precision))
                for _ in range(args.repeats)
            )
            rows[f"convert smollm2 {precision} (s)"] = best
        models = Path(tmp) / "models"
        rows["prepare both, first run (s)"] = _timed(lambda: prepare_bundled(models, precision="float32"))
        rows["prepare both, second run (s)"] = _timed(lambda: prepare_bundled(models, precision="float32"))
        embedder = Embedder(models / "all-minilm-l6-v2")
        texts = _sentences(256)
        embedder.embed(texts[:8])  # warm up
        for batch, n in ((1, 64), (64, 256)):
            embedder.max_batch = batch
            dt = min(_timed(lambda: embedder.embed(texts[:n])) for _ in range(args.repeats))
            rows[f"embed batch {batch} (sentences/s)"] = n / dt
    print(f"{'measure':40} value")
    for k, v in rows.items():
        print(f"{k:40} {v:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": platform.machine(), "system": platform.system(), "python": sys.version.split()[0],
        "blas": blas_status(), "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


if __name__ == "__main__":
    raise SystemExit(main())
