"""Benchmark the generation engine against `mlx_lm.server` on the same models and prompts.

    .venv/bin/python bench/engine.py [--models smollm2,small] [--concurrency 1,4,16]
                                     [--max-tokens 48] [--rounds 2] [--trials 3]
                                     [--blas-threads 0] [--server-blas-threads 1,2]
                                     [--server-jit stock|native|stock,native]
                                     [--embeddings/--no-embeddings]
                                     [--out bench/results/engine.json]

For each model, our engine runs in this process (`open_engine`, max_concurrent = the highest
concurrency) and `mlx_lm.server` runs as a subprocess on 127.0.0.1 with the same model
directory, `--decode-concurrency` and `--prompt-concurrency` = the same highest concurrency
(our engine prefills up to that many prompts together too), and OpenBLAS preloaded through
LD_PRELOAD. The server's OpenBLAS thread count is fixed per process, so one server runs per
count in `--server-blas-threads` (1 and 2: one is faster on busy cores, two on idle ones) and
its best per concurrency is compared; our engine runs at its default (threads tuned per step).

MLX's CPU kernels: our engine builds the kernels MLX fuses for this CPU (inference/cpujit.py;
BENCH_OUR_JIT=stock turns that off). `--server-jit stock` (the default) runs mlx_lm.server as
shipped: the stock environment (`cpujit.stock_env`) and a fresh kernel cache of its own, so it
never loads a kernel we built. `--server-jit native` gives it our setup too (our PATH and kernel
cache); with both, the table also shows the ratio to that server, the like-for-like figure.

Fairness: at each concurrency C, C clients each send `rounds` streaming chat requests one after
another; both sides get the same prompts, the same max_tokens and the same sampling (greedy).
Each trial uses prompts neither side has seen before (so no prompt-cache hits beyond the chat
template's shared prefix, which both sides can reuse), and two warm-up rounds per side with
other prompts run first and are not measured. The two sides alternate `trials` times per level
(load from other processes hits both) and the median trial (by tokens/s) of each side is
reported; TTFT p50/p95 are over every request of every trial of that side. Measured: aggregate
completion tokens/s over the wall time (usage counts from each side; prefill included), aggregate
decode tokens/s (concurrency x the median request's tokens after its first over the time from its
first text to its last: the issue's "decode tokens/s"), TTFT = request start to first non-empty
text. Embeddings (our MiniLM encoder; mlx_lm.server has none): sentences/s at
batch 1 and 64, median of the trials. Prints a table and writes JSON with the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from darkbloom.inference.blas import OPENBLAS_PATHS, blas_status, ensure_blas
from darkbloom.inference.cpujit import jit_status, stock_env

ensure_blas(native_jit=os.environ.get("BENCH_OUR_JIT", "native") != "stock")

import httpx  # noqa: E402
import trio  # noqa: E402

from darkbloom.inference.engine import ChoiceFinished, TextDelta, open_engine  # noqa: E402
from darkbloom.inference.params import parse_chat  # noqa: E402

ANIMALS = "fox owl whale ant crow bear lynx moth eel yak hare wolf seal frog newt swan".split()
PLACES = "desert harbour forest city glacier library market orchard canyon island".split()


def prompts(n: int, tag: str = "") -> list[str]:
    """n distinct prompts; a different `tag` gives prompts that share no prefix past "Story"."""
    return [
        f"Story {tag}{i}: write a long, detailed story about a {ANIMALS[i % len(ANIMALS)]} "
        f"who opens a bakery in a {PLACES[(i * 7) % len(PLACES)]}. Describe every day of its first week."
        for i in range(n)
    ]


def decode_rate(tokens: int, first: float, last: float) -> float:
    """One request's decode speed: the tokens after its first, over the time from its first
    text to its end (its last text, or its finish event). NaN when there is nothing to time."""
    if tokens < 2 or last <= first:
        return math.nan
    return (tokens - 1) / (last - first)


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# --- one side: our engine in process --------------------------------------------------


async def run_ours(eng: Any, model_id: str, texts: list[str], concurrency: int, max_tokens: int) -> dict[str, Any]:
    ttfts: list[float] = []
    decode: list[float] = []
    tokens = 0
    queue = list(texts)

    async def client() -> None:
        nonlocal tokens
        while queue:
            text = queue.pop()
            req = parse_chat({"messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": max_tokens})
            t0 = time.perf_counter()
            first: float | None = None
            async for ev in eng.generate(model_id, req):
                if isinstance(ev, TextDelta) and first is None and ev.text:
                    first = time.perf_counter()
                    ttfts.append(first - t0)
                elif isinstance(ev, ChoiceFinished):
                    tokens += ev.completion_tokens
                    if first is not None:
                        decode.append(decode_rate(ev.completion_tokens, first, time.perf_counter()))

    t0, cpu0 = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as n:
        for _ in range(concurrency):
            n.start_soon(client)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "cpu_s": cpu,  # this whole process: engine and the benchmark's own client
        "tok_per_cpu_s": tokens / cpu,
        "ttft_p50_s": pct(ttfts, 0.5),
        "ttft_p95_s": pct(ttfts, 0.95),
        "ttfts": ttfts,
        "decode_tok_s": concurrency * pct([d for d in decode if not math.isnan(d)], 0.5),
    }


# --- the other side: mlx_lm.server over HTTP ------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlx_server(model_dir: Path, port: int, concurrency: int, blas_threads: int, jit: str, kernel_dir: Path,
                     log: Any) -> subprocess.Popen[bytes]:
    """`jit` "stock": as shipped, its kernels built by MLX's own flags into `kernel_dir`;
    "native": with this process's environment (our g++ flags and our kernel cache)."""
    if jit == "stock":
        env = dict(stock_env(), HF_HUB_OFFLINE="1", TMPDIR=str(kernel_dir))
    else:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
    if blas_threads > 0:
        env["OPENBLAS_NUM_THREADS"] = str(blas_threads)
    blas = next((p for p in OPENBLAS_PATHS if Path(p).exists()), None)
    if blas:
        env["LD_PRELOAD"] = blas
    cmd = [
        sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
        "--decode-concurrency", str(max(concurrency, 1)), "--prompt-concurrency", str(max(concurrency, 1)),
        "--log-level", "WARNING",
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=log)


async def wait_healthy(client: httpx.AsyncClient, base: str, proc: subprocess.Popen[bytes]) -> None:
    with trio.fail_after(300):
        while True:
            if proc.poll() is not None:
                raise RuntimeError("mlx_lm.server exited during start-up")
            try:
                r = await client.get(f"{base}/health")
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.25)  # polling a subprocess's port; there is no event to wait on


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_theirs(client: httpx.AsyncClient, base: str, texts: list[str], concurrency: int, max_tokens: int, pid: int) -> dict[str, Any]:
    ttfts: list[float] = []
    decode: list[float] = []
    tokens = 0
    resets = 0
    queue = list(texts)

    async def one() -> None:
        nonlocal tokens, resets
        while queue:
            text = queue.pop()
            body = {
                "model": "default_model",
                "messages": [{"role": "user", "content": text}],
                "temperature": 0,
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            t0 = time.perf_counter()
            first: float | None = None
            last = 0.0
            n_tokens = 0
            n_chunks = 0
            for _attempt in range(50):
                try:
                    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
                        resp.raise_for_status()
                        async for line in resp.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            for ch in chunk.get("choices", []):
                                if (ch.get("delta") or {}).get("content"):
                                    n_chunks += 1
                                    last = time.perf_counter()
                                    if first is None:
                                        first = last
                                        ttfts.append(first - t0)
                            if chunk.get("usage"):
                                n_tokens = chunk["usage"]["completion_tokens"]
                    break
                except (httpx.ReadError, httpx.ConnectError, httpx.RemoteProtocolError):
                    # mlx_lm.server's ThreadingHTTPServer listens with a backlog of 5 and resets
                    # connections beyond it; a client retries, and the TTFT clock keeps running.
                    if n_chunks:
                        raise
                    resets += 1
                    await trio.sleep(0.05)
            else:
                raise RuntimeError("mlx_lm.server kept resetting connections")
            n_tokens = n_tokens or n_chunks  # one content chunk per token in mlx_lm.server
            tokens += n_tokens
            if first is not None:
                decode.append(decode_rate(n_tokens, first, last))

    t0, cpu0 = time.perf_counter(), proc_cpu_s(pid)
    async with trio.open_nursery() as n:
        for _ in range(concurrency):
            n.start_soon(one)
    wall, cpu = time.perf_counter() - t0, proc_cpu_s(pid) - cpu0
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "cpu_s": cpu,  # the server process only (not our HTTP client)
        "tok_per_cpu_s": tokens / cpu,
        "ttft_p50_s": pct(ttfts, 0.5),
        "ttft_p95_s": pct(ttfts, 0.95),
        "ttfts": ttfts,
        "decode_tok_s": concurrency * pct([d for d in decode if not math.isnan(d)], 0.5),
        "connection_resets": resets,
    }


# --- driver ------------------------------------------------------------------------------


def model_dirs(names: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name in names:
        if name == "smollm2":
            from darkbloom.config import load_config
            from darkbloom.inference.catalog import models_dir, prepare_bundled

            root = models_dir(load_config().inference)
            prepare_bundled(root)
            out[name] = root / "smollm2-135m-instruct"
        elif name in ("small", "tiny"):
            from darkbloom.inference.testmodel import make_test_model

            out[name] = make_test_model(Path(tempfile.gettempdir()) / f"darkbloom-bench-{name}", name, seed=0)
        else:
            raise SystemExit(f"unknown model {name!r}: use smollm2, small or tiny")
    return out


def median_trial(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The median trial by tokens/s, with TTFT percentiles over every request of every trial."""
    mid = dict(sorted(trials, key=lambda r: r["tok_s"])[(len(trials) - 1) // 2])
    ttfts = [t for r in trials for t in r["ttfts"]]
    mid["ttft_p50_s"], mid["ttft_p95_s"] = pct(ttfts, 0.5), pct(ttfts, 0.95)
    mid["tokens_all_trials"] = [r["tokens"] for r in trials]
    mid["tok_s_all_trials"] = [round(r["tok_s"], 2) for r in trials]
    mid["decode_tok_s"] = sorted(r["decode_tok_s"] for r in trials)[(len(trials) - 1) // 2]
    mid["decode_tok_s_all_trials"] = [round(r["decode_tok_s"], 2) for r in trials]
    return mid


async def bench_model(
    name: str, path: Path, levels: list[int], max_tokens: int, rounds: int, trials: int, blas_threads: int,
    server_threads: list[int], server_jits: list[str], log: Any,
) -> list[dict[str, Any]]:
    rows = []
    servers: dict[tuple[str, int], tuple[subprocess.Popen[bytes], str]] = {}
    kernels = tempfile.TemporaryDirectory(prefix="darkbloom-bench-server-kernels-")
    try:
        for jit in server_jits:
            for th in server_threads:  # one mlx_lm.server per OpenBLAS thread count (it is fixed per process)
                port = free_port()
                proc = start_mlx_server(path, port, max(levels), th, jit, Path(kernels.name), log)
                servers[(jit, th)] = (proc, f"http://127.0.0.1:{port}")
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            for proc, base in servers.values():
                await wait_healthy(client, base, proc)
            async with open_engine(
                [(name, path)], max_concurrent=max(levels), max_queue=256, self_benchmark=False, blas_threads=blas_threads
            ) as eng:
                # Warm-up every side, not measured: first-call compilation, page-in, and our engine's
                # first timing of each OpenBLAS thread choice (a prefill takes the most threads
                # first and the other at the next one: two rounds at the highest concurrency).
                warm = prompts(2 * max(levels), "warm-up ")
                await run_ours(eng, name, warm, max(levels), 8)
                for proc, base in servers.values():
                    await run_theirs(client, base, warm, max(levels), 8, proc.pid)
                for c in levels:
                    ours_trials: list[dict[str, Any]] = []
                    theirs_trials: dict[tuple[str, int], list[dict[str, Any]]] = {key: [] for key in servers}
                    for t in range(trials):  # interleaved, so load from other processes hits every side
                        texts = prompts(c * rounds, f"c{c}t{t}-")  # fresh for this trial, the same for every side
                        ours_trials.append(await run_ours(eng, name, texts, c, max_tokens))
                        for key, (proc, base) in servers.items():
                            theirs_trials[key].append(await run_theirs(client, base, texts, c, max_tokens, proc.pid))
                    ours = median_trial(ours_trials)
                    by_key = {key: median_trial(tr) for key, tr in theirs_trials.items()}

                    def best(jit: str) -> dict[str, Any] | None:
                        keys = [k for k in by_key if k[0] == jit]
                        if not keys:
                            return None
                        k = max(keys, key=lambda k: by_key[k]["tok_s"])
                        return dict(by_key[k], blas_threads=k[1], jit=jit)

                    theirs = best(server_jits[0])
                    native = best("native") if server_jits[0] != "native" else None
                    row = {
                        "model": name,
                        "concurrency": c,
                        "ours": ours,
                        "mlx_lm_server": theirs,  # its best thread count at this level (first --server-jit)
                        "mlx_lm_server_by_threads": {
                            f"{jit}/{th}": {k: r[k] for k in ("tok_s", "decode_tok_s", "ttft_p50_s", "ttft_p95_s", "tok_per_cpu_s")}
                            for (jit, th), r in by_key.items()
                        },
                        "mlx_lm_server_native_jit": native,
                        "speedup_vs_native_jit_server": ours["tok_s"] / native["tok_s"] if native else None,
                        "speedup": ours["tok_s"] / theirs["tok_s"],
                        "decode_speedup": ours["decode_tok_s"] / theirs["decode_tok_s"],
                        # Tokens per CPU-second, median trial each: less sensitive to other load.
                        "cpu_efficiency_ratio": ours["tok_per_cpu_s"] / theirs["tok_per_cpu_s"],
                        "load_avg_1m": os.getloadavg()[0],
                    }
                    rows.append(row)
                    others = ", ".join(f"{jit} {th} thr {r['tok_s']:.1f}" for (jit, th), r in by_key.items())
                    print(
                        f"  {name:8} c={c:<3} ours {ours['tok_s']:7.1f} tok/s  mlx_lm.server {theirs['tok_s']:7.1f} tok/s "
                        f"({others}) x{row['speedup']:.3f}; decode {ours['decode_tok_s']:7.1f} vs {theirs['decode_tok_s']:7.1f} "
                        f"x{row['decode_speedup']:.2f}",
                        flush=True,
                    )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        kernels.cleanup()
    return rows


def bench_embeddings(trials: int) -> dict[str, Any]:
    """Sentences/s of our MiniLM encoder at batch 1 and 64 (16-word sentences), median of trials."""
    import random
    import statistics

    from darkbloom.config import load_config
    from darkbloom.inference.bert import Embedder
    from darkbloom.inference.catalog import models_dir, prepare_bundled

    root = models_dir(load_config().inference)
    prepare_bundled(root)
    embedder = Embedder(root / "all-minilm-l6-v2")
    words = "the a model peer node network weather city river music code light small large early".split()
    rnd = random.Random(0)
    texts = [" ".join(rnd.choice(words) for _ in range(16)) + "." for _ in range(256)]
    embedder.embed(texts[:64])  # warm-up, not measured
    out: dict[str, Any] = {}
    for batch, n in ((1, 32), (64, 256)):
        embedder.max_batch = batch
        rates = []
        for _ in range(trials):
            t0 = time.perf_counter()
            embedder.embed(texts[:n])
            rates.append(n / (time.perf_counter() - t0))
        out[f"batch_{batch}_sentences_s"] = statistics.median(rates)
        out[f"batch_{batch}_all_trials"] = [round(r, 1) for r in rates]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,small")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--trials", type=int, default=3, help="interleaved repeats; the median of each side is reported")
    ap.add_argument("--blas-threads", type=int, default=0, help="our engine's OpenBLAS threads (0, its default: tuned per step)")
    ap.add_argument(
        "--server-blas-threads", default="1,2",
        help="mlx_lm.server runs once per listed OpenBLAS thread count; its best per level is compared",
    )
    ap.add_argument(
        "--server-jit", default="stock",
        help="stock: mlx_lm.server as shipped; native: with our MLX kernel flags; stock,native: both (ratios to each)",
    )
    ap.add_argument("--embeddings", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default="bench/results/engine.json")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    server_jits = [x.strip() for x in args.server_jit.split(",") if x.strip()]
    if not server_jits or set(server_jits) - {"stock", "native"}:
        raise SystemExit("--server-jit takes stock, native or stock,native")
    dirs = model_dirs([m.strip() for m in args.models.split(",") if m.strip()])
    rows: list[dict[str, Any]] = []
    load_start = os.getloadavg()
    log_path = Path(tempfile.gettempdir()) / "darkbloom-bench-mlx-server.log"
    with open(log_path, "wb") as log:
        for name, path in dirs.items():
            rows += trio.run(
                bench_model, name, path, levels, args.max_tokens, args.rounds, args.trials, args.blas_threads,
                [int(x) for x in args.server_blas_threads.split(",")], server_jits, log,
            )
    emb = bench_embeddings(args.trials) if args.embeddings else None
    load_end = os.getloadavg()

    print()
    print(
        f"{'model':9} {'conc':>4} | {'ours tok/s':>10} {'TTFT p50':>9} {'p95':>7} | {'mlx_lm tok/s':>12} {'TTFT p50':>9} "
        f"{'p95':>7} | {'speedup':>7} | {'ours decode':>11} {'mlx_lm decode':>13} {'speedup':>7} | {'tok/CPU-s ratio':>15} | {'load 1m':>7}"
    )
    for r in rows:
        o, t = r["ours"], r["mlx_lm_server"]
        print(
            f"{r['model']:9} {r['concurrency']:>4} | {o['tok_s']:>10.1f} {o['ttft_p50_s']:>8.2f}s {o['ttft_p95_s']:>6.2f}s | "
            f"{t['tok_s']:>12.1f} {t['ttft_p50_s']:>8.2f}s {t['ttft_p95_s']:>6.2f}s | {r['speedup']:>6.3f}x | "
            f"{o['decode_tok_s']:>11.1f} {t['decode_tok_s']:>13.1f} {r['decode_speedup']:>6.2f}x | "
            f"{r['cpu_efficiency_ratio']:>14.2f}x | {r['load_avg_1m']:>7.1f}"
        )
    if any(r["mlx_lm_server_native_jit"] for r in rows):
        print("\nlike for like: mlx_lm.server given our MLX kernel flags too")
        for r in rows:
            n = r["mlx_lm_server_native_jit"]
            if n:
                print(f"{r['model']:9} {r['concurrency']:>4} | server+native {n['tok_s']:>7.1f} tok/s "
                      f"(decode {n['decode_tok_s']:.1f}) | ours x{r['speedup_vs_native_jit_server']:.2f}")
    if emb:
        print(
            f"\nembeddings (all-MiniLM-L6-v2, ours): batch 1 {emb['batch_1_sentences_s']:.1f} sentences/s, "
            f"batch 64 {emb['batch_64_sentences_s']:.1f} sentences/s"
        )
    print(f"load average (1/5/15 min): start {load_start}, end {load_end}; {os.cpu_count()} CPUs")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in rows:  # per-request TTFTs are summarised; keep the JSON small
        for side in ("ours", "mlx_lm_server", "mlx_lm_server_native_jit"):
            if r[side]:
                r[side].pop("ttfts", None)
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "blas": blas_status(),
            "mlx_cpu_kernels_ours": jit_status(),
            "mlx_cpu_kernels_server": server_jits,
            "blas_threads_ours": args.blas_threads or "tuned per step",
            "blas_threads_server_tried": args.server_blas_threads,
            "load_avg_start": load_start,
            "load_avg_end": load_end,
        },
        "settings": {
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "trials": args.trials,
            "concurrency": levels,
            "temperature": 0,
            "mlx_lm_server_flags": f"--decode-concurrency {max(levels)} --prompt-concurrency {max(levels)} (other flags default)",
        },
        "rows": rows,
        "embeddings": emb,
        "note": (
            "tok_s: aggregate completion tokens/s over wall time (prefill included), median of the interleaved "
            "trials per side; decode_tok_s: concurrency x the median request's decode speed (tokens after its "
            "first over the time from its first text to its last), median of the trials; "
            "fresh prompts per trial, identical for both sides; warm-up excluded; TTFT = request start to "
            "first non-empty text, p50/p95 over all trials of a side"
        ),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
