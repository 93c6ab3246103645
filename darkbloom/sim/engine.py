"""Run a scenario: build the population, warm the DHT, play workload, churn and events in virtual time.

`simulate(scenario)` runs one `trio.run` on `MockClock(autojump_threshold=0)`, with trio's
scheduler and every random choice seeded from the scenario's seed, so the same seed gives the
same run. The population is plain data (`SimNode`, `SimPeer`); tasks exist only for work in
flight (a lookup, a request, an announce), started by one scheduler from a timed heap.

Warm start: the initial nodes join one after another by a FIND_NODE lookup of their own id
answered by direct calls (the same routing table and traversal code, no network and no time),
as if they had joined over the hours before the scenario starts. Everything after that
(announcing models and records, lookups, requests, joins, probes) goes over the simulated
network through the PeerNetwork interface.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import random
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from darkbloom import __version__
from darkbloom.errors import P2PError
from darkbloom.identity import Identity
from darkbloom.p2p.api import Stream
from darkbloom.p2p.keys import model_cid, peer_id_from_public_key
from darkbloom.sim.dht import KadRequest, _key_bytes
from darkbloom.sim.keys import KeySpace, content_key
from darkbloom.sim.metrics import Metrics, summarise
from darkbloom.sim.network import NatType, SimNode, SimWorld
from darkbloom.sim.peer import SimPeer
from darkbloom.sim.scenario import Event, Scenario
from darkbloom.wire.caps import CapabilityRecord, ModelCap
from darkbloom.wire.infer import INFER_PROTOCOL, PROTOCOL_VERSION

__all__ = ["SimResult", "Simulation", "simulate"]

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 30.0  # ApiConfig.first_token_timeout_s
MAX_ATTEMPTS = 3  # ApiConfig.max_attempts


@dataclass(slots=True)
class SimResult:
    scenario: Scenario
    metrics: Metrics
    summary: dict[str, Any]
    stats: dict[str, Any]
    nodes_final: int
    digest: str = ""  # hash of every measured row: equal seeds give equal digests


@dataclass(order=True, slots=True)
class _Timed:
    at: float
    seq: int
    action: Callable[[], Awaitable[None]] = field(compare=False)


def _weighted(rng: random.Random, shares: dict[str, float]) -> str:
    names = list(shares)
    return rng.choices(names, weights=[shares[n] for n in names])[0]


async def _fake_inference_responder(stream: Stream, response_bytes: int) -> None:
    """Stands in for the inference engine (this simulation is about routing): reads the
    request to EOF and answers `response_bytes` in 8 KiB writes."""
    while await stream.read(65536):
        pass
    left = response_bytes
    while left > 0:
        chunk = min(left, 8192)
        await stream.write(b"\0" * chunk)
        left -= chunk


class Simulation:
    """One scenario's world, population and workload."""

    def __init__(self, scenario: Scenario) -> None:
        self.sc = scenario
        self.rng = random.Random(scenario.seed)
        self.world = SimWorld(scenario.links, seed=self.rng.getrandbits(64))
        self.keys = KeySpace()
        self.metrics = Metrics()
        self.peers: dict[str, SimPeer] = {}  # alive peers, in join order
        self.servers: dict[str, None] = {}  # alive DHT servers (lookup targets)
        self.relays: list[str] = []  # alive relays
        self.providers: dict[str, dict[str, None]] = {m: {} for m in scenario.population.models}
        self.models_of: dict[str, str] = {}
        self._index = 0
        self._heap: list[_Timed] = []
        self._seq = 0
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(scenario.workload.max_concurrent)
        self._probing: dict[str, dict[str, Any]] = {}

    # --- population ---------------------------------------------------------------------

    def new_peer(self, *, relay: bool = False, provider: bool | None = None) -> SimPeer:
        pop = self.sc.population
        rng = self.rng
        identity = Identity.from_seed(rng.randbytes(32))
        peer_id = peer_id_from_public_key(identity.public_key)
        region = _weighted(rng, pop.regions)
        nat: NatType = "public" if relay else _weighted(
            rng, {"public": pop.public, "full-cone": pop.full_cone, "symmetric": pop.symmetric}  # type: ignore[dict-item]
        )  # type: ignore[assignment]
        node = SimNode(index=self._index, peer_id=peer_id, region=region, nat=nat, is_relay=relay)
        self._index += 1
        if not node.public:
            node.relay = self.pick_relay(region)
        self.world.add(node)
        peer = SimPeer(
            self.world, node, identity, self.keys, self.sc.dht,
            record_ttl_s=self.sc.records.record_ttl_s, announce_interval_s=self.sc.records.announce_interval_s,
        )
        self.peers[peer_id] = peer
        if node.public:
            self.servers[peer_id] = None
        if relay:
            self.relays.append(peer_id)
        if provider is None:
            provider = not relay and rng.random() < pop.providers
        if provider:
            model = _weighted(rng, pop.models)
            self.models_of[peer_id] = model
            size = self.sc.workload.response_bytes
            peer.serve(INFER_PROTOCOL, lambda s, size=size: _fake_inference_responder(s, size))
        return peer

    def pick_relay(self, region: str) -> str | None:
        alive = [r for r in self.relays if self.world.nodes[r].alive]
        if not alive:
            return None
        near = [r for r in alive if self.world.nodes[r].region == region]
        return self.rng.choice(near or alive)

    def template(self, peer: SimPeer) -> CapabilityRecord:
        model = self.models_of[peer.peer_id]
        return CapabilityRecord(
            peer_id=peer.peer_id, seq=0, issued_at_ms=0, expires_at_ms=0,
            models=(ModelCap(id=model, digest=model_cid(model)[-16:], context_length=8192, quantization="q4"),),
            decode_tps=40.0, prefill_tps=400.0, max_concurrent=4, region=peer.node.region,
            software_version=__version__, protocol_version=PROTOCOL_VERSION,
        )

    def warm_start(self) -> None:
        """Create the initial population and fill routing tables by sync self-lookups."""
        pop = self.sc.population
        for _ in range(pop.relays):
            self.new_peer(relay=True)
        for _ in range(self.sc.nodes - pop.relays):
            self.new_peer()
        dht_of = {pid: p.dht for pid, p in self.peers.items() if p.node.public}
        order = list(self.peers)
        for pid in self.relays:  # the relays know each other (bootstrap list)
            for other in self.relays:
                self.peers[pid].dht.observe(other)
        for pid in order:
            dht = self.peers[pid].dht
            for r in self.relays:
                dht.observe(r)
            dht.lookup_sync(self.keys(pid), dht_of)
        # then every node refreshes its table (Kademlia's join refresh, libp2p's periodic one):
        # kademlia model, a random key in each bucket that is not full; py-libp2p-0.8.1 model,
        # one lookup per non-empty bucket as 0.8.1 does (darkbloom.sim.routing.refresh_targets)
        for pid in order:
            dht = self.peers[pid].dht
            for target in dht.table.refresh_targets(self.rng):
                dht.lookup_sync(target, dht_of)

    async def warm_announce(self) -> None:
        """Every initial provider provides its model and stores its record, by direct calls."""
        self.world.warm_dhts = {pid: p.dht for pid, p in self.peers.items() if p.node.public}
        try:
            for pid, peer in list(self.peers.items()):
                if pid in self.models_of:
                    self.providers[self.models_of[pid]][pid] = None
                    await peer.provide(self.models_of[pid])
                    await peer.put_record(self.template(peer))
        finally:
            self.world.warm_dhts = {}

    # --- scheduler ----------------------------------------------------------------------

    def at(self, when: float, action: Callable[[], Awaitable[None]]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, _Timed(when, self._seq, action))
        self._wake.set()

    async def _scheduler(self, end: float) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                if not self._heap:
                    self._wake = trio.Event()
                    with trio.move_on_at(end):
                        await self._wake.wait()
                    if trio.current_time() >= end:
                        break
                    continue
                head = self._heap[0]
                if head.at >= end:
                    break
                if head.at > trio.current_time():
                    self._wake = trio.Event()
                    with trio.move_on_at(head.at):
                        await self._wake.wait()
                    continue
                heapq.heappop(self._heap)
                await self._limiter.acquire_on_behalf_of(head.seq)
                nursery.start_soon(self._run_action, head)
            nursery.cancel_scope.cancel()

    async def _run_action(self, item: _Timed) -> None:
        try:
            await item.action()
        finally:
            self._limiter.release_on_behalf_of(item.seq)

    def poisson(self, rate: float, action: Callable[[], Awaitable[None]], start: float = 0.0) -> None:
        """Run `action` at exponentially spaced times with mean rate `rate` per second."""
        if rate <= 0:
            return

        async def tick() -> None:
            self.at(trio.current_time() + self.rng.expovariate(rate), tick)
            await action()

        self.at(start + self.rng.expovariate(rate), tick)

    # --- announcing ---------------------------------------------------------------------

    async def announce(self, peer: SimPeer, *, first: bool = False) -> None:
        if not peer.node.alive:
            return
        try:
            if first:
                await peer.provide(self.models_of[peer.peer_id])
                await peer.put_record(self.template(peer))
            else:
                await peer.announce_once()
        except P2PError as exc:
            log.debug("announce of %s failed: %s", peer.peer_id[-8:], exc)
        interval = self.sc.records.announce_interval_s
        self.at(trio.current_time() + interval, lambda: self.announce(peer))

    async def refresh(self, peer: SimPeer) -> None:
        if not peer.node.alive:
            return
        await peer.dht.lookup(self.keys(peer.peer_id))
        self.at(trio.current_time() + self.sc.records.refresh_interval_s, lambda: self.refresh(peer))

    # --- workload -----------------------------------------------------------------------

    def random_alive(self) -> SimPeer:
        while True:
            pid = self.rng.choice(list(self.peers)) if len(self.peers) < 64 else self._sample_peer()
            if self.world.nodes[pid].alive:
                return self.peers[pid]

    def random_shim(self) -> SimPeer:
        """A requesting node: one of the scenario's shims (replaced by a new one when it left)."""
        want = self.sc.population.shims
        if want <= 0:
            return self.random_alive()
        self.shims = [s for s in getattr(self, "shims", []) if self.world.nodes[s].alive]
        candidates = [p for p in self._peer_list_fresh() if p not in self.shims and not self.world.nodes[p].is_relay]
        while len(self.shims) < want and candidates:
            pick = self.rng.choice(candidates)
            candidates.remove(pick)
            self.shims.append(pick)
        return self.peers[self.rng.choice(self.shims)]

    def _sample_peer(self) -> str:
        # dicts have no O(1) random access; a cached list refreshed on membership change
        if getattr(self, "_peer_list_len", -1) != len(self.peers):
            self._peer_list = list(self.peers)
            self._peer_list_len = len(self.peers)
        return self.rng.choice(self._peer_list)

    async def do_lookup(self) -> None:
        src = self.random_alive()
        servers = [s for s in self.servers if s != src.peer_id] if len(self.servers) < 64 else None
        target = self.rng.choice(servers) if servers else self._sample_server(src.peer_id)
        t0 = trio.current_time()
        res = await src.dht.lookup(self.keys(target))
        ok = bool(res.closest) and res.closest[0] == target
        self.metrics.lookups.append({
            "t": round(t0, 6), "src_nat": src.node.nat, "src_region": src.node.region,
            "dst_region": self.world.nodes[target].region, "hops": res.hops, "rounds": res.rounds,
            "queries": res.queries, "failures": res.failures, "latency_s": round(trio.current_time() - t0, 6),
            "success": ok, "target_alive": self.world.nodes[target].alive,
        })

    def _sample_server(self, exclude: str) -> str:
        if getattr(self, "_server_list_len", -1) != len(self.servers):
            self._server_list = list(self.servers)
            self._server_list_len = len(self.servers)
        while True:
            s = self.rng.choice(self._server_list)
            if s != exclude:
                return s

    async def do_request(self, model: str | None = None) -> None:
        """What a shim does: find providers of a model, then one exchange with one of them."""
        client = self.random_shim()
        model = model or _weighted(self.rng, self.sc.population.models)
        t0 = trio.current_time()
        row: dict[str, Any] = {
            "t": round(t0, 6), "model": model, "client_nat": client.node.nat, "client_region": client.node.region,
            "providers": 0, "attempts": 0, "route": "", "ok": False, "error": "", "discovery_s": 0.0,
            "latency_s": 0.0, "provider_region": "",
        }
        try:
            found = await client.provider_candidates(model, self.rng, self.sc.workload.candidates)
        except P2PError as exc:
            found = []
            row["error"] = type(exc).__name__
        row["providers"] = len(found)
        row["discovery_s"] = round(trio.current_time() - t0, 6)
        candidates = [p for p in found if p.peer_id != client.peer_id]
        self.rng.shuffle(candidates)
        for provider in candidates[:MAX_ATTEMPTS]:
            row["attempts"] += 1
            with trio.move_on_after(REQUEST_TIMEOUT_S) as scope:
                try:
                    stream = await client.open_stream(provider.peer_id, INFER_PROTOCOL)
                    await stream.write(b"\0" * self.sc.workload.request_bytes)
                    await stream.close()
                    got = 0
                    while chunk := await stream.read():
                        got += len(chunk)
                    if got >= self.sc.workload.response_bytes:
                        row.update(ok=True, route=stream.route, provider_region=self.world.nodes[provider.peer_id].region)
                        break
                    row["error"] = "short answer"
                except P2PError as exc:
                    row["error"] = type(exc).__name__
            if scope.cancelled_caught:
                row["error"] = "timeout"
        if not candidates and not row["error"]:
            row["error"] = "no providers"
        if row["ok"]:
            row["error"] = ""
        row["latency_s"] = round(trio.current_time() - t0, 6)
        self.metrics.requests.append(row)

    # --- churn and events ---------------------------------------------------------------

    def leave(self, peer_id: str) -> None:
        self.world.kill(peer_id)
        self.peers.pop(peer_id, None)
        self.servers.pop(peer_id, None)
        if peer_id in self.relays:
            self.relays.remove(peer_id)
        model = self.models_of.get(peer_id)
        if model:
            self.providers[model].pop(peer_id, None)

    async def do_leave(self) -> None:
        candidates = [p for p in self._peer_list_fresh() if not self.world.nodes[p].is_relay]
        if len(candidates) > 2:
            victim = self.rng.choice(candidates)
            self.leave(victim)
            if victim in self.models_of:
                self.track_departure(victim)
        await trio.lowlevel.checkpoint()

    def _peer_list_fresh(self) -> list[str]:
        self._sample_peer()
        return self._peer_list

    async def do_join(self) -> None:
        peer = self.new_peer()
        await self.join(peer)

    async def join(self, peer: SimPeer) -> None:
        for r in self.relays:
            peer.dht.observe(r)
        await peer.dht.lookup(self.keys(peer.peer_id))
        if peer.peer_id in self.models_of:
            self.providers[self.models_of[peer.peer_id]][peer.peer_id] = None
            await self.announce(peer, first=True)
        if self.sc.records.refresh_interval_s > 0:
            self.at(trio.current_time() + self.sc.records.refresh_interval_s, lambda: self.refresh(peer))

    def track_departure(self, peer_id: str) -> None:
        row = {"peer": peer_id[-12:], "model": self.models_of[peer_id], "left_at": trio.current_time(),
               "entry_gone_after_s": None, "record_gone_after_s": None, "vanished_after_s": None}
        self.metrics.departures.append(row)
        self._probing[peer_id] = row
        self.at(trio.current_time() + self.sc.workload.probe_interval_s, lambda: self.probe(peer_id))

    async def probe(self, peer_id: str) -> None:
        """Is the departed `peer_id` still discoverable? (as a provider entry, with a valid record)"""
        row = self._probing[peer_id]
        client = self.random_alive()
        now = trio.current_time()
        if row["entry_gone_after_s"] is None:
            seen = False

            def spot(_: str, reply: Any) -> bool:
                nonlocal seen
                seen = seen or any(e.peer_id == peer_id for e in reply.providers)
                return seen

            key = content_key(model_cid(row["model"]))
            await client.dht.lookup(key, KadRequest(op="get_providers", key=_key_bytes(key)), on_reply=spot)
            if not seen:
                row["entry_gone_after_s"] = round(now - row["left_at"], 3)
        if row["record_gone_after_s"] is None and await client.get_record(peer_id, fresh=True) is None:
            row["record_gone_after_s"] = round(now - row["left_at"], 3)
        if row["vanished_after_s"] is None and (row["entry_gone_after_s"] is not None or row["record_gone_after_s"] is not None):
            row["vanished_after_s"] = round(now - row["left_at"], 3)
        if row["entry_gone_after_s"] is None or row["record_gone_after_s"] is None:
            self.at(now + self.sc.workload.probe_interval_s, lambda: self.probe(peer_id))

    def schedule_event(self, ev: Event) -> None:
        async def fire() -> None:
            self.metrics.events.append({"t": trio.current_time(), "kind": ev.kind, "count": ev.count, "regions": "/".join(ev.regions)})
            await self.apply_event(ev)

        self.at(ev.at_s, fire)

    async def apply_event(self, ev: Event) -> None:
        if ev.kind == "leave_providers":
            alive = [p for m in self.providers.values() for p in m]
            for victim in self.rng.sample(alive, min(ev.count, len(alive))):
                self.leave(victim)
                self.track_departure(victim)
        elif ev.kind == "kill_relays":
            doomed = self.rng.sample(self.relays, min(ev.count, len(self.relays)))
            for relay in doomed:
                self.leave(relay)
            for node in self.world.nodes.values():
                if node.alive and node.relay in doomed:
                    delay = self.rng.uniform(0, self.sc.records.reservation_refresh_s)
                    self.at(trio.current_time() + delay, lambda node=node: self.re_reserve(node))
        elif ev.kind == "partition":
            self.world.cut.add(frozenset(ev.regions))
        elif ev.kind == "heal":
            self.world.cut.discard(frozenset(ev.regions))
        elif ev.kind == "flash_crowd":
            model = ev.model or next(iter(self.sc.population.models))
            for _ in range(ev.count):
                self.at(trio.current_time() + self.rng.uniform(0, ev.within_s), lambda: self.do_request(model))
        await trio.lowlevel.checkpoint()

    async def re_reserve(self, node: SimNode) -> None:
        if not node.alive:
            return
        node.relay = self.pick_relay(node.region)
        self.metrics.events.append({"t": trio.current_time(), "kind": "re_reserve", "count": 1, "regions": node.region})
        peer = self.peers.get(node.peer_id)
        if peer is not None and node.peer_id in self.models_of:
            await peer.announce_once()  # new /p2p-circuit address in the record

    # --- the run ------------------------------------------------------------------------

    async def run(self) -> None:
        sc = self.sc
        async with trio.open_nursery() as nursery:
            await nursery.start(self.world.run)
            t0 = time.process_time()
            self.warm_start()
            log.info("warm start: %d nodes joined in %.1f s CPU", len(self.peers), time.process_time() - t0)
            t0 = time.process_time()
            await self.warm_announce()
            log.info("warm announce: %d providers in %.1f s CPU", len(self.models_of), time.process_time() - t0)
            for peer in self.peers.values():  # count only what happens in the scenario
                peer.dht.stats.answered = peer.dht.stats.rpcs = peer.dht.stats.rpc_failures = 0
            interval = sc.records.announce_interval_s
            for pid, peer in list(self.peers.items()):
                if pid in self.models_of:  # re-announce on each node's own phase
                    self.at(self.rng.uniform(0, interval), lambda peer=peer: self.announce(peer))
                if sc.records.refresh_interval_s > 0:
                    self.at(self.rng.uniform(0, sc.records.refresh_interval_s), lambda peer=peer: self.refresh(peer))
            wl = sc.workload
            self.poisson(wl.lookup_rate_per_s, self.do_lookup, start=sc.warmup_s)
            self.poisson(wl.request_rate_per_s, self.do_request, start=sc.warmup_s)
            self.poisson(sc.churn.leave_per_s, self.do_leave, start=sc.warmup_s)
            self.poisson(sc.churn.join_per_s, self.do_join, start=sc.warmup_s)
            for ev in sc.events:
                self.schedule_event(ev)
            await self._scheduler(end=sc.duration_s)
            nursery.cancel_scope.cancel()


def _digest(m: Metrics) -> str:
    import hashlib
    import json

    blob = json.dumps([m.lookups, m.requests, m.departures, m.events], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def simulate(scenario: Scenario) -> SimResult:
    """Run `scenario` to its end in virtual time; deterministic for a given seed."""
    # trio shuffles each scheduling batch with a module-level Random; seed it for repeatability
    trio._core._run._r.seed(scenario.seed)  # noqa: SLF001 (no public hook exists)
    sim = Simulation(scenario)
    clock = trio.testing.MockClock(autojump_threshold=0)
    wall0 = time.perf_counter()
    cpu0 = time.process_time()
    trio.run(sim.run, clock=clock)
    wall = time.perf_counter() - wall0
    rpcs = sum(p.dht.stats.rpcs for p in sim.peers.values())
    stats = dict(sim.world.stats)
    answered = sorted((n.net.dht.stats.answered for n in sim.world.nodes.values() if n.net is not None), reverse=True)
    total_answered = sum(answered) or 1
    stats.update(
        answers_max_per_node=answered[0] if answered else 0,
        answers_top20_share=round(sum(answered[:20]) / total_answered, 4),
        answers_median_per_server=answered[len([a for a in answered if a > 0]) // 2] if answered else 0,
    )
    stats.update(
        wall_s=round(wall, 3),
        cpu_s=round(time.process_time() - cpu0, 3),
        virtual_s=round(clock.current_time(), 3),
        maxrss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        rpcs_by_alive_nodes=rpcs,
        nodes_created=sim._index,
    )
    summary = summarise(sim.metrics, warmup_s=scenario.warmup_s)
    summary = {k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else v) for k, v in summary.items()}
    return SimResult(
        scenario=scenario, metrics=sim.metrics, summary=summary, stats=stats,
        nodes_final=len(sim.peers), digest=_digest(sim.metrics),
    )


def scenario_dict(scenario: Scenario) -> dict[str, Any]:
    data = dataclasses.asdict(scenario)
    data["links"]["region_ms"] = {f"{a}/{b}": v for (a, b), v in scenario.links.region_ms.items()}
    return data
