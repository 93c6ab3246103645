"""Benchmark the API path against mlx_lm.server and against our own engine called in-process.

    .venv/bin/python bench/api.py [--size small|tiny | --model-dir DIR] [--concurrency 1,4,16]
                                  [--requests 16] [--max-tokens 32] [--skip-routing]
                                  [--out bench/results/api.json]

Arms, all on the same model directory, the same prompts, greedy decoding and the same
streaming HTTP client (httpx, one SSE parser) for every HTTP arm:

  engine    our engine in this process, no HTTP and no network (the TTFT reference for `direct`);
  mlx       client -> `mlx_lm.server` 0.32.2 (a subprocess, OpenBLAS preloaded);
  direct    client -> shim -> libp2p direct -> node, each role its own `python -m darkbloom`
            process with its own identity (relay, public node, private node, shim; paid serving
            with the shim's funded ledger account, as deployed);
  relayed   the same shim -> the private node, dialled through the relay's circuit
            (the `x-darkbloom-route` header of every answer is checked);
  routing   the shim's routing overhead alone: requests/s against a node whose engine answers
            at once (a labelled fake engine, `InstantEngine`, in this process; not a model).

For each arm and concurrency C, C clients send `--requests` streamed chat completions in all,
and we report TTFT p50/p95, per-token latency (gap between content chunks) p50/p95 and aggregate
completion tokens/s over the wall time. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from engine import free_port, start_mlx_server, wait_healthy  # noqa: E402  (bench/engine.py; loads BLAS first)

import httpx  # noqa: E402
import trio  # noqa: E402

from chaos.netproc import ProcNetwork  # noqa: E402  (roles as real processes, as in the chaos tests)
from darkbloom.inference.blas import blas_status  # noqa: E402
from darkbloom.inference.engine import TextDelta, open_engine  # noqa: E402
from darkbloom.inference.events import Admitted, ChoiceFinished, EngineLoad  # noqa: E402
from darkbloom.inference.params import parse_chat  # noqa: E402
from darkbloom.inference.testmodel import make_test_model  # noqa: E402

NO_END = {"0": -100, "2": -100}  # the test models' end tokens: every answer has exactly max_tokens
WORDS = "fox owl whale ant crow bear lynx moth eel yak hare wolf seal frog newt swan".split()


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def body(i: int, max_tokens: int, test_model: bool) -> dict[str, Any]:
    b: dict[str, Any] = {
        "messages": [{"role": "user", "content": f"Request {i}: tell me a story about a {WORDS[i % len(WORDS)]}."}],
        "max_tokens": max_tokens, "temperature": 0}
    if test_model:
        b["logit_bias"] = NO_END
    return b


@dataclass
class Run:
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    routes: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0

    def row(self) -> dict[str, Any]:
        return {"ttft_p50_ms": 1000 * pct(self.ttft, 0.5), "ttft_p95_ms": 1000 * pct(self.ttft, 0.95),
                "token_gap_p50_ms": 1000 * pct(self.gaps, 0.5), "token_gap_p95_ms": 1000 * pct(self.gaps, 0.95),
                "tokens": self.tokens, "wall_s": self.wall, "tok_per_s": self.tokens / self.wall if self.wall else 0.0,
                "requests_per_s": len(self.ttft) / self.wall if self.wall else 0.0,
                "ok": len(self.ttft), "errors": self.errors, "error_kinds": self.error_kinds, "routes": self.routes}

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


async def over_http(client: httpx.AsyncClient, url: str, model: str, n: int, concurrency: int, max_tokens: int,
                    test_model: bool, *, expect_route: str | None = None, retries: int = 0) -> Run:
    """`n` streamed chat completions from `concurrency` clients; `retries` per request on connection resets
    (mlx_lm.server listens with a backlog of 5; the TTFT clock keeps running across retries)."""
    run = Run()
    todo = list(range(n))

    async def one(i: int) -> None:
        req = {"model": model, "stream": True, "stream_options": {"include_usage": True}, **body(i, max_tokens, test_model)}
        t0 = time.perf_counter()
        for attempt in range(retries + 1):
            first = last = None
            chunks = usage = 0
            try:
                async with client.stream("POST", url, json=req) as resp:
                    if resp.status_code != 200:
                        detail = json.loads(await resp.aread() or b"{}").get("error") or {}
                        run.error(f"{resp.status_code} {detail.get('code') or detail.get('type') or ''}".strip())
                        return
                    route = resp.headers.get("x-darkbloom-route", "-")
                    run.routes[route] = run.routes.get(route, 0) + 1
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", ())):
                            now = time.perf_counter()
                            if first is None:
                                first = now - t0
                            else:
                                run.gaps.append(now - last)
                            last = now
                            chunks += 1
                        if chunk.get("usage"):
                            usage = chunk["usage"]["completion_tokens"]
                break
            except (httpx.ReadError, httpx.ConnectError, httpx.RemoteProtocolError) as exc:
                if chunks or attempt == retries:
                    run.error(type(exc).__name__)
                    return
                await trio.sleep(0.05)
        if first is None:
            run.error("no content")
            return
        run.ttft.append(first)
        run.tokens += usage or chunks
        if expect_route is not None and route != expect_route:
            raise RuntimeError(f"answer came {route}, expected {expect_route}")

    async def worker() -> None:
        while todo:
            await one(todo.pop(0))

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    run.wall = time.perf_counter() - started
    return run


async def in_process(engine: Any, model: str, n: int, concurrency: int, max_tokens: int, test_model: bool) -> Run:
    run = Run()
    todo = list(range(n))

    async def worker() -> None:
        while todo:
            i = todo.pop(0)
            t0 = time.perf_counter()
            first = last = None
            async with aclosing(engine.generate(model, parse_chat(body(i, max_tokens, test_model)))) as events:
                async for ev in events:
                    if isinstance(ev, TextDelta) and ev.text:
                        now = time.perf_counter()
                        if first is None:
                            first = now - t0
                        else:
                            run.gaps.append(now - last)
                        last = now
                    if isinstance(ev, TextDelta):
                        run.tokens += ev.tokens
            run.ttft.append(first if first is not None else time.perf_counter() - t0)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    run.wall = time.perf_counter() - started
    return run


class InstantEngine:
    """A FAKE engine for the routing-overhead arm only: answers every request at once with one token."""

    max_concurrent = 256
    max_queue = 256

    def load(self) -> EngineLoad:
        return EngineLoad(active=0, queued=0, max_concurrent=256)

    async def generate(self, model_id: str, req: Any):
        yield Admitted(prompt_tokens=8)
        yield TextDelta(index=0, text="ok", tokens=1)
        yield ChoiceFinished(index=0, finish_reason="length", completion_tokens=1, token_ids=(1,))


async def instant_node(relay_addr: str, data_dir: Path, model: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A real libp2p node in this process, serving `model` with InstantEngine (unpaid)."""
    from darkbloom.config import load_config
    from darkbloom.identity import load_or_create_identity
    from darkbloom.node.serve import InferenceService, serve_inference
    from darkbloom.p2p.network import open_network
    from darkbloom.wire.caps import CapabilityRecord, ModelCap
    from darkbloom.wire.infer import PROTOCOL_VERSION

    from chaos.procs import write_config

    cfg = load_config(write_config(data_dir / "instant.toml", p2p={
        "use_bundled_bootstrap": False, "listen_addrs": ["/ip4/127.0.0.1/tcp/0"], "bootstrap": [relay_addr],
        "reachability": "public"}))
    (data_dir / "instant").mkdir(exist_ok=True)
    identity = load_or_create_identity(data_dir / "instant")
    async with open_network(cfg.p2p, identity, role="node") as net:
        serve_inference(net, InferenceService(InstantEngine(), digests={model: "0" * 64}))
        await net.put_record(CapabilityRecord(
            peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0, max_concurrent=256, decode_tps=1e6,
            protocol_version=PROTOCOL_VERSION,
            models=(ModelCap(id=model, digest="0" * 64, context_length=2048, features=("chat",)),)))
        await net.provide(model)
        task_status.started()
        await trio.sleep_forever()


async def warm(client: httpx.AsyncClient, url: str, model: str, test_model: bool, deadline_s: float = 120) -> None:
    """Until the first answer comes (discovery, connections, lanes, prompt caches); then two more."""
    with trio.fail_after(deadline_s):
        while not (await over_http(client, url, model, 1, 1, 4, test_model)).ttft:
            await trio.sleep(0.5)  # the providers are not yet discoverable: ask again
    await over_http(client, url, model, 2, 2, 4, test_model)


async def main_async(args: argparse.Namespace, model_dir: Path, root: Path) -> dict[str, Any]:
    levels = [int(x) for x in args.concurrency.split(",")]
    test_model = args.model_dir is None
    out: dict[str, Any] = {"rows": []}
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    timeout = httpx.Timeout(300.0)
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        # engine, in this process
        async with open_engine([("bench", model_dir)], max_concurrent=max(levels), max_queue=256,
                               self_benchmark=False) as engine:
            await in_process(engine, "bench", 2, 2, 4, test_model)
            for c in levels:
                rows[("engine", c)] = (await in_process(engine, "bench", args.requests, c, args.max_tokens, test_model)).row()

        # mlx_lm.server
        port = free_port()
        with open(root / "mlx_server.log", "wb") as log:
            proc = start_mlx_server(model_dir, port, max(levels), 0, log)  # 0: BLAS threads as our nodes get them
            try:
                base = f"http://127.0.0.1:{port}"
                await wait_healthy(client, base, proc)
                url = f"{base}/v1/chat/completions"
                await over_http(client, url, "default_model", 2, 2, 4, test_model, retries=50)
                for c in levels:
                    rows[("mlx", c)] = (await over_http(client, url, "default_model", args.requests, c,
                                                        args.max_tokens, test_model, retries=50)).row()
            finally:
                proc.terminate()
                proc.wait(timeout=30)

        # the network: relay, public node, private node, shim, each its own process
        net = ProcNetwork(root, model_dir)
        try:
            net.start_relay()
            net.start_node("direct", model_id="bench-direct", max_concurrent=max(levels))
            # No DCUtR on either side: on loopback a hole punch always succeeds (py-libp2p's DCUtR also
            # drives one from the node's side), and this arm measures the relay's circuit.
            net.start_node("private", model_id="bench-relayed", reachability="private", max_concurrent=max(levels),
                           p2p={"hole_punch": False})
            net.wait_node("direct")
            net.wait_node("private")
            net.start_shim(p2p={"hole_punch": False}, first_token_timeout_s=60.0, request_timeout_s=300.0)
            url = net.shim_url + "/chat/completions"
            for arm, model, route in (("direct", "bench-direct", "direct"), ("relayed", "bench-relayed", "relayed")):
                await warm(client, url, model, test_model)
                for c in levels:
                    rows[(arm, c)] = (await over_http(client, url, model, args.requests, c, args.max_tokens,
                                                      test_model, expect_route=route)).row()
            if not args.skip_routing:
                async with trio.open_nursery() as nursery:
                    await nursery.start(instant_node, net.relay_addr, root, "bench-instant")
                    await warm(client, url, "bench-instant", test_model)
                    for c in levels:
                        rows[("routing", c)] = (await over_http(client, url, "bench-instant", max(args.requests, 8 * c),
                                                                c, 1, test_model)).row()
                    nursery.cancel_scope.cancel()
        finally:
            net.stop()
    for (arm, c), row in rows.items():
        out["rows"].append({"arm": arm, "concurrency": c, **row})
    return out


def print_table(results: dict[str, Any]) -> None:
    cfg = results["config"]
    print(f"API path: {cfg['model']}, {cfg['requests']} streamed requests x {cfg['max_tokens']} tokens per level, "
          f"greedy; load average at start {cfg['loadavg_start']}, at end {cfg['loadavg_end']}")
    print(f"{'arm':8} {'conc':>4} | {'TTFT p50':>9} {'p95':>9} | {'tok gap p50':>11} {'p95':>8} | {'tok/s':>7} "
          f"{'req/s':>7} | {'ok':>4} {'err':>3} route")
    for r in results["rows"]:
        kinds = ", ".join(f"{k} x{v}" for k, v in r["error_kinds"].items())
        print(f"{r['arm']:8} {r['concurrency']:>4} | {r['ttft_p50_ms']:7.1f}ms {r['ttft_p95_ms']:7.1f}ms | "
              f"{r['token_gap_p50_ms']:9.1f}ms {r['token_gap_p95_ms']:6.1f}ms | {r['tok_per_s']:7.1f} "
              f"{r['requests_per_s']:7.1f} | {r['ok']:>4} {r['errors']:>3} {','.join(r['routes']) or '-'}"
              + (f"  ({kinds})" if kinds else ""))
    by = {(r["arm"], r["concurrency"]): r for r in results["rows"]}
    print("\ntargets: direct TTFT p50 - engine TTFT p50 <= 10 ms; direct tok/s >= mlx tok/s; "
          "relayed TTFT p50 - direct TTFT p50 <= 25 ms")
    for c in sorted({r["concurrency"] for r in results["rows"]}):
        e, m, d, rl = (by.get((a, c)) for a in ("engine", "mlx", "direct", "relayed"))
        if not (e and m and d and rl):
            continue
        print(f"  c={c:<3} direct-engine TTFT {d['ttft_p50_ms'] - e['ttft_p50_ms']:+7.1f} ms | "
              f"direct/mlx tok/s {d['tok_per_s'] / m['tok_per_s']:.2f}x | "
              f"relayed-direct TTFT {rl['ttft_p50_ms'] - d['ttft_p50_ms']:+7.1f} ms")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=("tiny", "small"), default="small")
    ap.add_argument("--model-dir", type=Path, default=None, help="an mlx-lm model directory instead of a test model")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--skip-routing", action="store_true")
    ap.add_argument("--out", default="bench/results/api.json")
    args = ap.parse_args()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = args.model_dir or make_test_model(root / "model", args.size)
        results = trio.run(main_async, args, model_dir, root)
    results["config"] = {"model": str(args.model_dir) if args.model_dir else f"{args.size} test model",
                         "requests": args.requests, "max_tokens": args.max_tokens, "machine": platform.machine(),
                         "cpus": os.cpu_count(), "blas": str(blas_status()),
                         "loadavg_start": round(load0[0], 2), "loadavg_end": round(os.getloadavg()[0], 2)}
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
