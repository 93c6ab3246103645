"""Benchmark the P2P layer on loopback: connect, discovery, streams, round trips, throughput, relay load.

    .venv/bin/python bench/p2p.py [--samples 30] [--streams 200] [--tokens 100] [--rate 50]
                                  [--only tokens-relayed|tokens-direct]
                                  [--out bench/results/p2p.json]

Real libp2p hosts on 127.0.0.1 (TCP + Noise + Yamux). The relay runs in its own process
(as in production, where it is another machine); nodes and clients share this process.
Token streams: a private node sends `--tokens` tokens at `--rate` tokens/s on each of
`--streams` concurrent streams, all through the one relay, each token stamped with its send
time; the client measures delivery latency and compares with the same load sent directly.
The token arms also report the CPU seconds the relay and node processes used (from /proc).
Profiling: BENCH_RELAY_SCRIPT=<script.py> starts the relay from that script instead (for
example a wrapper that runs tests.p2p.nat_peer under cProfile).
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


def token_server(rate: float, count: int):
    async def serve(stream) -> None:
        interval = 1.0 / rate
        start = trio.current_time()
        for i in range(count):
            await trio.sleep_until(start + i * interval)
            await stream.write(TOKEN.pack(i, time.perf_counter()))
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
    proc, ready = await spawn(cmd) if cmd else await spawn("-m", "tests.p2p.nat_peer", "relay", "--listen", "/ip4/127.0.0.1/tcp/0")
    return proc, ready["addrs"][0]


async def helper_node(args: argparse.Namespace) -> None:
    cfg = loopback_config(bootstrap=(args.relay,), reachability=args.reachability, hole_punch=False,
                          max_streams_per_peer=1024)
    async with open_network(cfg, Identity.generate(), role="node") as net:
        await net.wait_joined()
        await net.reachability_known.wait()
        if net.reachability == "relayed":
            await net.relay_ready.wait()
        net.serve(TOKENS, token_server(args.rate, args.tokens))
        net.serve(ECHO, echo)
        addrs = list(net.announce_addrs) if net.reachability == "relayed" else list(net.listen_addrs)
        print(json.dumps({"peer_id": net.peer_id, "addrs": addrs}), flush=True)
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
        result = await token_load([net], args.target, args.addrs, args.streams, args.tokens, raw=True)
        print(json.dumps(result), flush=True)


async def warm_up(net, peer: str, addrs) -> None:
    """Connect and settle: a new connection's first second carries identify and DHT chatter."""
    stream = await net.open_stream(peer, ECHO, addrs=addrs)
    for _ in range(20):
        await stream.write(b"w" * 100)
        await read_exact(stream, 100)
    await stream.close()
    await trio.sleep(1.0)  # benchmark warm-up, not synchronisation


async def token_load_processes(relay: str, reachability: str, args: argparse.Namespace, relay_pid: int = 0) -> dict:
    """Node and clients in their own processes (the relay too): what one relay carries."""
    procs = []
    try:
        node, info = await spawn(__file__, "--helper", "node", "--relay", relay, "--reachability", reachability,
                                 "--rate", str(args.rate), "--tokens", str(args.tokens))
        procs.append(node)
        per = [args.streams // args.clients + (1 if i < args.streams % args.clients else 0) for i in range(args.clients)]
        clients = []
        for n in per:
            proc = await spawn_client(__file__, "--helper", "client", "--relay", relay, "--target", info["peer_id"],
                                  "--streams", str(n), "--tokens", str(args.tokens), "--addrs", *info["addrs"])
            procs.append(proc)
            clients.append(proc)
        for p in clients:  # imports, connect and warm-up stay out of the measured window
            await next_line(p)
        for p in clients:
            await p.stdin.send_all(b"go\n")
        cpu0 = {"relay": cpu_s(relay_pid) if relay_pid else float("nan"), "node": cpu_s(node.pid)}
        t0 = time.perf_counter()
        results = []
        for p in clients:
            results.append(await read_all_json(p))
        elapsed = time.perf_counter() - t0
        cpu = {k: round(cpu_s(pid) - cpu0[k], 2) for k, pid in (("relay", relay_pid), ("node", node.pid)) if pid}
        cpu["clients_total_incl_start"] = round(sum(r.pop("cpu_s") for r in results), 2)  # incl. imports
        latencies = [x for r in results for x in r.pop("raw")]
        opens = [x for r in results for x in r.pop("opens")]
        return {"streams": args.streams, "tokens_per_stream": args.tokens, "rate_per_stream": args.rate,
                "processes": {"clients": len(clients)},
                "cpu_s": cpu, "wall_s": round(elapsed, 2), "delivered": len(latencies),
                "errors": sum(r["errors"] for r in results),
                "stream_open": ms(opens) if opens else {},
                "error_kinds": [r.get("error_kinds", {}) for r in results], "token_latency": ms(latencies) if latencies else {}}
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
        for p in procs:
            await p.wait()


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
    latencies: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}
    opens: list[float] = []

    async def one(client) -> None:
        nonlocal errors
        try:
            t = time.perf_counter()
            s = await client.open_stream(peer, TOKENS, addrs=addrs)
            opens.append(time.perf_counter() - t)
            for i in range(tokens):
                data = await read_exact(s, TOKEN.size)
                if len(data) < TOKEN.size:
                    errors += 1
                    kind = f"stream ended after {i} tokens"
                    kinds[kind] = kinds.get(kind, 0) + 1
                    return
                _, sent = TOKEN.unpack(data)
                latencies.append(time.perf_counter() - sent)
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
    out = {"streams": streams, "tokens_per_stream": tokens, "delivered": len(latencies), "errors": errors,
           "error_kinds": kinds, "opens": [round(x, 4) for x in opens],
           "token_latency": ms(latencies) if latencies else {}}
    if raw:
        out["raw"] = [round(x, 6) for x in latencies]
    return out


async def main(args: argparse.Namespace) -> dict:
    results: dict = {"machine": {"python": platform.python_version(), "platform": platform.platform(),
                                 "cpus": os.cpu_count()}}
    cfg = loopback_config(record_ttl_s=1200.0, announce_interval_s=600.0, dial_timeout_s=10.0)
    if args.only in ("tokens-direct", "tokens-relayed"):
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
            relay_pid = proc.pid if proc is not None else 0
            results["tokens_direct"] = await token_load_processes(relay_addr, "public", args, relay_pid)
            results["tokens_relayed"] = await token_load_processes(relay_addr, "private", args, relay_pid)
            d = results["tokens_direct"]["token_latency"]
            r = results["tokens_relayed"]["token_latency"]
            if d and r:
                results["relay_added_token_latency_p95_ms"] = round(r["p95_ms"] - d["p95_ms"], 3)
        finally:
            if proc is not None:
                proc.kill()
                await proc.wait()
    return results


async def tokens_only(args: argparse.Namespace, results: dict) -> dict:
    """Just one token-stream arm (relay in its own process): `--only tokens-relayed`."""
    proc, relay_addr = await relay_process(None)
    results["relay"] = "own process"
    try:
        route = args.only.removeprefix("tokens-")
        results[f"tokens_{route}"] = await token_load_processes(
            relay_addr, "public" if route == "direct" else "private", args, proc.pid)
    finally:
        proc.kill()
        await proc.wait()
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
    for route in ("direct", "relayed"):
        if f"tokens_{route}" not in r:
            continue
        t = r[f"tokens_{route}"]
        lat = t["token_latency"]
        rows.append((f"{t['streams']} token streams x {t['tokens_per_stream']} tok, {route}",
                     f"delivered {t['delivered']}, errors {t['errors']}, latency p50 {lat.get('p50_ms')} ms p95 {lat.get('p95_ms')} ms",
                     ">= 200 streams" if route == "relayed" else ""))
    if "relay_added_token_latency_p95_ms" in r:
        rows.append(("relay added per-token latency, p95", f"{r['relay_added_token_latency_p95_ms']} ms", "< 5 ms"))
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
    parser.add_argument("--only", choices=["all", "tokens-direct", "tokens-relayed"], default="all",
                        help="run one token-stream arm alone (relay in its own process)")
    parser.add_argument("--relay-in-process", action="store_true",
                        help="run the relay in this process (no cross-process scheduling on a busy machine)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/p2p.json"))
    parser.add_argument("--helper", choices=["node", "client"], help=argparse.SUPPRESS)
    parser.add_argument("--relay", help=argparse.SUPPRESS)
    parser.add_argument("--reachability", default="private", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--addrs", nargs="*", default=[], help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.helper:
        trio.run(helper_node if a.helper == "node" else helper_client, a)
        sys.exit(0)
    res = trio.run(main, a)
    res["load_average"] = list(os.getloadavg())
    print(table(res))
    print(f"load average {res['load_average']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out}")
