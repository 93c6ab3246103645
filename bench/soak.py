"""Soak: `darkbloom up` (relay, SmolLM2 node, MiniLM node, shim) under steady load for N minutes.

    .venv/bin/python bench/soak.py [--minutes 30] [--clients 4] [--window-s 60] [--max-tokens 48]
                                   [--out bench/results/soak.json] [--keep-log PATH]
    .venv/bin/python bench/soak.py --engine-only [--minutes 3] [--clients 4] [--window-s 20]

`darkbloom up --port 0` runs as a subprocess in a fresh data dir; `--clients` threads stream
chat completions through the openai SDK back to back. Every window it records the resident
memory of the whole `up` process group (from /proc), requests, errors (an OpenAI error or a
stream without a finish reason), and time-to-first-token percentiles of the requests that
started in that window. Prints a table and writes JSON. Not run in CI.

`--engine-only` drives the MLX engine alone in this process (same model, same request mix) and
prints its resident memory and MLX's active/cache memory per window: it separates the engine's
memory (KV and prompt caches) from the rest of the network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import openai  # noqa: E402

from chaos.procs import Daemon, clean_env  # noqa: E402

MODEL = "smollm2-135m-instruct"
PROMPTS = ["What is the capital of France?", "Name three colours.", "Count from one to five.",
           "Say something kind.", "What is two plus two?", "Describe the sea in one sentence."]


@dataclass
class Sample:
    started: float
    ttft_s: float | None
    ok: bool
    tokens: int
    error: str = ""


@dataclass
class Window:
    index: int
    rss_mb: float
    samples: list[Sample] = field(default_factory=list)

    def row(self) -> dict:
        ttfts = sorted(s.ttft_s for s in self.samples if s.ttft_s is not None)
        errors = sum(not s.ok for s in self.samples)
        return {
            "minute": round((self.index + 1) * WINDOW_S / 60, 2),
            "requests": len(self.samples),
            "errors": errors,
            "error_rate": round(errors / len(self.samples), 4) if self.samples else 0.0,
            "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1) if ttfts else None,
            "ttft_p99_ms": round(_pct(ttfts, 0.99) * 1000, 1) if ttfts else None,
            "tokens": sum(s.tokens for s in self.samples),
            "rss_mb": round(self.rss_mb, 1),
        }


WINDOW_S = 60.0


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in the process group, in MB (Linux /proc)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # field 5 of stat (pgrp), after the command name
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1024


def client_loop(base_url: str, stop: threading.Event, out: list[Sample], lock: threading.Lock, seed: int,
                max_tokens: int) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="local", timeout=120, max_retries=0)
    i = seed
    while not stop.is_set():
        i += 1
        started = time.monotonic()
        ttft = None
        tokens = 0
        ok = False
        error = ""
        try:
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                max_tokens=max_tokens, temperature=0.7, stream=True, stream_options={"include_usage": True})
            finish = None
            for chunk in stream:
                if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                    ttft = time.monotonic() - started
                for c in chunk.choices:
                    finish = c.finish_reason or finish
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            ok = finish in ("stop", "length")
            error = "" if ok else f"finish={finish}"
        except openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            error = f"{exc.status_code} {body.get('code')}"
        except openai.APIError as exc:
            error = f"{type(exc).__name__}: {str(exc.message)[:80]}"
        with lock:
            out.append(Sample(started, ttft, ok, tokens, error))
    client.close()


def engine_only(args: argparse.Namespace) -> int:
    """The engine alone: RSS and MLX memory per window under `--clients` concurrent requests."""
    from darkbloom.inference.blas import ensure_blas

    ensure_blas()
    from contextlib import aclosing

    import mlx.core as mx
    import trio

    from darkbloom.config import load_config
    from darkbloom.inference.catalog import models_dir
    from darkbloom.inference.engine import open_engine
    from darkbloom.inference.params import parse_chat

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    async def run() -> list[dict]:
        rows = []
        model_dir = models_dir(load_config().inference) / MODEL
        async with open_engine([(MODEL, model_dir)], max_concurrent=8, self_benchmark=False) as engine:
            done = 0
            began = time.monotonic()
            rows.append({"minute": 0.0, "requests": 0, "rss_mb": round(rss_mb(), 1),
                         "mlx_active_mb": round(mx.get_active_memory() / 2**20, 1)})

            async def client(k: int) -> None:
                nonlocal done
                i = k * 1000
                while time.monotonic() - began < args.minutes * 60:
                    i += 1
                    req = parse_chat({"messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}],
                                      "max_tokens": args.max_tokens, "temperature": 0.7})
                    async with aclosing(engine.generate(MODEL, req)) as events:
                        async for _ in events:
                            pass
                    done += 1

            async def sample() -> None:
                for w in range(1, round(args.minutes * 60 / WINDOW_S) + 1):
                    await trio.sleep_until(trio.current_time() - (time.monotonic() - began) + w * WINDOW_S)
                    rows.append({"minute": round(w * WINDOW_S / 60, 2), "requests": done, "rss_mb": round(rss_mb(), 1),
                                 "mlx_active_mb": round(mx.get_active_memory() / 2**20, 1),
                                 "mlx_cache_mb": round(mx.get_cache_memory() / 2**20, 1)})

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                for k in range(args.clients):
                    nursery.start_soon(client, k)
        return rows

    rows = trio.run(run)
    print(f"engine only: {MODEL}, {args.clients} concurrent requests of {args.max_tokens} tokens")
    print(f"{'minute':>7} {'requests':>9} {'RSS MB':>8} {'MLX active MB':>14}")
    for r in rows:
        print(f"{r['minute']:>7} {r['requests']:>9} {r['rss_mb']:>8.0f} {r['mlx_active_mb']:>14.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"engine_only": True, "minutes": args.minutes, "clients": args.clients, "rows": rows},
                              indent=2))
    return 0


def main() -> int:
    global WINDOW_S
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--window-s", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", default="bench/results/soak.json")
    ap.add_argument("--keep-log", metavar="PATH", help="copy the darkbloom up log (run with -v) here")
    ap.add_argument("--engine-only", action="store_true", help="drive the MLX engine alone (memory of the engine)")
    args = ap.parse_args()
    WINDOW_S = args.window_s
    if args.engine_only:
        return engine_only(args)
    with tempfile.TemporaryDirectory(prefix="darkbloom-soak-") as tmp:
        root = Path(tmp)
        (root / "logs").mkdir()
        env = clean_env(DARKBLOOM_INFERENCE_SELF_BENCHMARK="false")
        if os.environ.get("DARKBLOOM_INFERENCE_MODELS_DIR"):
            env["DARKBLOOM_INFERENCE_MODELS_DIR"] = os.environ["DARKBLOOM_INFERENCE_MODELS_DIR"]
        verbose = ["-v"] if args.keep_log else []
        up = Daemon("up", [*verbose, "--data-dir", str(root / "data"), "up", "--port", "0"], env=env,
                    log_dir=root / "logs")
        try:
            base_url = up.wait_for(r"base_url: (http://\S+/v1)", timeout=600).group(1)
            up.wait_for(r"Press Ctrl-C to stop", timeout=600)
            samples: list[Sample] = []
            lock = threading.Lock()
            stop = threading.Event()
            threads = [threading.Thread(target=client_loop, args=(base_url, stop, samples, lock, k * 1000,
                                                                   args.max_tokens), daemon=True)
                       for k in range(args.clients)]
            began = time.monotonic()
            baseline = group_rss_mb(up.pid)
            windows = [Window(0, 0.0)]
            for t in threads:
                t.start()
            n_windows = max(1, round(args.minutes * 60 / WINDOW_S))
            for k in range(n_windows):
                stop.wait(max(0.0, began + (k + 1) * WINDOW_S - time.monotonic()))
                windows[-1].rss_mb = group_rss_mb(up.pid)
                if k + 1 < n_windows:
                    windows.append(Window(k + 1, 0.0))
            stop.set()
            for t in threads:
                t.join(timeout=180)
            for s in samples:
                index = min(len(windows) - 1, int((s.started - began) // WINDOW_S))
                if index >= 0:
                    windows[index].samples.append(s)
        finally:
            code = up.interrupt(timeout=60)
            if args.keep_log:
                import shutil

                shutil.copy(up.log_path, args.keep_log)
    rows = [w.row() for w in windows]
    total = sum(r["requests"] for r in rows)
    errors = sum(r["errors"] for r in rows)
    print(f"soak: {args.minutes:g} min, {args.clients} clients, darkbloom up ({MODEL}), exit code {code}")
    header = f"{'minute':>7} {'requests':>9} {'errors':>7} {'err %':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'tokens':>7} {'RSS MB':>8}"
    print(header)
    for r in rows:
        print(f"{r['minute']:>7} {r['requests']:>9} {r['errors']:>7} {100 * r['error_rate']:>6.2f} "
              f"{r['ttft_p50_ms'] or 0:>9.0f} {r['ttft_p99_ms'] or 0:>9.0f} {r['tokens']:>7} {r['rss_mb']:>8.0f}")
    growth = rows[-1]["rss_mb"] - rows[0]["rss_mb"] if rows else 0.0
    kinds: dict[str, int] = {}
    for w in windows:
        for smp in w.samples:
            if not smp.ok:
                kinds[smp.error] = kinds.get(smp.error, 0) + 1
    print(f"total {total} requests, {errors} errors; RSS idle {baseline:.0f} MB, after the first window "
          f"{rows[0]['rss_mb']:.0f} MB, at the end {rows[-1]['rss_mb']:.0f} MB ({growth:+.0f} MB under load)")
    for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  error {n:>4} x {kind}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"minutes": args.minutes, "clients": args.clients, "window_s": WINDOW_S,
                               "model": MODEL, "machine": platform.platform(), "cpus": os.cpu_count(),
                               "exit_code": code, "errors_by_kind": kinds, "rss_idle_mb": baseline, "windows": rows, "rss_growth_mb": growth}, indent=2))
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
