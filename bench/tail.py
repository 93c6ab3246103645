"""Tail latency with one slow node among four: p50/p95/p99 TTFT with and without hedging.

    .venv/bin/python bench/tail.py [--mode sim|live|net|both|all] [--requests 2000] [--live-requests 120]
                                   [--slow-delay-s 1.5] [--out bench/results/tail.json]

Both modes use the real hedging code (darkbloom.api.trust.hedge: `hedge_delay` on a
TrustBook TTFT window, `race` cancelling the loser) and pick the first node uniformly among
the four (load spreading with no history, the worst case for a slow node); the hedge goes
to another node. Per-attempt TTFT (from that attempt's own start) feeds the window; a
cancelled loser's TTFT is unknown and not recorded.

- sim: trio's MockClock; a fast node's TTFT is log-normal (median 150 ms, sigma 0.35), the
  slow node's log-normal (median 1.5 s, sigma 0.5). Deterministic (seeded), seconds to run.
- live: four real engines serving the project's tiny test model in this process (one MLX
  thread each); the slow node is a real engine whose requests wait `--slow-delay-s` before
  being admitted (standing in for a distant or overloaded machine; the delay is the only
  stand-in). TTFT is measured to the first generated text. Concurrency 1, so the numbers
  are about the tail, not about CPU contention between the four engines.
- net: the whole path: four real nodes on libp2p (127.0.0.1) with the real node handler, the
  real shim (NetworkBackend + TrustedRouting, hedging on or off) behind HTTP, the official
  openai client streaming; TTFT = request to first content chunk at the client. All four
  records claim the same speed; the slow node waits `--slow-delay-s` before each answer
  (injected). Here routing itself learns to avoid the slow node after its first answers,
  so the tail comes from load spreading (two clients at once) and re-probing. The first 12
  requests (discovery, dials, engine warm-up) are not counted.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

from darkbloom.inference.blas import ensure_blas

ensure_blas()

import trio  # noqa: E402
import trio.testing  # noqa: E402

from darkbloom.api.trust.hedge import HedgePolicy, hedge_delay, race  # noqa: E402
from darkbloom.api.trust.reputation_mix import TrustBook  # noqa: E402
from darkbloom.api.trust.stats import quantile  # noqa: E402

NODES = ["fast-a", "fast-b", "fast-c", "slow-d"]


def summarise(ttfts: list[float]) -> dict[str, float]:
    return {f"p{int(q * 100)}": quantile(ttfts, q) for q in (0.5, 0.95, 0.99)} | {"mean": sum(ttfts) / len(ttfts)}


async def run_requests(n: int, attempt_factory, hedge: bool, rng: random.Random, model: str = "m") -> dict[str, Any]:
    """Issue n requests one after another; attempt_factory(node) -> async () -> per-attempt TTFT."""
    book = TrustBook()
    policy = HedgePolicy(enabled=hedge, min_samples=20, default_delay_s=1.0, min_delay_s=0.02)
    ttfts: list[float] = []
    hedged = 0
    won_by_hedge = 0
    for _ in range(n):
        first = rng.randrange(len(NODES))
        second = rng.choice([i for i in range(len(NODES)) if i != first])
        order = [NODES[first], NODES[second]]
        delay = hedge_delay(policy, book.ttft_window(model)._samples)
        t0 = trio.current_time()

        async def discard(value: Any) -> None:
            await trio.lowlevel.checkpoint()

        out = await race([attempt_factory(order[0]), attempt_factory(order[1])], delay_s=delay, discard=discard, max_parallel=2)
        assert out.winner is not None
        total = trio.current_time() - t0
        ttfts.append(total)
        hedged += len(out.started) > 1
        won_by_hedge += out.winner == 1
        node = order[out.winner]
        own = trio.current_time() - out.started_at[out.winner]
        book.record_success(node, trio.current_time(), model=model, ttft_s=own)
        for i in out.cancelled:
            book.record_cancelled(order[i])
    return {"ttft": summarise(ttfts), "hedged": hedged, "won_by_hedge": won_by_hedge, "n": n,
            "final_hedge_delay_s": hedge_delay(policy, book.ttft_window(model)._samples)}


def run_sim(n: int, seed: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for hedge in (False, True):
        rng = random.Random(seed)
        lat_rng = random.Random(seed + 1)

        def factory(node: str):
            median, sigma = (1.5, 0.5) if node.startswith("slow") else (0.15, 0.35)

            async def attempt() -> str:
                await trio.sleep(median * math.exp(lat_rng.gauss(0.0, sigma)))
                return node

            return attempt

        async def main() -> dict[str, Any]:
            return await run_requests(n, factory, hedge, rng)

        results["hedged" if hedge else "plain"] = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return results


def run_live(n: int, seed: int, slow_delay_s: float) -> dict[str, Any]:
    from darkbloom.inference.engine import TextDelta, open_engine
    from darkbloom.inference.params import parse_chat
    from darkbloom.inference.testmodel import make_test_model

    model_dir = make_test_model(Path("/tmp/darkbloom-bench-tail") / "tiny", "tiny", seed=0)
    results: dict[str, Any] = {}

    async def main() -> None:
        async with (
            open_engine([("tiny", model_dir)], max_concurrent=2, self_benchmark=False) as e0,
            open_engine([("tiny", model_dir)], max_concurrent=2, self_benchmark=False) as e1,
            open_engine([("tiny", model_dir)], max_concurrent=2, self_benchmark=False) as e2,
            open_engine([("tiny", model_dir)], max_concurrent=2, self_benchmark=False) as e3,
        ):
            engines = dict(zip(NODES, (e0, e1, e2, e3)))
            prompt_rng = random.Random(seed + 2)

            def factory(node: str):
                async def attempt() -> str:
                    if node.startswith("slow"):
                        await trio.sleep(slow_delay_s)
                    req = parse_chat({"messages": [{"role": "user", "content": f"Fact {prompt_rng.randrange(10**6)}: tell me."}],
                                      "max_tokens": 4, "temperature": 0})
                    gen = engines[node].generate("tiny", req)
                    try:
                        async for ev in gen:
                            if isinstance(ev, TextDelta):
                                return node
                    finally:
                        await gen.aclose()  # the loser (or the winner after its first token) stops generating
                    return node

                return attempt

            for hedge in (False, True):
                t = time.monotonic()
                results["hedged" if hedge else "plain"] = await run_requests(n, factory, hedge, random.Random(seed))
                print(f"  live {'hedged' if hedge else 'plain'}: {time.monotonic() - t:.0f}s", file=sys.stderr)

    trio.run(main)
    return results


def run_net(n: int, slow_delay_s: float) -> dict[str, Any]:
    from contextlib import AsyncExitStack, aclosing
    from functools import partial

    import openai

    from darkbloom.api.app import serve
    from darkbloom.metrics import ShimMetrics as Metrics
    from darkbloom.api.network import NetworkBackend
    from darkbloom.api.trust.routing import TrustedRouting
    from darkbloom.config import ApiConfig
    from darkbloom.inference.catalog import model_info
    from darkbloom.inference.engine import open_engine
    from darkbloom.inference.testmodel import make_test_model
    from darkbloom.node.serve import InferenceService, serve_inference
    from darkbloom.p2p.testing import swarm
    from darkbloom.wire.caps import CapabilityRecord, ModelCap
    from darkbloom.wire.infer import PROTOCOL_VERSION

    import logging

    logging.getLogger("libp2p").setLevel(logging.ERROR)  # DHT chatter between short-lived test hosts
    warmup = 12  # first requests pay discovery, dials and engine warm-up: measured apart
    model = "tiny-chat"
    model_dir = make_test_model(Path("/tmp/darkbloom-bench-tail") / "tiny", "tiny", seed=0)
    info = model_info(model, model_dir, "chat")

    class Delayed:
        """A real engine that waits before answering (the injected slowness of the slow node)."""

        def __init__(self, engine: Any, delay_s: float) -> None:
            self.engine, self.delay_s = engine, delay_s

        def __getattr__(self, name: str) -> Any:
            return getattr(self.engine, name)

        async def generate(self, model_id: str, req: Any):
            await trio.sleep(self.delay_s)
            async with aclosing(self.engine.generate(model_id, req)) as events:
                async for event in events:
                    yield event

    async def node(s, delay_s: float, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with AsyncExitStack() as stack:
            engine = await stack.enter_async_context(open_engine([(model, model_dir)], max_concurrent=4, self_benchmark=False))
            if delay_s:
                engine = Delayed(engine, delay_s)
            member = await s.add("node")
            serve_inference(member.net, InferenceService(engine, digests={model: info.digest}, embedders={}))
            cap = ModelCap(id=model, digest=info.digest, context_length=info.context_length,
                           quantization=info.quantization, features=info.features)
            await member.net.put_record(CapabilityRecord(
                peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0, models=(cap,), decode_tps=100.0, max_concurrent=4,
                price_input_per_m=100, price_output_per_m=400, software_version="bench", protocol_version=PROTOCOL_VERSION))
            await member.net.provide(model)
            task_status.started(member.peer_id)
            await trio.sleep_forever()

    results: dict[str, Any] = {}

    async def main() -> None:
        for hedge in (False, True):
            async with swarm(nodes=0, relays=1, clients=0) as s:
                for delay in (0.0, 0.0, 0.0, slow_delay_s):
                    await s.nursery.start(partial(node, s, delay))
                shim = await s.add("shim")
                cfg = ApiConfig(host="127.0.0.1", port=0, hedge=hedge)
                trusted = TrustedRouting(hedge=HedgePolicy(enabled=hedge, min_samples=20, default_delay_s=1.0))
                backend = NetworkBackend(shim.net, cfg, known_models={model}, trust=trusted)
                ttfts: list[float] = []
                async with trio.open_nursery() as http:
                    url = await http.start(partial(serve, cfg, backend, metrics=Metrics()))
                    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="local", max_retries=0) as client:
                        counter = iter(range(n + warmup))

                        async def user() -> None:
                            for i in counter:
                                t0 = time.monotonic()
                                stream = await client.chat.completions.create(
                                    model=model, max_tokens=4, temperature=0, stream=True,
                                    messages=[{"role": "user", "content": f"Fact {i}: tell me."}])
                                first = None
                                async for chunk in stream:
                                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                                        first = time.monotonic() - t0
                                if i >= warmup:
                                    ttfts.append(first if first is not None else time.monotonic() - t0)

                        t = time.monotonic()
                        async with trio.open_nursery() as users:
                            for _ in range(2):
                                users.start_soon(user)
                        print(f"  net {'hedged' if hedge else 'plain'}: {time.monotonic() - t:.0f}s", file=sys.stderr)
                    http.cancel_scope.cancel()
                results["hedged" if hedge else "plain"] = {"ttft": summarise(ttfts), "n": len(ttfts), "hedged": None,
                                                           "won_by_hedge": None}

    trio.run(main)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("sim", "live", "net", "both", "all"), default="both")
    ap.add_argument("--net-requests", type=int, default=100)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--live-requests", type=int, default=120)
    ap.add_argument("--slow-delay-s", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/tail.json")
    args = ap.parse_args()
    report: dict[str, Any] = {"nodes": NODES}
    if args.mode in ("sim", "both", "all"):
        report["sim"] = run_sim(args.requests, args.seed)
    if args.mode in ("net", "all"):
        report["net"] = run_net(args.net_requests, args.slow_delay_s)
    if args.mode in ("live", "both", "all"):
        report["live"] = run_live(args.live_requests, args.seed, args.slow_delay_s)
        report["live_slow_delay_s"] = args.slow_delay_s
    print(f"{'mode':<5} {'hedging':<8} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'hedged':>7} {'hedge won':>9}")
    for mode in ("sim", "live", "net"):
        for key in ("plain", "hedged"):
            r = report.get(mode, {}).get(key)
            if r:
                t = r["ttft"]
                hedged = "-" if r["hedged"] is None else r["hedged"]
                won = "-" if r["won_by_hedge"] is None else r["won_by_hedge"]
                print(f"{mode:<5} {key:<8} {r['n']:>5} {t['p50'] * 1000:>8.0f} {t['p95'] * 1000:>8.0f} {t['p99'] * 1000:>8.0f} "
                      f"{hedged:>7} {won:>9}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
