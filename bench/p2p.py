"""Benchmark the P2P layer on loopback: connect, discovery, streams, round trips, throughput, relay load.

    .venv/bin/python bench/p2p.py [--samples 30] [--streams 200] [--tokens 100] [--rate 50]
                                  [--only all|tokens|tokens-relayed|tokens-direct]
                                  [--repeats 2] [--pin both|none|relay-own-core]
                                  [--out bench/results/p2p.json]

Real libp2p hosts on 127.0.0.1 (TCP + Noise + Yamux). The relay runs in its own process
(as in production, where it is another machine). Connect, find_providers, stream open,
round trips and throughput run with the nodes and the client in this process.

Token streams (the relay-capacity target): a node process sends `--tokens` tokens at
`--rate` tokens/s on each of `--streams` concurrent streams to 4 client processes, either
directly ("direct" arm) or through the relay process ("relayed" arm: the node is private).
Each token carries the node's send time (time.perf_counter: CLOCK_MONOTONIC, one clock for
all processes on the host); a client's latency for it is its receive time minus that.
- Both arms run in the same invocation, interleaved (direct, relayed, then relayed, direct,
  ...) `--repeats` times; "relay-added latency" is relayed p95 minus direct p95 of each
  adjacent pair, and the median over pairs is reported with every pair's value.
- "steady" figures count only tokens sent after the last of the streams was open (the open
  storm of 200 concurrent stream opens excluded); the main figures count every token.
- The relay reports its own forwarding delay: from the oldest byte of a chunk arriving in
  its Yamux buffer to the forwarded write reaching the socket (darkbloom.p2p.relay
  DarkbloomHop.forward_delays, on only in this benchmark).
- Pin modes: "none" lets all 6 processes share both cores (what a 2-core machine gives);
  "relay-own-core" pins the relay to CPU 0 and node, clients and this process to CPU 1 in
  BOTH arms, as if the relay were its own host (other programs on the machine still run on
  both cores). `--pin both` (the default) measures both modes.
- Per-process CPU seconds in the measured window come from /proc (relay, node) and from
  each client (time.process_time); the load average at each arm's start is recorded: on a
  shared machine, compare arms of one run, never runs taken at different loads.
Profiling: BENCH_PROFILE_DIR=<dir> runs each helper process (relay, node, clients) under
cProfile and leaves one dump per process there; BENCH_RELAY_SCRIPT=<script.py> starts the
relay from that script instead (no forwarding-delay figures then).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import trio

from darkbloom.identity import Identity
from darkbloom.p2p.network import open_network
from darkbloom.p2p.testing import loopback_config
from darkbloom.p2p.yamux import DarkbloomYamux, when_on_socket
from darkbloom.wire.caps import CapabilityRecord, ModelCap

ROOT = Path(__file__).resolve().parents[1]
ECHO = "/darkbloom/bench-echo/1.0.0"
BLAST = "/darkbloom/bench-blast/1.0.0"
TOKENS = "/darkbloom/bench-tokens/1.0.0"
MB20 = 20 * 1024 * 1024
TOKEN = struct.Struct("<Id")  # index, send time (perf_counter: same host, same clock)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def ms(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(values, 0.5) * 1000, 3), "p95_ms": round(pct(values, 0.95) * 1000, 3), "n": len(values)}


async def echo(stream) -> None:
    while data := await stream.read():
        await stream.write(data)


async def blast(stream) -> None:
    chunk = b"x" * 65536
    for _ in range(MB20 // len(chunk)):
        await stream.write(chunk)


def token_server(rate: float, count: int, stats: dict | None = None):
    """Serve `count` tokens at `rate`/s, each stamped with its send time.

    With `stats`, records per token how long the write took (stamp to the frame handed to
    the TCP socket, through every Yamux layer: the node's own part of the latency), how long
    the token's task spent in `write` (it returns once the frame is queued for the
    connection's flusher), and how late the token left against its
    schedule (a node that cannot keep up sends later, not slower-looking, tokens); once
    `stats["streams"]` streams are done, `stats["done"]` is set.
    """
    def on_socket(delay: float) -> None:
        stats["write"].append(delay)
        if len(stats["write"]) >= stats["streams"] * count:
            stats["written"].set()

    async def serve(stream) -> None:
        interval = 1.0 / rate
        start = trio.current_time()
        conn = getattr(getattr(getattr(stream, "raw", None), "muxed_stream", None), "conn", None)
        for i in range(count):
            await trio.sleep_until(start + i * interval)
            sent = time.perf_counter()
            await stream.write(TOKEN.pack(i, sent))
            if stats is not None:
                returned = time.perf_counter()
                stats["returned"].append(returned - sent)
                if isinstance(conn, DarkbloomYamux):  # the write returned once queued: wait for the socket
                    when_on_socket(conn, lambda now, sent=sent: on_socket(now - sent))
                else:
                    on_socket(returned - sent)
                stats["late"].append(trio.current_time() - (start + i * interval))
        if stats is not None:
            stats["finished"] += 1
            if stats["finished"] >= stats["streams"]:
                stats["done"].set()
    return serve


async def read_exact(stream, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = await stream.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def serve_all(net, rate: float, tokens: int) -> None:
    net.serve(ECHO, echo)
    net.serve(BLAST, blast)
    net.serve(TOKENS, token_server(rate, tokens))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def spawn(*args: str) -> tuple[trio.Process, dict]:
    """A helper process; its first JSON line."""
    proc = await trio.lowlevel.open_process([sys.executable, *args], stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, cwd=ROOT)
    return proc, await next_line(proc)


async def spawn_client(*args: str) -> trio.Process:
    return await trio.lowlevel.open_process([sys.executable, *args], stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, cwd=ROOT)


async def next_line(proc: trio.Process, buf: list[bytes] | None = None) -> dict:
    data = b""
    while b"\n" not in data:
        chunk = await proc.stdout.receive_some(1 << 20)
        if not chunk:
            raise RuntimeError("helper process exited early")
        data += chunk
    return json.loads(data.split(b"\n", 1)[0])


async def read_all_json(proc: trio.Process) -> dict:
    """The helper's last JSON line, plus the CPU seconds it used in all (`cpu_s`)."""
    data = b""
    while chunk := await proc.stdout.receive_some(1 << 20):
        data += chunk
    cpu = cpu_s(proc.pid)  # still readable: the process is not reaped before wait()
    await proc.wait()
    out = json.loads(data.strip().splitlines()[-1])
    out["cpu_s"] = cpu
    return out


async def relay_process(_: object) -> tuple[trio.Process, str]:
    cmd = os.environ.get("BENCH_RELAY_SCRIPT")
    if cmd:
        proc, ready = await spawn(cmd)
    else:
        proc = await spawn_client(__file__, "--helper", "relay")
        ready = await next_line(proc)
    return proc, ready["addrs"][0]


async def relay_stats(proc: trio.Process, command: str) -> dict:
    """Ask our relay helper for its forwarding-delay figures ("stats") or to clear them ("reset")."""
    if os.environ.get("BENCH_RELAY_SCRIPT") or proc.stdin is None:
        return {}
    await proc.stdin.send_all(command.encode() + b"\n")
    return await next_line(proc)


async def stop_relay(proc: trio.Process) -> None:
    """End of input stops our relay helper (so a profiled relay writes its dump); else kill it."""
    if proc.stdin is not None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await proc.stdin.aclose()
        with trio.move_on_after(5):
            await proc.wait()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def helper_relay(args: argparse.Namespace) -> None:
    """The relay in its own process, recording its own forwarding delay per chunk."""
    from darkbloom.p2p.relay import DarkbloomHop

    import gc

    DarkbloomHop.forward_delays = delays = []
    pauses: list[float] = []  # the relay's garbage-collector pauses (s): they stall forwarding
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - started[0])

    gc.callbacks.append(on_gc)
    cfg = loopback_config(record_ttl_s=1200.0, announce_interval_s=600.0)
    async with open_network(cfg, Identity.generate(), role="relay") as net:
        print(json.dumps({"peer_id": net.peer_id, "addrs": list(net.listen_addrs)}), flush=True)
        stdin = trio.wrap_file(sys.stdin)
        while line := await stdin.readline():
            if line.strip() == "reset":
                delays.clear()
                pauses.clear()
                print(json.dumps({"ok": True}), flush=True)
            elif line.strip() == "stats":
                out = {"chunks": len(delays), "gc_pauses": len(pauses),
                       "gc_pause_max_ms": round(max(pauses, default=0.0) * 1000, 3),
                       "gc_pause_total_ms": round(sum(pauses) * 1000, 3)}
                if delays:
                    total = [t for t, _ in delays]
                    write = [w for _, w in delays]
                    out.update(ms(total), p99_ms=round(pct(total, 0.99) * 1000, 3),
                               write_p50_ms=round(pct(write, 0.5) * 1000, 3),
                               write_p95_ms=round(pct(write, 0.95) * 1000, 3))
                print(json.dumps(out), flush=True)


async def helper_node(args: argparse.Namespace) -> None:
    cfg = loopback_config(bootstrap=(args.relay,), reachability=args.reachability, hole_punch=False,
                          max_streams_per_peer=1024)
    async with open_network(cfg, Identity.generate(), role="node") as net:
        await net.wait_joined()
        await net.reachability_known.wait()
        if net.reachability == "relayed":
            await net.relay_ready.wait()
        stats = {"write": [], "returned": [], "late": [], "finished": 0, "streams": args.streams, "done": trio.Event(),
                 "written": trio.Event()}
        net.serve(TOKENS, token_server(args.rate, args.tokens, stats))
        net.serve(ECHO, echo)
        addrs = list(net.announce_addrs) if net.reachability == "relayed" else list(net.listen_addrs)
        print(json.dumps({"peer_id": net.peer_id, "addrs": addrs}), flush=True)
        await stats["done"].wait()
        with trio.move_on_after(5):  # the last tokens reach the socket (never, if a connection failed)
            await stats["written"].wait()
        print(json.dumps({"token_write": ms(stats["write"]), "token_write_returned": ms(stats["returned"]),
                          "behind_schedule": ms(stats["late"])}), flush=True)
        await trio.sleep_forever()


async def helper_client(args: argparse.Namespace) -> None:
    cfg = loopback_config(bootstrap=(args.relay,), max_streams_per_peer=1024, hole_punch=False)
    async with open_network(cfg, Identity.generate(), role="shim") as net:
        await net.wait_joined()
        await warm_up(net, args.target, args.addrs)
        print(json.dumps({"ready": True}), flush=True)
        go = await trio.wrap_file(sys.stdin).readline()  # every client starts at once
        if not go:
            return
        cpu0 = time.process_time()
        result = await token_load([net], args.target, args.addrs, args.streams, args.tokens, raw=True)
        result["cpu_window_s"] = round(time.process_time() - cpu0, 3)
        print(json.dumps(result), flush=True)


async def warm_up(net, peer: str, addrs) -> None:
    """Connect and settle: a new connection's first second carries identify and DHT chatter."""
    stream = await net.open_stream(peer, ECHO, addrs=addrs)
    for _ in range(20):
        await stream.write(b"w" * 100)
        await read_exact(stream, 100)
    await stream.close()
    await trio.sleep(1.0)  # benchmark warm-up, not synchronisation


def pin(pid: int, cpus: set[int] | None) -> None:
    """Restrict a process to `cpus` (None: every CPU)."""
    if pid:
        os.sched_setaffinity(pid, cpus if cpus is not None else set(range(os.cpu_count() or 1)))


def pinning(mode: str) -> tuple[set[int] | None, set[int] | None]:
    """(relay CPUs, node-and-clients CPUs) for a pin mode."""
    if mode == "relay-own-core":
        return {0}, {1}  # as if the relay were its own host: one core to itself
    return None, None


async def token_load_processes(relay: str, reachability: str, args: argparse.Namespace, relay_proc=None,
                               pin_mode: str = "none") -> dict:
    """Node and clients in their own processes (the relay too): what one relay carries.

    Latency per token = client receive time - node send time (stamped in the token; one host,
    one monotonic clock). "all" counts every token; "steady" only tokens sent after the last of
    the 200 streams was open (the open storm excluded).
    """
    procs = []
    relay_pid = relay_proc.pid if relay_proc is not None else 0
    relay_cpus, other_cpus = pinning(pin_mode)
    pin(relay_pid, relay_cpus)
    pin(os.getpid(), other_cpus)
    try:
        load0 = os.getloadavg()[0]
        node, info = await spawn(__file__, "--helper", "node", "--relay", relay, "--reachability", reachability,
                                 "--rate", str(args.rate), "--tokens", str(args.tokens), "--streams", str(args.streams))
        procs.append(node)
        pin(node.pid, other_cpus)
        per = [args.streams // args.clients + (1 if i < args.streams % args.clients else 0) for i in range(args.clients)]
        clients = []
        for n in per:
            proc = await spawn_client(__file__, "--helper", "client", "--relay", relay, "--target", info["peer_id"],
                                  "--streams", str(n), "--tokens", str(args.tokens), "--addrs", *info["addrs"])
            pin(proc.pid, other_cpus)
            procs.append(proc)
            clients.append(proc)
        for p in clients:  # imports, connect and warm-up stay out of the measured window
            await next_line(p)
        if relay_proc is not None:
            await relay_stats(relay_proc, "reset")
        for p in clients:
            await p.stdin.send_all(b"go\n")
        cpu0 = {"relay": cpu_s(relay_pid) if relay_pid else float("nan"), "node": cpu_s(node.pid)}
        t0 = time.perf_counter()
        results = []
        for p in clients:
            results.append(await read_all_json(p))
        elapsed = time.perf_counter() - t0
        forward = await relay_stats(relay_proc, "stats") if relay_proc is not None else {}
        node_side: dict = {}
        with trio.move_on_after(5):  # the node reports once every stream was served
            node_side = await next_line(node)
        cpu = {k: round(cpu_s(pid) - cpu0[k], 2) for k, pid in (("relay", relay_pid), ("node", node.pid)) if pid}
        cpu["clients_in_window"] = round(sum(r.pop("cpu_window_s") for r in results), 2)
        cpu["clients_total_incl_start"] = round(sum(r.pop("cpu_s") for r in results), 2)  # incl. imports
        pairs = [x for r in results for x in r.pop("raw")]  # (sent, latency)
        opens = [x for r in results for x in r.pop("opens")]
        all_open = max((r.pop("all_open_at") for r in results), default=0.0)
        steady = [lat for sent, lat in pairs if sent > all_open]
        latencies = [lat for _, lat in pairs]
        delivered = len(latencies)
        return {"route": "relayed" if reachability == "private" else "direct", "pin": pin_mode,
                "streams": args.streams, "tokens_per_stream": args.tokens, "rate_per_stream": args.rate,
                "processes": {"clients": len(clients)},
                "load_average_1m": {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)},
                "cpu_s": cpu, "wall_s": round(elapsed, 2), "delivered": delivered,
                "relay_cpu_us_per_token": round(cpu["relay"] / delivered * 1e6, 1) if relay_pid and delivered else None,
                "errors": sum(r["errors"] for r in results),
                "stream_open": ms(opens) if opens else {},
                "error_kinds": [r.get("error_kinds", {}) for r in results],
                "token_latency": ms(latencies) if latencies else {},
                "token_latency_steady": ms(steady) if steady else {},
                "node_side": node_side,  # token_write: stamp -> on the socket; behind_schedule: pacing lag
                "relay_forward_delay": forward if reachability == "private" else {}}
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
        for p in procs:
            await p.wait()
        pin(os.getpid(), None)
        pin(relay_pid, None)


async def token_arms(relay_addr: str, relay_proc, args: argparse.Namespace) -> dict:
    """Direct and relayed arms in the same run, interleaved (ABBA...), for each pin mode.

    The relay-added figure pairs each relayed arm with the direct arm next to it, so both
    saw about the same machine load; the summary is the median of the pairs.
    """
    out: dict = {"runs": [], "summary": {}}
    modes = ["none", "relay-own-core"] if args.pin == "both" else [args.pin]
    routes = ["direct", "relayed"] if args.only == "all" else [args.only.removeprefix("tokens-")]
    for mode in modes:
        pairs = []
        for rep in range(args.repeats):
            order = routes if rep % 2 == 0 else routes[::-1]
            got = {}
            for route in order:
                run = await token_load_processes(relay_addr, "public" if route == "direct" else "private", args,
                                                 relay_proc, mode)
                run["repeat"] = rep
                out["runs"].append(run)
                got[route] = run
                print(f"  {summarise(run)}", flush=True)
            if len(got) == 2:
                pairs.append(got)
        if pairs:
            out["summary"][mode] = added(pairs)
    return out


def added(pairs: list[dict]) -> dict:
    """Relay-added per-token latency from paired (same repeat) direct and relayed arms."""
    def med(xs: list[float]) -> float:
        return round(statistics.median(xs), 3)
    d95 = [p["direct"]["token_latency"]["p95_ms"] for p in pairs]
    r95 = [p["relayed"]["token_latency"]["p95_ms"] for p in pairs]
    d50 = [p["direct"]["token_latency"]["p50_ms"] for p in pairs]
    r50 = [p["relayed"]["token_latency"]["p50_ms"] for p in pairs]
    s95 = [p["relayed"]["token_latency_steady"].get("p95_ms", 0) - p["direct"]["token_latency_steady"].get("p95_ms", 0)
           for p in pairs]
    fwd = [p["relayed"]["relay_forward_delay"] for p in pairs if p["relayed"]["relay_forward_delay"].get("chunks")]
    return {"repeats": len(pairs),
            "direct_p50_ms": med(d50), "direct_p95_ms": med(d95), "relayed_p50_ms": med(r50), "relayed_p95_ms": med(r95),
            "added_p50_ms": med([r - d for r, d in zip(r50, d50)]),
            "added_p95_ms": med([r - d for r, d in zip(r95, d95)]),
            "added_p95_ms_each": [round(r - d, 3) for r, d in zip(r95, d95)],
            "added_p95_ms_steady": med(s95),
            "relay_forward_delay_p50_ms": med([f["p50_ms"] for f in fwd]) if fwd else None,
            "relay_forward_delay_p95_ms": med([f["p95_ms"] for f in fwd]) if fwd else None,
            "relay_forward_write_p95_ms": med([f["write_p95_ms"] for f in fwd]) if fwd else None,
            "relay_cpu_us_per_token": med([p["relayed"]["relay_cpu_us_per_token"] for p in pairs
                                           if p["relayed"]["relay_cpu_us_per_token"] is not None] or [float("nan")]),
            "node_write_p95_ms": {k: med([p[k]["node_side"]["token_write"]["p95_ms"] for p in pairs if p[k].get("node_side")] or [float("nan")])
                                  for k in ("direct", "relayed")},
            "node_behind_schedule_p50_ms": {k: med([p[k]["node_side"]["behind_schedule"]["p50_ms"] for p in pairs if p[k].get("node_side")] or [float("nan")])
                                            for k in ("direct", "relayed")},
            "node_behind_schedule_p95_ms": {k: med([p[k]["node_side"]["behind_schedule"]["p95_ms"] for p in pairs if p[k].get("node_side")] or [float("nan")])
                                            for k in ("direct", "relayed")},
            "node_write_returned_p95_ms": {k: med([p[k]["node_side"].get("token_write_returned", {}).get("p95_ms", float("nan"))
                                                   for p in pairs if p[k].get("node_side")] or [float("nan")])
                                           for k in ("direct", "relayed")},
            "errors": sum(p[k]["errors"] for p in pairs for k in ("direct", "relayed")),
            "load_average_1m": [p[k]["load_average_1m"]["start"] for p in pairs for k in ("direct", "relayed")]}


def summarise(run: dict) -> str:
    lat, st, fw = run["token_latency"], run["token_latency_steady"], run["relay_forward_delay"]
    text = (f"{run['route']:7} pin={run['pin']:14} delivered {run['delivered']} errors {run['errors']} "
            f"p50 {lat.get('p50_ms')} p95 {lat.get('p95_ms')} ms (steady p95 {st.get('p95_ms')}) "
            f"cpu {run['cpu_s']} load {run['load_average_1m']['start']}")
    if run.get("node_side"):
        node = run["node_side"]
        text += (f" node write (to socket) p50 {node['token_write']['p50_ms']} p95 {node['token_write']['p95_ms']} ms,"
                 f" write returned p95 {node.get('token_write_returned', {}).get('p95_ms')} ms,"
                 f" behind schedule p50 {node['behind_schedule']['p50_ms']} p95 {node['behind_schedule']['p95_ms']} ms")
    if fw.get("chunks"):
        text += f" relay fwd p50 {fw['p50_ms']} p95 {fw['p95_ms']} ms (writing: p50 {fw['write_p50_ms']} p95 {fw['write_p95_ms']})"
    return text


async def measure_streams(client, peer: str, addrs, samples: int) -> dict:
    await warm_up(client, peer, addrs)
    opens, rtts = [], []
    payload = b"p" * 100
    stream = await client.open_stream(peer, ECHO, addrs=addrs)
    route = stream.route
    for _ in range(samples):
        t = time.perf_counter()
        await stream.write(payload)
        await read_exact(stream, len(payload))
        rtts.append(time.perf_counter() - t)
    await stream.close()
    for _ in range(samples):
        t = time.perf_counter()
        s = await client.open_stream(peer, ECHO, addrs=addrs)
        await s.write(b"o")
        await read_exact(s, 1)  # the stream is usable: negotiated end to end
        opens.append(time.perf_counter() - t)
        await s.close()
    t = time.perf_counter()
    s = await client.open_stream(peer, BLAST, addrs=addrs)
    got = 0
    while chunk := await s.read():
        got += len(chunk)
    elapsed = time.perf_counter() - t
    return {"route": route, "stream_open": ms(opens), "round_trip_100B": ms(rtts),
            "throughput_20MB_MBps": round(got / elapsed / 1e6, 1), "bytes": got}


async def token_load(clients, peer: str, addrs, streams: int, tokens: int, raw: bool = False) -> dict:
    latencies: list[tuple[float, float]] = []  # (node's send time, latency)
    errors = 0
    kinds: dict[str, int] = {}
    opens: list[float] = []

    all_open_at = 0.0

    async def one(client) -> None:
        nonlocal errors, all_open_at
        try:
            t = time.perf_counter()
            s = await client.open_stream(peer, TOKENS, addrs=addrs)
            opens.append(time.perf_counter() - t)
            all_open_at = max(all_open_at, time.perf_counter())
            got, buf = 0, b""
            while got < tokens:  # read what arrived and split it, as the shim's FrameDecoder does
                data = await s.read()
                if not data:
                    errors += 1
                    kind = f"stream ended after {got} tokens"
                    kinds[kind] = kinds.get(kind, 0) + 1
                    return
                now = time.perf_counter()
                buf += data
                whole = len(buf) - len(buf) % TOKEN.size
                for off in range(0, whole, TOKEN.size):
                    _, sent = TOKEN.unpack_from(buf, off)
                    latencies.append((sent, now - sent))
                got += whole // TOKEN.size
                buf = buf[whole:]
        except Exception as exc:  # counted, reported: the benchmark must finish
            errors += 1
            cause = exc.__cause__
            while cause is not None and cause.__cause__ is not None:
                cause = cause.__cause__  # the innermost reason (negotiation timeout, reset...)
            kind = f"{type(exc).__name__}: {str(exc)[:60]} <- {type(cause).__name__}: {str(cause)[:100]}"
            kinds[kind] = kinds.get(kind, 0) + 1

    async with trio.open_nursery() as n:
        for i in range(streams):
            n.start_soon(one, clients[i % len(clients)])
    lat = [x for _, x in latencies]
    out = {"streams": streams, "tokens_per_stream": tokens, "delivered": len(latencies), "errors": errors,
           "error_kinds": kinds, "opens": [round(x, 4) for x in opens], "all_open_at": all_open_at,
           "token_latency": ms(lat) if lat else {}}
    if raw:
        out["raw"] = [(round(s, 6), round(x, 6)) for s, x in latencies]
    return out


async def main(args: argparse.Namespace) -> dict:
    results: dict = {"machine": {"python": platform.python_version(), "platform": platform.platform(),
                                 "cpus": os.cpu_count()},
                     "definitions": {
                         "token_latency": "client receive time - node send time stamped in the token (one host clock)",
                         "token_latency_steady": "only tokens sent after the last stream was open",
                         "added_p95_ms": "median over adjacent (same repeat) pairs of relayed p95 - direct p95",
                         "relay_forward_delay": "inside the relay: oldest byte of a chunk in its Yamux buffer -> "
                                                "forwarded write on the socket (excludes waiting for a CPU before reading)",
                         "pin none": "relay, node, 4 clients and the bench share all cores",
                         "pin relay-own-core": "relay on CPU 0; node, clients and the bench on CPU 1; in both arms",
                         "cpu_s": "CPU seconds in the measured window (clients_total_incl_start includes imports)",
                         "node_side": "token_write: node's send stamp -> frame handed to the TCP socket (every Yamux "
                                      "layer); token_write_returned: stamp -> stream.write returned (frame queued); behind_schedule: "
                                      "how late each token left against start + i/rate (the node saturated if large)",
                     }}
    cfg = loopback_config(record_ttl_s=1200.0, announce_interval_s=600.0, dial_timeout_s=10.0)
    if args.only != "all":
        return await tokens_only(args, results)
    async with contextlib.AsyncExitStack() as stack:
        proc = None
        if args.relay_in_process:
            relay = await stack.enter_async_context(
                open_network(loopback_config(record_ttl_s=1200.0, announce_interval_s=600.0), Identity.generate(), role="relay"))
            relay_addr = relay.listen_addrs[0]
        else:
            proc, relay_addr = await relay_process(None)
        results["relay"] = "this process" if args.relay_in_process else "own process"
        try:
            boot = loopback_config(bootstrap=(relay_addr,), record_ttl_s=1200.0, announce_interval_s=600.0)
            private_cfg = loopback_config(bootstrap=(relay_addr,), reachability="private", hole_punch=False)
            async with open_network(boot, Identity.generate(), role="node") as public, \
                    open_network(private_cfg, Identity.generate(), role="node") as private, \
                    open_network(loopback_config(bootstrap=(relay_addr,), hole_punch=False), Identity.generate(), role="shim") as shim:
                await public.wait_joined()
                await private.relay_ready.wait()
                await shim.wait_joined()
                for net in (public, private):
                    serve_all(net, args.rate, args.tokens)
                    await net.put_record(CapabilityRecord(peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0,
                                                          models=(ModelCap(id="bench", digest="0", context_length=1),)))
                    await net.provide("bench")
                connects = []  # fresh networks dialling the public node
                for _ in range(min(args.samples, 15)):
                    async with open_network(cfg, Identity.generate(), role="shim") as fresh:
                        t = time.perf_counter()
                        await fresh.connect(public.peer_id, public.listen_addrs)
                        connects.append(time.perf_counter() - t)
                results["connect"] = ms(connects)
                finds = []
                found = []
                for _ in range(args.samples):
                    t = time.perf_counter()
                    found = await shim.find_providers("bench", fresh=True)
                    finds.append(time.perf_counter() - t)
                results["find_providers"] = {**ms(finds), "providers": len(found)}
                results["direct"] = await measure_streams(shim, public.peer_id, public.listen_addrs, args.samples)
                results["relayed"] = await measure_streams(shim, private.peer_id, private.announce_addrs, args.samples)
            if proc is None:  # the token arms need the relay in its own process
                proc, relay_addr = await relay_process(None)
            results["tokens"] = await token_arms(relay_addr, proc, args)
        finally:
            if proc is not None:
                await stop_relay(proc)
    return results


async def tokens_only(args: argparse.Namespace, results: dict) -> dict:
    """Only the token arms (relay in its own process): `--only tokens|tokens-relayed|tokens-direct`."""
    proc, relay_addr = await relay_process(None)
    results["relay"] = "own process"
    try:
        if args.only == "tokens":
            args.only = "all"
        results["tokens"] = await token_arms(relay_addr, proc, args)
    finally:
        await stop_relay(proc)
    return results


def table(r: dict) -> str:
    rows = [] if "connect" not in r else [
        ("connect (direct)", f"p50 {r['connect']['p50_ms']} ms, p95 {r['connect']['p95_ms']} ms", "<= 15 ms"),
        ("find_providers (fresh query)", f"p50 {r['find_providers']['p50_ms']} ms, p95 {r['find_providers']['p95_ms']} ms", "p50 <= 60 ms"),
    ]
    for route in ("direct", "relayed"):
        if route not in r:
            continue
        x = r[route]
        rows += [
            (f"stream open, {route}", f"p50 {x['stream_open']['p50_ms']} ms, p95 {x['stream_open']['p95_ms']} ms",
             "<= 5 ms" if route == "direct" else ""),
            (f"100-byte round trip, {route}", f"p50 {x['round_trip_100B']['p50_ms']} ms, p95 {x['round_trip_100B']['p95_ms']} ms",
             "p50 <= 8 ms" if route == "relayed" else ""),
            (f"20 MB one stream, {route}", f"{x['throughput_20MB_MBps']} MB/s", ""),
        ]
    for mode, x in r.get("tokens", {}).get("summary", {}).items():
        where = ("relay pinned to CPU 0, node + clients to CPU 1, both arms" if mode == "relay-own-core"
                 else "no pinning: 6 processes share 2 cores")
        rows += [
            (f"token streams [{mode}]", where, ""),
            ("  per-token latency, direct", f"p50 {x['direct_p50_ms']} ms, p95 {x['direct_p95_ms']} ms", ""),
            ("  per-token latency, relayed", f"p50 {x['relayed_p50_ms']} ms, p95 {x['relayed_p95_ms']} ms, errors {x['errors']}",
             ">= 200 streams"),
            ("  relay-added latency, p95", f"{x['added_p95_ms']} ms (median of {x['repeats']} paired runs: "
                                            f"{x['added_p95_ms_each']}); steady state {x['added_p95_ms_steady']} ms", "< 5 ms"),
            ("  relay's own forwarding delay", f"p50 {x['relay_forward_delay_p50_ms']} ms, p95 {x['relay_forward_delay_p95_ms']} ms "
                                               f"(of which writing, p95: {x['relay_forward_write_p95_ms']} ms)", ""),
            ("  relay CPU per forwarded token", f"{x['relay_cpu_us_per_token']} us", ""),
            ("  node: token write p95 (stamp -> socket)", f"direct {x['node_write_p95_ms']['direct']} ms, relayed {x['node_write_p95_ms']['relayed']} ms", ""),
            ("  node: stream.write returned p95 (queued)", f"direct {x['node_write_returned_p95_ms']['direct']} ms, relayed {x['node_write_returned_p95_ms']['relayed']} ms", ""),
            ("  node: behind its 50/s schedule, p50", f"direct {x['node_behind_schedule_p50_ms']['direct']} ms, relayed {x['node_behind_schedule_p50_ms']['relayed']} ms", ""),
            ("  node: behind its 50/s schedule, p95", f"direct {x['node_behind_schedule_p95_ms']['direct']} ms, relayed {x['node_behind_schedule_p95_ms']['relayed']} ms", ""),
            ("  load average (1 min) at each arm", ", ".join(f"{v:.1f}" for v in x["load_average_1m"]), ""),
        ]
    for run in r.get("tokens", {}).get("runs", []) if not r.get("tokens", {}).get("summary") else []:
        rows.append((f"token streams, {run['route']} [{run['pin']}]", summarise(run), ""))
    if not rows:
        return "(nothing measured)"
    width = max(len(a) for a, _, _ in rows)
    wide = max(len(b) for _, b, _ in rows)
    lines = [f"relay: {r.get('relay')}", f"{'measure'.ljust(width)}  {'result'.ljust(wide)}  target", "-" * (width + wide + 12)]
    lines += [f"{a.ljust(width)}  {b.ljust(wide)}  {c}" for a, b, c in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--only", choices=["all", "tokens", "tokens-direct", "tokens-relayed"], default="all",
                        help="only the token-stream arms (both, interleaved), or one arm alone")
    parser.add_argument("--repeats", type=int, default=2,
                        help="token arm pairs per pin mode (interleaved direct/relayed, relayed/direct, ...)")
    parser.add_argument("--pin", choices=["both", "none", "relay-own-core"], default="both",
                        help="relay-own-core: relay on CPU 0, node and clients on CPU 1 (in both arms)")
    parser.add_argument("--relay-in-process", action="store_true",
                        help="run the relay in this process (no cross-process scheduling on a busy machine)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/p2p.json"))
    parser.add_argument("--helper", choices=["node", "client", "relay"], help=argparse.SUPPRESS)
    parser.add_argument("--relay", help=argparse.SUPPRESS)
    parser.add_argument("--reachability", default="private", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--addrs", nargs="*", default=[], help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.helper:
        helper = {"node": helper_node, "client": helper_client, "relay": helper_relay}[a.helper]
        if os.environ.get("BENCH_PROFILE_DIR"):  # profiling: one cProfile dump per helper process
            import cProfile
            prof = cProfile.Profile()
            try:
                prof.runcall(trio.run, helper, a)
            finally:
                prof.dump_stats(f"{os.environ['BENCH_PROFILE_DIR']}/{a.helper}-{os.getpid()}.prof")
        else:
            trio.run(helper, a)
        sys.exit(0)
    res = trio.run(main, a)
    res["load_average"] = list(os.getloadavg())
    print(table(res))
    print(f"load average {res['load_average']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out}")
