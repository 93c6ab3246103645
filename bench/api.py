"""Benchmark the API path against mlx_lm.server and against our own engine called in-process.

    .venv/bin/python bench/api.py [--size small|tiny | --model-dir DIR] [--concurrency 1,4,16]
                                  [--requests 16] [--max-tokens 32] [--skip-routing]
                                  [--out bench/results/api.json]

Arms, all on the same model directory, the same prompts, greedy decoding and the same
streaming HTTP client (httpx, one SSE parser) for every HTTP arm:

  engine    our engine in this process, no HTTP and no network (the TTFT reference for `direct`);
  mlx       client -> `mlx_lm.server` 0.32.2 (a subprocess, OpenBLAS preloaded, as shipped
            otherwise: MLX's stock kernel flags and its own kernel cache; see bench/engine.py);
  direct    client -> shim -> libp2p direct -> node, each role its own `python -m darkbloom`
            process with its own identity (relay, public node, private node, shim; paid serving
            with the shim's funded ledger account, as deployed);
  relayed   the same shim -> the private node, dialled through the relay's circuit
            (the `x-darkbloom-route` header of every answer is checked);
  routing   the shim's routing overhead alone: requests/s against a node whose engine answers
            at once (a labelled fake engine, `InstantEngine`, in this process; not a model);
  engine~   (diagnosis, not a target) the `engine` arm with the clients' first requests spread
            evenly over --stagger-ms (0: off): in process every client's requests start in the
            same step and finish in the same step, so each wave is prefilled as one batch; through
            the network they arrive spread out and stay so. This arm shows what the spread alone
            costs the engine, with no network in the way.

Before the levels, each arm gets one wave at the top concurrency (`cold_start` in the JSON): it
opens what a concurrent slot needs once (an HTTP connection; on the network arms a payment lane
to the node at the relay's ledger, whose SQLite commit is fsynced), so the levels measure the
steady state. Compare arms within one run only, and read `loadavg_*` and the run-queue wait per
process: on a shared 2-core machine, waiting for a core dominates every arm's latency.

For each arm and concurrency C, C clients send `--requests` streamed chat completions in all,
and we report TTFT p50/p95, per-token latency (gap between content chunks) p50/p95 and aggregate
completion tokens/s over the wall time, and the CPU time each process (bench client, shim,
relay, node) spent per request at that level. Prints a table and writes JSON.

`--timeline` (diagnosis; it adds logging work to every process, so its figures are not the
benchmark's): every role logs one request's hops with monotonic timestamps
(darkbloom.api.timeline, DEBUG, ids and timings only), the engine thread is wrapped to log
when a request reaches it and each BatchGenerator step (a diagnosis-only patch applied through
CHAOS_PYTHONPATH, the hook tests/chaos/procs.py offers; darkbloom/inference is not changed), and
the bench prints, per arm and level, the p50 time from the client's send to each hop.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import sys
import re
import queue
import shutil
import subprocess
import tempfile
import threading
import textwrap
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

from chaos import netproc  # noqa: E402
from chaos.netproc import ProcNetwork  # noqa: E402  (roles as real processes, as in the chaos tests)
from chaos.procs import Daemon  # noqa: E402
from darkbloom.inference.blas import blas_status  # noqa: E402
from darkbloom.log import configure as configure_logging  # noqa: E402
from darkbloom.inference.engine import TextDelta, open_engine  # noqa: E402
from darkbloom.inference.events import Admitted, ChoiceFinished, EngineLoad  # noqa: E402
from darkbloom.inference.params import parse_chat  # noqa: E402
from darkbloom.inference.testmodel import make_test_model  # noqa: E402

# Diagnosis only (--timeline): imported by every role process through CHAOS_PYTHONPATH, and applied
# to this process for the in-process arm. It turns the timeline loggers on and wraps three engine
# thread methods to log when a request reaches the thread, each BatchGenerator step (what it held)
# and each request's first token. It changes no behaviour; darkbloom/inference is not edited.
DIAG_SITECUSTOMIZE = textwrap.dedent('''
    import logging, time
    logging.getLogger("darkbloom.timeline").setLevel(logging.DEBUG)

    def _darkbloom_patch_engine():
        from darkbloom.inference import worker as W
        log = logging.getLogger("darkbloom.timeline.engine")
        submit, step, emit = W.Worker._submit, W.Worker._step, W.Worker._emit
        def _submit(self, job):
            log.debug("engine rid=%d recv t=%.6f", job.rid, time.monotonic())
            submit(self, job)
        def _step(self, m):
            g = m.generator
            sizes = (len(g._generation_batch), len(g._prompt_batch), len(g._unprocessed_sequences))
            t0 = time.monotonic()
            step(self, m)
            log.debug("engine step t0=%.6f t1=%.6f gen=%d prompt=%d unprocessed=%d", t0, time.monotonic(), *sizes)
        def _emit(self, job, event):
            if isinstance(event, W.TextDelta) and not getattr(job, "_tl_first", False):
                job._tl_first = True
                log.debug("engine rid=%d first_token t=%.6f", job.rid, time.monotonic())
            emit(self, job, event)
        W.Worker._submit, W.Worker._step, W.Worker._emit = _submit, _step, _emit

    _darkbloom_patch_engine()

    def _darkbloom_stall_probes():
        # Long pauses of a whole process, written to a side file next to this one: garbage collections
        # and log writes (a blocked stderr pipe) over 20 ms, with their monotonic end time.
        import gc, os, sys
        path = os.path.join(os.path.dirname(__file__), f"stalls.{os.getpid()}.log")
        role = next((a for a in sys.argv[1:] if a in ("shim", "node", "relay")), "bench")
        def note(what, ms):
            try:
                with open(path, "a") as f:
                    f.write(f"{role} {what} ms={ms:.1f} t={time.monotonic():.6f}\\n")
            except OSError:
                pass  # the run's directory is gone (this process is exiting)
        started = [0.0]
        def on_gc(phase, info):
            if phase == "start":
                started[0] = time.monotonic()
            elif (ms := 1000 * (time.monotonic() - started[0])) > 20:
                note(f"gc gen={info.get('generation')}", ms)
        gc.callbacks.append(on_gc)
        emit = logging.StreamHandler.emit
        def timed_emit(self, record):
            t0 = time.monotonic()
            emit(self, record)
            if (ms := 1000 * (time.monotonic() - t0)) > 20:
                note("log write", ms)
        logging.StreamHandler.emit = timed_emit

    _darkbloom_stall_probes()
''')
TIMELINE_RE = re.compile(r"timeline (\S+) (\w+) t=([\d.]+)")
ENGINE_RE = re.compile(r"engine rid=(\d+) (\w+) t=([\d.]+)")
STEP_RE = re.compile(r"engine step t0=([\d.]+) t1=([\d.]+) gen=(\d+) prompt=(\d+) unprocessed=(\d+)")
PATH = ("http_in", "parsed", "routed", "stream_opening", "stream_open", "stream_in", "request_read", "submit",
        "engine_recv", "admitted", "accepted", "engine_first_token", "first_token", "first_write", "first_frame",
        "sse_first", "client_first")

ARMS = {  # written into the JSON, so the file explains itself
    "engine": "our engine in the bench process, no HTTP, no network: the TTFT reference for direct",
    "engine~": "diagnosis, not a target: the engine arm with the clients' first requests spread over stagger_ms "
               "(arrivals then stay spread, as through the network; in the engine arm each wave arrives at once "
               "and is prefilled as one batch)",
    "mlx": "client -> mlx_lm.server 0.32.2 (subprocess), same model and prompts",
    "direct": "client -> shim -> libp2p direct -> node; relay, node and shim are separate processes; paid lanes",
    "relayed": "the same through the relay's circuit (route checked on every answer, DCUtR off)",
    "routing": "routing overhead alone: the shim against a node whose engine answers at once "
               "(InstantEngine, a labelled fake, 1 token; in the bench process)",
}
ROW_KEYS = {
    "ttft_*": "client send -> first content chunk",
    "token_gap_*": "gap between content chunks at the client",
    "tok_per_s": "completion tokens over the level's wall time, all clients",
    "cpu_ms_per_request": "user+system CPU per answered request, per process ('client' = the bench process)",
    "runqueue_wait_ms_per_request": "time the process's threads were runnable but waiting for a core, per request",
    "lanes_opened": "payment lanes the shim opened at the ledger during the level",
    "cold_start": "the warm-up's first wave at the top concurrency (new connections, one lane per slot), apart",
    "timeline": "--timeline runs only: p50 ms from the client's send to each hop (darkbloom.api.timeline)",
}
IN_PROCESS_IDS = itertools.count()
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
    reqs: list[tuple[str, float, float]] = field(default_factory=list)  # (request id, send, first content): monotonic
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)  # process -> CPU ms per request at this level
    wait_ms_per_request: dict[str, float] = field(default_factory=dict)  # process -> run-queue wait ms per request
    lanes_opened: int | None = None  # payment lanes the shim opened at the ledger during this level

    def row(self) -> dict[str, Any]:
        return {"cpu_ms_per_request": {k: round(v, 2) for k, v in self.cpu_ms_per_request.items()},
                "runqueue_wait_ms_per_request": {k: round(v, 2) for k, v in self.wait_ms_per_request.items()},
                "lanes_opened": self.lanes_opened,
                "ttft_p50_ms": 1000 * pct(self.ttft, 0.5), "ttft_p95_ms": 1000 * pct(self.ttft, 0.95),
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
        t0 = time.monotonic()
        rid = "-"
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
                    rid = resp.headers.get("x-request-id", "-")
                    run.routes[route] = run.routes.get(route, 0) + 1
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", ())):
                            now = time.monotonic()
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
        run.reqs.append((rid, t0, t0 + first))
        run.tokens += usage or chunks
        if expect_route is not None and route != expect_route:
            raise RuntimeError(f"answer came {route}, expected {expect_route}")

    async def worker() -> None:
        while todo:
            await one(todo.pop(0))

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    run.wall = time.monotonic() - started
    return run


async def in_process(engine: Any, model: str, n: int, concurrency: int, max_tokens: int, test_model: bool,
                     stagger_s: float = 0.0) -> Run:
    """`n` requests from `concurrency` clients straight into the engine. With `stagger_s`, client k
    sends its first request k * stagger_s late, so arrivals come spread out as they do through the
    network (all at once, the clients' requests also finish together and come back together)."""
    run = Run()
    todo = list(range(n))

    async def worker(k: int) -> None:
        await trio.sleep(k * stagger_s)
        while todo:
            i = todo.pop(0)
            label = f"in-process-{next(IN_PROCESS_IDS)}"  # in generate() call order: engine rid = number + 1
            t0 = time.monotonic()
            first = last = None
            async with aclosing(engine.generate(model, parse_chat(body(i, max_tokens, test_model)))) as events:
                async for ev in events:
                    if isinstance(ev, TextDelta) and ev.text:
                        now = time.monotonic()
                        if first is None:
                            first = now - t0
                        else:
                            run.gaps.append(now - last)
                        last = now
                    if isinstance(ev, TextDelta):
                        run.tokens += ev.tokens
            run.ttft.append(first if first is not None else time.monotonic() - t0)
            run.reqs.append((label, t0, t0 + run.ttft[-1]))

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for k in range(concurrency):
            nursery.start_soon(worker, k)
    run.wall = time.monotonic() - started
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


async def warm(client: httpx.AsyncClient, url: str, model: str, test_model: bool, concurrency: int,
               deadline_s: float = 120, **kw: Any) -> Run:
    """Until the first answer comes (discovery); then one wave of `concurrency` requests at once, which
    opens what each concurrent slot needs once (an HTTP connection; on the network arms a payment lane
    to the node, opened at the relay's ledger). Returns that cold wave, reported apart as `cold_start`:
    the levels after it measure the steady state."""
    with trio.fail_after(deadline_s):
        while not (await over_http(client, url, model, 1, 1, 4, test_model, **kw)).ttft:
            await trio.sleep(0.5)  # the providers are not yet discoverable: ask again
    return await over_http(client, url, model, concurrency, concurrency, 4, test_model, **kw)


def cold_row(run: Run) -> dict[str, Any]:
    return {"concurrency": len(run.ttft) + run.errors, "ttft_p50_ms": 1000 * pct(run.ttft, 0.5),
            "ttft_p95_ms": 1000 * pct(run.ttft, 0.95), "lanes_opened": run.lanes_opened, "errors": run.errors}


TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of process `pid` (None: this process, all its threads)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def runqueue_wait_s(pid: int | None) -> float:
    """Seconds the threads of process `pid` (None: this one) spent runnable but waiting for a CPU
    (/proc/<pid>/task/*/schedstat, field 2): the cost of sharing the cores, per process."""
    total = 0
    task_dir = Path(f"/proc/{pid or os.getpid()}/task")
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return float("nan")
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def log_count(path: Path | None, needle: str) -> int:
    if path is None or not path.exists():
        return 0
    return sum(1 for line in path.read_text(errors="replace").splitlines() if needle in line)


async def measured(procs: dict[str, int | None], run_coro: Any, shim_log: Path | None = None) -> Run:
    """Run one level; attach each process's CPU ms and run-queue wait ms per answered request, and
    the payment lanes the shim opened at the ledger meanwhile."""
    before = {k: (cpu_s(pid), runqueue_wait_s(pid)) for k, pid in procs.items()}
    lanes0 = log_count(shim_log, " opened to node ")
    run = await run_coro
    n = max(1, len(run.ttft))
    run.cpu_ms_per_request = {k: 1000 * (cpu_s(pid) - before[k][0]) / n for k, pid in procs.items()}
    run.wait_ms_per_request = {k: 1000 * (runqueue_wait_s(pid) - before[k][1]) / n for k, pid in procs.items()}
    if shim_log is not None:
        run.lanes_opened = log_count(shim_log, " opened to node ") - lanes0
    return run


class FileDaemon(Daemon):
    """A role process whose output goes straight to its log file, read back as it grows.

    chaos.procs.Daemon pipes the output to a thread of this process; while this process was busy
    with 16 streaming clients the pipe filled and the shim's next log write blocked its whole event
    loop (measured: 178 and 201 ms stalls in one c=16 level with --timeline; the shim at -v, as
    the chaos tests run it, writes far more)."""

    def start(self) -> None:
        self.starts += 1
        self.lines = queue.Queue()
        self.output = []
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "darkbloom", *self.args], stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self._pump = threading.Thread(target=self._tail, args=(self.proc, self.lines, self.log_path), daemon=True)
        self._pump.start()

    @staticmethod
    def _tail(proc: subprocess.Popen[bytes], lines: queue.Queue[str | None], path: Path) -> None:
        with open(path, errors="replace") as f:
            rest = ""
            while True:
                chunk = f.read()
                if chunk:
                    *done, rest = (rest + chunk).split("\n")
                    for line in done:
                        lines.put(line + "\n")
                elif proc.poll() is not None:
                    break
                else:
                    time.sleep(0.05)  # polling a file for new lines, not synchronising with anything
        lines.put(None)


netproc.Daemon = FileDaemon  # ProcNetwork starts every role through this name


class Collect(logging.Handler):
    """This process's timeline lines (the in-process arm), as the role processes write them to their logs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def parse_lines(lines: list[str]) -> tuple[dict[str, dict[str, float]], list[str], dict[int, dict[str, float]],
                                           list[tuple[float, float, int, int, int]]]:
    """(request id -> event -> t, request ids in order of their node `submit`, engine rid -> event -> t, steps)."""
    marks: dict[str, dict[str, float]] = {}
    submits: list[str] = []
    engine: dict[int, dict[str, float]] = {}
    steps: list[tuple[float, float, int, int, int]] = []
    for line in lines:
        if m := TIMELINE_RE.search(line):
            marks.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
            if m.group(2) == "submit":
                submits.append(m.group(1))
        elif m := ENGINE_RE.search(line):
            engine.setdefault(int(m.group(1)), {})[m.group(2)] = float(m.group(3))
        elif m := STEP_RE.search(line):
            steps.append((float(m.group(1)), float(m.group(2)), int(m.group(3)), int(m.group(4)), int(m.group(5))))
    return marks, submits, engine, steps


def engine_marks(submits: list[str], engine: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The engine thread's events by request id: engine rids count generate() calls in submit order."""
    out: dict[str, dict[str, float]] = {}
    for i, rid in enumerate(submits, start=1):
        ev = engine.get(i, {})
        out[rid] = {f"engine_{k}": v for k, v in ev.items()}
    return out


def timeline_summary(run: Run, marks: dict[str, dict[str, float]],
                     steps: list[tuple[float, float, int, int, int]]) -> dict[str, Any]:
    """p50 / p95 ms from the client's send to each hop, over this level's requests; and the engine's steps."""
    per_event: dict[str, list[float]] = {}
    for rid, t0, t_first in run.reqs:
        ev = dict(marks.get(rid, {}))
        ev["client_first"] = t_first
        for name, t in ev.items():
            per_event.setdefault(name, []).append(1000 * (t - t0))
    hops = {name: {"p50_ms": round(pct(v, 0.5), 2), "p95_ms": round(pct(v, 0.95), 2), "n": len(v)}
            for name, v in sorted(per_event.items(), key=lambda kv: PATH.index(kv[0]) if kv[0] in PATH else 99)}
    if not run.reqs:
        return {"hops": hops}
    lo, hi = min(t0 for _, t0, _ in run.reqs), max(t for _, _, t in run.reqs)
    inside = [s for s in steps if lo <= s[0] <= hi]
    # Per request, the engine steps from its arrival at the engine thread to its first token: how many,
    # how many of them also prefilled (another request's prompt or its own), and the wait for the step
    # that was running when it arrived. Counts, unlike milliseconds, hardly depend on the machine's load.
    n_steps, n_prefill, waits = [], [], []
    for rid, _, _ in run.reqs:
        ev = marks.get(rid, {})
        recv, first = ev.get("engine_recv"), ev.get("engine_first_token")
        if recv is None or first is None:
            continue
        mine = [s for s in steps if s[0] >= recv and s[1] <= first + 1e-4]
        n_steps.append(len(mine))
        n_prefill.append(sum(1 for s in mine if s[3] or s[4]))
        running = [s for s in steps if s[0] < recv < s[1]]
        waits.append(1000 * (running[0][1] - recv) if running else 0.0)
    prefill = [s for s in inside if s[3] or s[4]]  # steps that also prefilled (prompts waiting or in process)
    return {"hops": hops, "engine_steps": len(inside),
            "engine_step_ms_p50": round(1000 * pct([s[1] - s[0] for s in inside], 0.5), 2),
            "engine_prefill_steps": len(prefill),
            "engine_prefill_step_ms_p50": round(1000 * pct([s[1] - s[0] for s in prefill], 0.5), 2),
            "engine_prefill_batch_p50": pct([s[3] + s[4] for s in prefill], 0.5),
            "steps_to_first_token_p50": pct(n_steps, 0.5), "prefill_steps_to_first_token_p50": pct(n_prefill, 0.5),
            "wait_for_running_step_ms_p50": round(pct(waits, 0.5), 2)}


async def main_async(args: argparse.Namespace, model_dir: Path, root: Path) -> dict[str, Any]:
    levels = [int(x) for x in args.concurrency.split(",")]
    arms = set(args.arms.split(","))
    test_model = args.model_dir is None
    out: dict[str, Any] = {"rows": []}
    rows: dict[tuple[str, int], Run] = {}
    cold: dict[str, dict[str, Any]] = {}
    out["cold_start"] = cold
    timeout = httpx.Timeout(300.0)
    # Connections opened by the cold wave stay open through the levels (httpx drops idle ones after 5 s by
    # default, and a level then began with up to 16 new connections: ~200 ms of TTFT p50 at c=16 under load).
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4,
                          keepalive_expiry=600.0)
    collect = Collect()
    if args.timeline:
        # the diagnosis patch, in this process too (the in-process arm)
        exec(DIAG_SITECUSTOMIZE, {"__file__": str(root / "diag" / "sitecustomize.py")})  # noqa: S102
        logging.getLogger("darkbloom.timeline").addHandler(collect)
        logging.getLogger("darkbloom.timeline").propagate = False
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        if "engine" in arms:  # our engine, in this process
            async with open_engine([("bench", model_dir)], max_concurrent=max(levels), max_queue=256,
                                   self_benchmark=False) as engine:
                cold["engine"] = cold_row(await in_process(engine, "bench", max(levels), max(levels), 4, test_model))
                for c in levels:
                    rows[("engine", c)] = await measured(
                        {"client+engine": None},
                        in_process(engine, "bench", args.requests, c, args.max_tokens, test_model))
                if args.stagger_ms > 0:  # the same engine with arrivals spread out (diagnosis of admission)
                    for c in levels:
                        if c > 1:
                            rows[("engine~", c)] = await measured(
                                {"client+engine": None},
                                in_process(engine, "bench", args.requests, c, args.max_tokens, test_model,
                                           stagger_s=args.stagger_ms / 1000 / c))

        if "mlx" in arms:  # mlx_lm.server
            port = free_port()
            with open(root / "mlx_server.log", "wb") as log:
                # 0: BLAS threads as our nodes get them; "stock": as shipped, its own kernel cache
                (root / "mlx-kernels").mkdir(exist_ok=True)
                proc = start_mlx_server(model_dir, port, max(levels), 0, "stock", root / "mlx-kernels", log)
                try:
                    base = f"http://127.0.0.1:{port}"
                    await wait_healthy(client, base, proc)
                    url = f"{base}/v1/chat/completions"
                    cold["mlx"] = cold_row(await warm(client, url, "default_model", test_model, max(levels), retries=50))
                    for c in levels:
                        rows[("mlx", c)] = await measured(
                            {"client": None, "mlx_lm.server": proc.pid},
                            over_http(client, url, "default_model", args.requests, c, args.max_tokens, test_model,
                                      retries=50))
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)

        # the network: relay, public node, private node, shim, each its own process
        # The shim logs at INFO unless asked: the chaos tests' -v (DEBUG for every library, libp2p
        # included) cost the shim CPU per frame and fed the bench's log pump thread.
        net = ProcNetwork(root, model_dir, shim_log_flags=("-v",) if args.shim_verbose else ())
        net_arms = [a for a in (("direct", "bench-direct", "direct", "direct"),
                                ("relayed", "bench-relayed", "relayed", "private")) if a[0] in arms]
        if net_arms or "routing" in arms:
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
                for arm, model, route, node in net_arms:
                    cold[arm] = cold_row(await measured({}, warm(client, url, model, test_model, max(levels)),
                                                        net.shim.log_path))
                    procs = {"client": None, "shim": net.shim.pid, "relay": net.relay.pid, "node": net.nodes[node].pid}
                    for c in levels:
                        rows[(arm, c)] = await measured(procs, over_http(
                            client, url, model, args.requests, c, args.max_tokens, test_model, expect_route=route),
                            net.shim.log_path)
                if "routing" in arms:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(instant_node, net.relay_addr, root, "bench-instant")
                        cold["routing"] = cold_row(await measured({}, warm(client, url, "bench-instant", test_model,
                                                                           max(levels)), net.shim.log_path))
                        procs = {"client+instant node": None, "shim": net.shim.pid, "relay": net.relay.pid}
                        for c in levels:
                            rows[("routing", c)] = await measured(procs, over_http(
                                client, url, "bench-instant", max(args.requests, 8 * c), c, 1, test_model))
                        nursery.cancel_scope.cancel()
            finally:
                net.stop()
    timelines: dict[tuple[str, int], dict[str, Any]] = {}
    if args.timeline:
        lines = {name: (root / "logs" / f"{name}.1.log").read_text().splitlines()
                 for name in ("shim", "direct", "private") if (root / "logs" / f"{name}.1.log").exists()}
        shim_marks = parse_lines(lines.get("shim", []))[0]
        for arm, node in (("direct", "direct"), ("relayed", "private"), ("engine", None), ("engine~", None)):
            if node is None:
                marks, _, engine, steps = parse_lines(collect.lines)
                # in process the client's send is the submit; engine rids count generate() calls
                submits = [f"in-process-{k}" for k in range(next(IN_PROCESS_IDS))]
            else:
                marks, submits, engine, steps = parse_lines(lines.get(node, []))
            for rid, ev in engine_marks(submits, engine).items():
                marks.setdefault(rid, {}).update(ev)
            for rid, ev in shim_marks.items():
                marks.setdefault(rid, {}).update(ev)
            for c in levels:
                if (arm, c) in rows:
                    timelines[(arm, c)] = timeline_summary(rows[(arm, c)], marks, steps)
    for (arm, c), run in rows.items():
        row = {"arm": arm, "concurrency": c, **run.row()}
        if (arm, c) in timelines:
            row["timeline"] = timelines[(arm, c)]
        out["rows"].append(row)
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
        spread = by.get(("engine~", c))
        print(f"  c={c:<3} direct-engine TTFT {d['ttft_p50_ms'] - e['ttft_p50_ms']:+7.1f} ms | "
              f"direct/mlx tok/s {d['tok_per_s'] / m['tok_per_s']:.2f}x | "
              f"relayed-direct TTFT {rl['ttft_p50_ms'] - d['ttft_p50_ms']:+7.1f} ms"
              + (f" | (diagnosis: engine~ - engine TTFT {spread['ttft_p50_ms'] - e['ttft_p50_ms']:+7.1f} ms, "
                 f"direct - engine~ {d['ttft_p50_ms'] - spread['ttft_p50_ms']:+7.1f} ms)" if spread else ""))
    if results.get("cold_start"):
        print("\ncold start (the warm-up's first wave at the top concurrency, 4 tokens each; not in the rows above): "
              "new HTTP connections, and on the network arms one payment lane per concurrent slot opened at the ledger")
        for arm, r in results["cold_start"].items():
            lanes = f", lanes opened {r['lanes_opened']}" if r.get("lanes_opened") is not None else ""
            print(f"  {arm:8} c={r['concurrency']:<3} TTFT p50 {r['ttft_p50_ms']:7.1f} ms  p95 {r['ttft_p95_ms']:7.1f} ms"
                  f"{lanes}" + (f", errors {r['errors']}" if r["errors"] else ""))
    print("\nper request, by process: CPU ms (user + system) / ms runnable but waiting for a core "
          "('client' is this bench process)")
    for r in results["rows"]:
        wait = r["runqueue_wait_ms_per_request"]
        lanes = f"  | lanes opened {r['lanes_opened']}" if r.get("lanes_opened") is not None else ""
        print(f"  {r['arm']:8} c={r['concurrency']:<3} "
              + "  ".join(f"{k} {v:.1f}/{wait.get(k, float('nan')):.1f}" for k, v in r["cpu_ms_per_request"].items()) + lanes)
    timed = [r for r in results["rows"] if "timeline" in r]
    if timed:
        print("\ntimeline (diagnosis run): p50 ms from the client's send to each hop")
        for r in timed:
            tl = r["timeline"]
            hops = "  ".join(f"{k} {v['p50_ms']:.1f}" for k, v in tl["hops"].items())
            print(f"  {r['arm']:8} c={r['concurrency']:<3} {hops}")
            if "engine_steps" in tl:
                print(f"  {'':8} {'':5} engine: {tl['engine_steps']} steps, p50 {tl['engine_step_ms_p50']:.1f} ms; "
                      f"{tl['engine_prefill_steps']} with prefill work, p50 {tl['engine_prefill_step_ms_p50']:.1f} ms, "
                      f"prompts per prefill step p50 {tl['engine_prefill_batch_p50']}; per request to its first "
                      f"token p50: {tl['steps_to_first_token_p50']} steps, {tl['prefill_steps_to_first_token_p50']} "
                      f"with prefill, {tl['wait_for_running_step_ms_p50']:.1f} ms waiting for the running step")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=("tiny", "small"), default="small")
    ap.add_argument("--model-dir", type=Path, default=None, help="an mlx-lm model directory instead of a test model")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--skip-routing", action="store_true")
    ap.add_argument("--arms", default="engine,mlx,direct,relayed,routing", help="comma-separated subset of the arms")
    ap.add_argument("--timeline", action="store_true",
                    help="diagnosis: log and report each request's hops (adds logging work: not benchmark figures)")
    ap.add_argument("--shim-verbose", action="store_true",
                    help="run the shim with -v (DEBUG for every library), as tests/chaos/netproc.py does")
    ap.add_argument("--stagger-ms", type=float, default=100.0,
                    help="also run arm 'engine~': the in-process engine with the clients' first requests spread "
                         "evenly over this many ms (arrivals then stay spread, as through the network)")
    ap.add_argument("--keep-logs", type=Path, default=None, help="copy the role processes' logs here at the end")
    ap.add_argument("--out", default="bench/results/api.json")
    args = ap.parse_args()
    configure_logging("WARNING")  # libp2p's EOF warnings of the in-process instant node stay out
    load0 = os.getloadavg()
    if args.skip_routing:
        args.arms = ",".join(a for a in args.arms.split(",") if a != "routing")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.timeline:
            (root / "diag").mkdir()
            (root / "diag" / "sitecustomize.py").write_text(DIAG_SITECUSTOMIZE)
            os.environ["CHAOS_PYTHONPATH"] = str(root / "diag")  # read by chaos.procs.clean_env for every role
        model_dir = args.model_dir or make_test_model(root / "model", args.size)
        try:
            results = trio.run(main_async, args, model_dir, root)
        finally:
            if args.keep_logs and (root / "logs").exists():
                shutil.copytree(root / "logs", args.keep_logs, dirs_exist_ok=True)
                if (root / "diag").exists():
                    shutil.copytree(root / "diag", Path(args.keep_logs) / "diag", dirs_exist_ok=True)
    results["arms"] = ARMS
    results["fields"] = ROW_KEYS
    results["config"] = {"model": str(args.model_dir) if args.model_dir else f"{args.size} test model",
                         "requests": args.requests, "max_tokens": args.max_tokens, "stagger_ms": args.stagger_ms,
                         "timeline": args.timeline, "machine": platform.machine(),
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
