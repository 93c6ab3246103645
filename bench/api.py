"""Benchmark the API path: openai SDK -> shim (HTTP) -> router -> libp2p (127.0.0.1) -> node -> engine.

    .venv/bin/python bench/api.py [--size tiny|small] [--nodes 2] [--concurrency 1,4,8]
                                  [--requests 16] [--max-tokens 32] [--out bench/results/api.json]

For each concurrency level it streams `--requests` chat completions (greedy, fixed length) and
reports time to first token (p50/p95), end-to-end latency, and aggregate completion tokens/s,
then the same request count straight against one node's engine for the shim+network overhead.
Prints a table and writes JSON. Uses a random test model (real tokenizer) built in a temp dir.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import aclosing
from functools import partial
from pathlib import Path

from darkbloom.inference.blas import blas_status, ensure_blas

ensure_blas()

import openai  # noqa: E402
import trio  # noqa: E402

from darkbloom.api.app import serve  # noqa: E402
from darkbloom.api.metrics import Metrics  # noqa: E402
from darkbloom.api.network import NetworkBackend  # noqa: E402
from darkbloom.config import ApiConfig  # noqa: E402
from darkbloom.inference.catalog import model_info  # noqa: E402
from darkbloom.inference.engine import TextDelta, open_engine  # noqa: E402
from darkbloom.inference.params import parse_chat  # noqa: E402
from darkbloom.inference.testmodel import make_test_model  # noqa: E402
from darkbloom.node.serve import InferenceService, serve_inference  # noqa: E402
from darkbloom.p2p.testing import swarm  # noqa: E402
from darkbloom.wire.caps import CapabilityRecord, ModelCap  # noqa: E402
from darkbloom.wire.infer import PROTOCOL_VERSION  # noqa: E402

MODEL = "bench-chat"
NO_END = {"0": -100, "2": -100}  # test models' end tokens: every answer has exactly max_tokens


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def _body(i: int, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Request number {i}: tell me a story."}],
            "max_tokens": max_tokens, "temperature": 0, "logit_bias": NO_END}


async def _node(s, model_dir: Path, max_concurrent: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    info = model_info(MODEL, model_dir, "chat")
    async with open_engine([(MODEL, model_dir)], max_concurrent=max_concurrent, max_queue=256,
                           self_benchmark=False) as engine:
        member = await s.add("node")
        serve_inference(member.net, InferenceService(engine, digests={MODEL: info.digest}))
        await member.net.put_record(CapabilityRecord(
            peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0, max_concurrent=max_concurrent, decode_tps=100.0,
            protocol_version=PROTOCOL_VERSION,
            models=(ModelCap(id=MODEL, digest=info.digest, context_length=info.context_length, features=info.features),)))
        await member.net.provide(MODEL)
        task_status.started(engine)
        await trio.sleep_forever()


async def _through_shim(url: str, n: int, concurrency: int, max_tokens: int) -> dict:
    ttft: list[float] = []
    latency: list[float] = []
    tokens = 0
    limiter = trio.CapacityLimiter(concurrency)

    async def one(i: int, client: openai.AsyncOpenAI) -> None:
        nonlocal tokens
        async with limiter:
            t0 = time.perf_counter()
            first = None
            stream = await client.chat.completions.create(model=MODEL, stream=True,
                                                          stream_options={"include_usage": True},
                                                          **_body(i, max_tokens))
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - t0
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
            latency.append(time.perf_counter() - t0)
            ttft.append(first if first is not None else latency[-1])

    async with openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0) as client:
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i, client)
        wall = time.perf_counter() - started
    return {"ttft_p50_ms": 1000 * _pct(ttft, 0.5), "ttft_p95_ms": 1000 * _pct(ttft, 0.95),
            "latency_p50_ms": 1000 * statistics.median(latency), "tokens": tokens, "wall_s": wall,
            "tok_per_s": tokens / wall}


async def _direct(engine, n: int, concurrency: int, max_tokens: int) -> dict:
    ttft: list[float] = []
    tokens = 0
    limiter = trio.CapacityLimiter(concurrency)

    async def one(i: int) -> None:
        nonlocal tokens
        async with limiter:
            t0 = time.perf_counter()
            first = None
            async with aclosing(engine.generate(MODEL, parse_chat(_body(i, max_tokens)))) as events:
                async for ev in events:
                    if isinstance(ev, TextDelta):
                        tokens += ev.tokens
                        if first is None and ev.text:
                            first = time.perf_counter() - t0
            ttft.append(first if first is not None else time.perf_counter() - t0)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    wall = time.perf_counter() - started
    return {"ttft_p50_ms": 1000 * _pct(ttft, 0.5), "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall}


async def _main(args: argparse.Namespace, model_dir: Path) -> dict:
    levels = [int(x) for x in args.concurrency.split(",")]
    results: dict = {"rows": []}
    async with swarm(nodes=0, relays=1, clients=0) as s:
        engines = [await s.nursery.start(partial(_node, s, model_dir, max(levels))) for _ in range(args.nodes)]
        shim = await s.add("shim")
        backend = NetworkBackend(shim.net, ApiConfig())
        metrics = Metrics()
        url = await s.nursery.start(partial(serve, ApiConfig(port=0), backend, metrics=metrics))
        url += "/v1"
        await _through_shim(url, 2, 1, 4)  # warm-up: connections, prompt caches, compiled kernels
        for c in levels:
            shim_row = await _through_shim(url, args.requests, c, args.max_tokens)
            direct_row = await _direct(engines[0], args.requests, c, args.max_tokens)
            results["rows"].append({"concurrency": c, "shim": shim_row, "direct_one_node": direct_row})
        results["failovers"] = metrics.failovers
        s.nursery.cancel_scope.cancel()
    return results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=("tiny", "small"), default="tiny")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="bench/results/api.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_test_model(Path(tmp) / args.size, args.size)
        results = trio.run(_main, args, model_dir)
    results["config"] = {"size": args.size, "nodes": args.nodes, "requests": args.requests,
                         "max_tokens": args.max_tokens, "machine": platform.machine(), "blas": str(blas_status())}
    print(f"API path: {args.nodes} node(s), {args.size} test model, {args.requests} streamed requests x "
          f"{args.max_tokens} tokens per level")
    print(f"{'conc':>4} | {'shim TTFT p50':>13} {'p95':>8} {'latency p50':>11} {'tok/s':>7} | "
          f"{'1 node direct TTFT p50':>22} {'tok/s':>7}")
    for row in results["rows"]:
        sh, d = row["shim"], row["direct_one_node"]
        print(f"{row['concurrency']:>4} | {sh['ttft_p50_ms']:>10.1f} ms {sh['ttft_p95_ms']:>5.1f} ms "
              f"{sh['latency_p50_ms']:>8.1f} ms {sh['tok_per_s']:>7.1f} | {d['ttft_p50_ms']:>19.1f} ms {d['tok_per_s']:>7.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
