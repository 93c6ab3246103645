"""Real-host mode: the same workload on real libp2p hosts on 127.0.0.1 and in the simulator.

`compare(nodes)` starts a swarm of real hosts (darkbloom.p2p.testing.swarm: one relay, `nodes`
providers, two shims), has every node provide a model and store its signed record, then runs
discovery + one exchange per request from the shims; it does the same in the simulator with
the same shape (all public: loopback has no NAT) and returns both sets of figures side by side.
Compared: FIND_NODE lookup success and hops (darkbloom.p2p.dht traces its own lookups the way
darkbloom.sim.traversal counts them), discovery success, share of providers the DHT listed
(records are checked only until enough are valid, see darkbloom.p2p.core), record fetch
success, request success. Not compared: latencies (loopback has none).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio.testing

from darkbloom.p2p.api import PeerNetwork
from darkbloom.wire.caps import CapabilityRecord, ModelCap
from darkbloom.wire.infer import INFER_PROTOCOL

__all__ = ["compare", "run_real", "run_sim"]

log = logging.getLogger(__name__)

MODEL = "smollm2-135m-instruct"
REQUEST_BYTES = 2_000
RESPONSE_BYTES = 20_000
ANNOUNCE_CONCURRENCY = 4
REAL_ROUTING_TABLE = "py-libp2p-0.8.1"  # the simulator's model of what the real hosts run


def _template(net: PeerNetwork) -> CapabilityRecord:
    return CapabilityRecord(
        peer_id=net.peer_id, seq=0, issued_at_ms=0, expires_at_ms=0,
        models=(ModelCap(id=MODEL, digest="00" * 8, context_length=8192),),
    )


async def _fake_inference_responder(stream: Any) -> None:
    """Stands in for the engine (this comparison is about discovery and routing)."""
    while await stream.read(65536):
        pass
    await stream.write(b"\0" * RESPONSE_BYTES)


Trace = Callable[[Any, str], Awaitable[tuple[bool, int]]]

STEPS = ("lookup", "discovery", "record", "exchange")
REQUEST_BUDGET_S = 60.0  # one request: lookup + discovery + record fetch + exchange
HOPS_TOLERANCE = 0.1  # hop means agree within 10 % or 0.1 hop, whichever is larger (see compare)


async def _workload(shims: list[PeerNetwork], providers: list[str], requests: int, rng: random.Random,
                    trace: Trace) -> dict[str, Any]:
    found_any = found_share = records_ok = served = timeouts = 0
    discovery_s: list[float] = []
    lookups_ok = 0
    hops: list[int] = []
    step_s: dict[str, list[float]] = {name: [] for name in STEPS}
    timeout_steps: list[str] = []
    fetched: list[int] = []  # record fetches each discovery waited for
    candidates: list[int] = []  # valid providers each discovery returned
    for i in range(requests):
        shim = shims[i % len(shims)]
        step, began = "start", trio.current_time()
        times: dict[str, float] = {}

        def enter(name: str) -> None:
            nonlocal step, began
            now = trio.current_time()
            if step in step_s:
                times[step] = now - began
                step_s[step].append(now - began)
            step, began = name, now

        with trio.move_on_after(REQUEST_BUDGET_S) as scope:
            # a FIND_NODE lookup of a random provider (a DHT server): found it, in how many hops
            enter("lookup")
            target = rng.choice(providers)
            ok, depth = await trace(shim, target)
            lookups_ok += ok
            if ok:
                hops.append(depth)
            enter("discovery")
            t0 = trio.current_time()
            found = await shim.find_providers(MODEL, fresh=True)
            discovery_s.append(trio.current_time() - t0)
            ids = {p.peer_id for p in found}
            found_any += bool(ids)
            # the share the DHT listed: records are now checked only until enough are valid
            # (NetworkCore.find_providers), the rest in the background, so `found` is a sample
            stats = shim.last_discovery  # type: ignore[attr-defined]
            listed = stats.listed if stats is not None else ids
            found_share += len(listed & set(providers)) / len(providers)
            fetched.append(stats.fetched if stats is not None else 0)
            candidates.append(len(ids))
            enter("record")
            record = await shim.get_record(rng.choice(providers), fresh=True)
            records_ok += record is not None
            if found:
                enter("exchange")
                target = rng.choice(sorted(ids))
                stream = await shim.open_stream(target, INFER_PROTOCOL)
                await stream.write(b"\0" * REQUEST_BYTES)
                await stream.close()
                got = 0
                while chunk := await stream.read(65536):
                    got += len(chunk)
                served += got >= RESPONSE_BYTES
            enter("done")
        timeouts += scope.cancelled_caught
        if scope.cancelled_caught:
            timeout_steps.append(step)
            log.warning("request %d from shim %s: no end in %.0f s, stuck in %s for %.1f s (earlier steps: %s)",
                        i, shim.peer_id[-8:], REQUEST_BUDGET_S, step, trio.current_time() - began,
                        ", ".join(f"{k} {v:.2f} s" for k, v in times.items()) or "none")
        else:
            log.debug("request %d from shim %s: %s", i, shim.peer_id[-8:],
                      ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    discovery_s.sort()
    out: dict[str, Any] = {
        "timeouts": timeouts,
        "timeout_steps": ",".join(timeout_steps) or "-",
        "discovery_p50_s": round(discovery_s[len(discovery_s) // 2], 3) if discovery_s else None,
        "discovery_fetches_max": max(fetched) if fetched else None,
        "discovery_candidates_min": min(candidates) if candidates else None,
        "requests": requests,
        "lookup_success": lookups_ok / requests,
        "hops_mean": sum(hops) / len(hops) if hops else 0.0,
        "discovery_success": found_any / requests,
        "providers_found_share": found_share / requests,
        "record_success": records_ok / requests,
        "request_success": served / requests,
    }
    for name, values in step_s.items():
        out[f"{name}_max_s"] = round(max(values), 3) if values else None
    return out


async def run_real(nodes: int, requests: int = 20, seed: int = 1) -> dict[str, Any]:
    """The workload on `nodes` real libp2p providers, one relay and two shims on loopback."""
    from darkbloom.p2p.testing import loopback_config, swarm

    t0, cpu0 = time.perf_counter(), time.process_time()
    load0 = os.getloadavg()[0]
    rng = random.Random(seed)
    # darkbloom's default lifetimes (the simulator's too), not the fixture's short test ones:
    # on a loaded machine a 53-host swarm takes minutes to start, longer than a 60 s record
    config = loopback_config(record_ttl_s=600.0, announce_interval_s=120.0)
    async with swarm(nodes=0, relays=1, clients=0, config=config) as s:
        # Warm start as in the simulator: hosts join one after another (each by a self
        # lookup and a bucket refresh through the relay), then providers announce. 50 hosts joining or announcing at once in one process on a
        # shared 2-core machine time their dials out, which the simulator does not model.
        for _ in range(nodes):
            await s.add("node")
        for _ in range(2):
            await s.add("shim")
        for m in s.nodes:
            m.net.serve(INFER_PROTOCOL, _fake_inference_responder)
        limit = trio.CapacityLimiter(ANNOUNCE_CONCURRENCY)
        async with trio.open_nursery() as nursery:
            for m in s.nodes:
                async def announce(net: PeerNetwork = m.net) -> None:
                    async with limit:
                        await net.provide(MODEL)
                        await net.put_record(_template(net))
                nursery.start_soon(announce)
        result_tables = [m.net.dht.routing_table.size() for m in s.nodes]

        async def trace(shim: Any, peer_id: str) -> tuple[bool, int]:
            found, hops, _rounds = await shim.dht.trace_peer_lookup(peer_id)
            return found, hops

        result = await _workload([c.net for c in s.clients], [m.peer_id for m in s.nodes], requests, rng, trace)
        shim_tables = [c.net.dht.routing_table.size() for c in s.clients]
    result["wall_s"] = round(time.perf_counter() - t0, 3)
    # CPU this process got per wall second (1.0 = one full core): all hosts share one trio
    # thread, so well below 1 on a busy machine means the hosts were starved, not slow
    result["cpu_share"] = round((time.process_time() - cpu0) / max(result["wall_s"], 1e-9), 2)
    result["load_avg"] = f"{load0:.1f} -> {os.getloadavg()[0]:.1f}"  # 1-minute load average, start -> end (2 cores)
    result_tables.sort()
    result["routing_table_p50"] = result_tables[len(result_tables) // 2] if result_tables else 0
    result["shim_table"] = shim_tables
    return result


def run_sim(nodes: int, requests: int = 20, seed: int = 1, routing_table: str = REAL_ROUTING_TABLE) -> dict[str, Any]:
    """The same workload in the simulator: one relay, `nodes` public providers, two shims.

    `routing_table` "py-libp2p-0.8.1" (the default) models what the real hosts run: 0.8.1's
    splitting buckets, servers named in FIND_NODE answers admitted uncontacted, and a table
    refresh after each join (darkbloom.p2p.network calls 0.8.1's refresh_routing_table then);
    "kademlia" is the textbook model, for comparison.
    """
    from darkbloom.sim.dht import DhtParams
    from darkbloom.sim.engine import Simulation
    from darkbloom.sim.keys import key_of_peer
    from darkbloom.sim.scenario import Population, Scenario

    libp2p = routing_table == "py-libp2p-0.8.1"
    sc = Scenario(name="realhost", nodes=nodes + 3, seed=seed,
                  population=Population(relays=1, public=1.0, full_cone=0.0, symmetric=0.0, providers=1.0,
                                        models={MODEL: 1.0}, shims=0),
                  dht=DhtParams(routing_table=routing_table, admit_learned=libp2p))  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    t0 = time.perf_counter()

    async def main() -> None:
        sim = Simulation(sc)
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.world.run)
            # relay first, then providers joining through it, then two shims that provide nothing
            relay = sim.new_peer(relay=True)
            providers = [sim.new_peer(provider=True) for _ in range(nodes)]
            shims = [sim.new_peer(provider=False) for _ in range(2)]
            refresh_rng = random.Random(seed)
            for peer in providers + shims:
                await sim.join(peer)
                if libp2p:
                    for target in peer.dht.table.refresh_targets(refresh_rng):
                        await peer.dht.lookup(target)
            del relay
            for p in providers:  # the real swarm's announce loop has re-announced by now
                await p.announce_once()
            for p in providers:
                p.serve(INFER_PROTOCOL, _fake_inference_responder)
            async def trace(shim: Any, peer_id: str) -> tuple[bool, int]:
                looked = await shim.dht.lookup(key_of_peer(peer_id))
                return bool(looked.closest) and looked.closest[0] == peer_id, looked.hops

            result = await _workload(shims, [p.peer_id for p in providers], requests, random.Random(seed), trace)
            tables = sorted(len(p.dht.table) for p in providers)
            result["routing_table_p50"] = tables[len(tables) // 2]
            result["shim_table"] = [len(s.dht.table) for s in shims]
            result["routing_table"] = routing_table
            out.update(result)
            nursery.cancel_scope.cancel()

    trio._core._run._r.seed(seed)  # noqa: SLF001 (repeatable scheduling, as in simulate)
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    return out


def agree(metric: str, sim: float, real: float) -> bool:
    """Within 10 %: shares relative to the larger value; hop means within 10 % or `HOPS_TOLERANCE`
    (0.1 hop) absolute, whichever is larger, since means near 0 have no useful relative error
    and with 10 requests one lookup needing one hop more moves the mean by 0.1."""
    tolerance = 0.1 * max(sim, real, 1e-9)
    if metric.startswith("hops"):
        tolerance = max(tolerance, HOPS_TOLERANCE)
    return abs(sim - real) <= tolerance + 1e-9


def compare(nodes: int, requests: int = 20, seed: int = 1) -> list[dict[str, Any]]:
    """Rows of (metric, sim, real, within 10 %); sim is the py-libp2p-0.8.1 routing-table model
    (what the real hosts run); the textbook model's hops are a context row."""
    real = trio.run(run_real, nodes, requests, seed)
    sim = run_sim(nodes, requests, seed, REAL_ROUTING_TABLE)
    textbook = run_sim(nodes, requests, seed, "kademlia")
    rows = []
    for key in ("lookup_success", "hops_mean", "discovery_success", "providers_found_share", "record_success",
                "request_success"):
        a, b = sim[key], real[key]
        rows.append({"metric": key, "sim": round(a, 4), "real": round(b, 4), "within_10pct": agree(key, a, b)})
    rows.append({"metric": "hops_mean (sim kademlia)", "sim": round(textbook["hops_mean"], 4), "real": round(real["hops_mean"], 4),
                 "within_10pct": None})
    for key in ("timeouts", "timeout_steps", "discovery_p50_s", "discovery_fetches_max", "discovery_candidates_min",
                "lookup_max_s", "discovery_max_s", "record_max_s",
                "exchange_max_s", "wall_s", "cpu_share", "load_avg", "routing_table_p50", "shim_table"):  # context (loopback, load)
        rows.append({"metric": key, "sim": sim.get(key, "-"), "real": real.get(key, "-"), "within_10pct": None})
    return rows
