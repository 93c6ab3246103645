"""The DHT crawler: walk every reachable DHT server by FIND_NODE, politely, and describe the network.

From the bootstrap peers it asks each peer found for the peers nearest to a handful of keys
chosen to land in that peer's first buckets (so the answers cover its routing table), until
no new peers appear. Then it fetches capability records, and for every model seen it asks
who provides it, which finds relayed (client-mode) nodes that no routing table holds.

Polite: at most `concurrency` requests in flight, at most `rate_per_s` started per second,
each under `timeout_s`; a peer that does not answer is tried once. Read-only: it never
stores, provides or announces anything.

The network is reached through a `CrawlPort` (three calls), so the same crawler walks the
simulator (darkbloom.sim.crawl_ports.SimCrawlPort) and libp2p (LibP2PCrawlPort).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from darkbloom.errors import P2PError
from darkbloom.wire.caps import CapabilityRecord

__all__ = ["CrawlPort", "CrawlResult", "PeerInfoRow", "crawl", "preimage_in_bucket", "summarise_crawl", "to_graph"]

log = logging.getLogger(__name__)

PeerAddrs = tuple[str, tuple[str, ...]]


class CrawlPort(Protocol):
    """What the crawler needs from a network."""

    def probe_keys(self, peer_id: str, count: int, rng: random.Random) -> list[bytes]:
        """Keys whose FIND_NODE answers from `peer_id` cover its `count` farthest-reaching buckets."""

    async def find_node(self, peer_id: str, addrs: Sequence[str], key: bytes) -> list[PeerAddrs]:
        """`peer_id`'s closest known peers to `key` (raises P2PError when it does not answer)."""

    async def get_record(self, peer_id: str) -> CapabilityRecord | None:
        """The peer's valid capability record, or None."""

    async def find_providers(self, model_id: str) -> list[PeerAddrs]:
        """Peers that provide `model_id` (with addresses)."""


def preimage_in_bucket(peer_key: bytes, bucket: int, rng: random.Random, *, max_tries: int = 1 << 20) -> bytes:
    """A random key whose sha256 shares exactly `bucket` leading bits with `peer_key` (a sha256).

    For DHTs that hash FIND_NODE keys (py-libp2p does): about 2**(bucket+1) tries.
    """
    want = int.from_bytes(peer_key, "big")
    for _ in range(max_tries):
        candidate = rng.randbytes(32)
        h = int.from_bytes(hashlib.sha256(candidate).digest(), "big")
        if 256 - (h ^ want).bit_length() == bucket:
            return candidate
    raise ValueError(f"no preimage for bucket {bucket} in {max_tries} tries")


@dataclass(slots=True)
class PeerInfoRow:
    peer_id: str
    addrs: tuple[str, ...] = ()
    found_by: str = ""  # "bootstrap", "find_node" or "provider"
    responded: bool | None = None  # answered FIND_NODE (None: not asked, e.g. a client)
    record: CapabilityRecord | None = None
    knows: set[str] = field(default_factory=set)  # routing-table edges seen from this peer

    @property
    def relayed(self) -> bool:
        if self.record is not None:
            return self.record.reachability == "relayed"
        return any("/p2p-circuit" in a for a in self.addrs)


@dataclass(slots=True)
class CrawlResult:
    peers: dict[str, PeerInfoRow]
    requests: int
    failures: int
    elapsed_s: float


class _RateLimit:
    """At most `rate` starts per second (spaced evenly), on trio's clock."""

    def __init__(self, rate_per_s: float) -> None:
        self.interval = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
        self.next_at = 0.0

    async def wait(self) -> None:
        now = trio.current_time()
        at = max(now, self.next_at)
        self.next_at = at + self.interval
        await trio.sleep_until(at)


async def crawl(
    port: CrawlPort,
    bootstrap: Sequence[PeerAddrs],
    *,
    concurrency: int = 8,
    rate_per_s: float = 20.0,
    timeout_s: float = 10.0,
    probes_per_peer: int = 8,
    max_peers: int = 100_000,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> CrawlResult:
    """Walk the DHT from `bootstrap`; see the module docstring."""
    rng = random.Random(seed)
    peers: dict[str, PeerInfoRow] = {}
    limiter = trio.CapacityLimiter(concurrency)
    rate = _RateLimit(rate_per_s)
    counts = Counter[str]()
    start = trio.current_time()
    send, receive = trio.open_memory_channel[str](max_peers + len(bootstrap))

    def learn(peer_id: str, addrs: Sequence[str], how: str) -> bool:
        row = peers.get(peer_id)
        if row is None:
            if len(peers) >= max_peers:
                return False
            peers[peer_id] = PeerInfoRow(peer_id=peer_id, addrs=tuple(addrs), found_by=how)
            return True
        if addrs and not row.addrs:
            row.addrs = tuple(addrs)
        return False

    async def call(fn, *args):  # noqa: ANN001, ANN202 (one polite request)
        async with limiter:
            await rate.wait()
            counts["requests"] += 1
            with trio.move_on_after(timeout_s):
                return await fn(*args)
            raise trio.TooSlowError

    async def visit(peer_id: str) -> None:
        row = peers[peer_id]
        answered = 0
        for key in port.probe_keys(peer_id, probes_per_peer, rng):
            try:
                found = await call(port.find_node, peer_id, row.addrs, key)
            except (P2PError, trio.TooSlowError) as exc:  # the peer is gone or slow: note it and move on
                counts["failures"] += 1
                log.debug("find_node to %s failed: %s", peer_id[-8:], exc)
                break
            answered += 1
            for other, addrs in found:
                if other == peer_id:
                    continue
                row.knows.add(other)
                if learn(other, addrs, "find_node"):
                    send.send_nowait(other)
        row.responded = answered > 0
        if progress is not None:
            progress(sum(1 for r in peers.values() if r.responded is not None), len(peers))

    for peer_id, addrs in bootstrap:
        if learn(peer_id, addrs, "bootstrap"):
            send.send_nowait(peer_id)
    async with trio.open_nursery() as nursery:
        pending = 0
        done = trio.Event()

        async def run_visit(pid: str) -> None:
            nonlocal pending
            try:
                await visit(pid)
            finally:
                pending -= 1
                if pending == 0 and receive.statistics().current_buffer_used == 0:
                    done.set()

        async def dispatcher() -> None:
            nonlocal pending
            async for pid in receive:
                pending += 1
                nursery.start_soon(run_visit, pid)

        nursery.start_soon(dispatcher)
        if not peers:
            done.set()
        await done.wait()
        nursery.cancel_scope.cancel()

    # records of DHT servers, then providers of every model seen (finds relayed nodes)
    async def fetch_record(row: PeerInfoRow) -> None:
        try:
            row.record = await call(port.get_record, row.peer_id)
        except (P2PError, trio.TooSlowError):
            counts["failures"] += 1

    async with trio.open_nursery() as nursery:
        for row in list(peers.values()):
            nursery.start_soon(fetch_record, row)
    models = sorted({m.id for r in peers.values() if r.record for m in r.record.models})
    new_rows: list[PeerInfoRow] = []
    for model in models:
        try:
            providers = await call(port.find_providers, model)
        except (P2PError, trio.TooSlowError):
            counts["failures"] += 1
            continue
        for pid, addrs in providers:
            if learn(pid, addrs, "provider"):
                new_rows.append(peers[pid])
    async with trio.open_nursery() as nursery:
        for row in new_rows:
            nursery.start_soon(fetch_record, row)
    return CrawlResult(peers=peers, requests=counts["requests"], failures=counts["failures"],
                       elapsed_s=trio.current_time() - start)


def summarise_crawl(result: CrawlResult) -> dict[str, Any]:
    rows = list(result.peers.values())
    asked = [r for r in rows if r.responded is not None]
    models = Counter(m.id for r in rows if r.record for m in r.record.models)
    versions = Counter(r.record.software_version or "?" for r in rows if r.record)
    protocols = Counter(r.record.protocol_version or "?" for r in rows if r.record)
    return {
        "peers": len(rows),
        "dht_servers_asked": len(asked),
        "reachable": sum(1 for r in asked if r.responded),
        "reachable_share": (sum(1 for r in asked if r.responded) / len(asked)) if asked else 0.0,
        "relayed": sum(1 for r in rows if r.relayed),
        "relayed_share": (sum(1 for r in rows if r.relayed) / len(rows)) if rows else 0.0,
        "with_record": sum(1 for r in rows if r.record),
        "routing_edges": sum(len(r.knows) for r in rows),
        "models": dict(models.most_common()),
        "software_versions": dict(versions.most_common()),
        "protocol_versions": dict(protocols.most_common()),
        "requests": result.requests,
        "failures": result.failures,
        "elapsed_s": round(result.elapsed_s, 3),
    }


def row_dict(row: PeerInfoRow) -> dict[str, Any]:
    rec = row.record
    return {
        "peer_id": row.peer_id,
        "addrs": list(rec.addrs if rec and rec.addrs else row.addrs),
        "found_by": row.found_by,
        "responded": row.responded,
        "reachability": "relayed" if row.relayed else ("public" if row.responded else "unknown"),
        "models": [m.id for m in rec.models] if rec else [],
        "software_version": rec.software_version if rec else "",
        "protocol_version": rec.protocol_version if rec else "",
        "region": rec.region if rec else "",
        "record_expires_at_ms": rec.expires_at_ms if rec else None,
        "knows": sorted(row.knows),
    }


def to_graph(result: CrawlResult):  # noqa: ANN201 (networkx is imported lazily)
    """A networkx DiGraph: nodes carry the peer facts, edges are routing-table entries."""
    import networkx as nx

    g = nx.DiGraph()
    for row in result.peers.values():
        d = row_dict(row)
        g.add_node(
            row.peer_id,
            addrs=" ".join(d["addrs"]), found_by=d["found_by"], responded=str(d["responded"]).lower(),
            reachability=d["reachability"], models=",".join(d["models"]), software_version=d["software_version"],
            protocol_version=d["protocol_version"], region=d["region"],
        )
    for row in result.peers.values():
        for other in sorted(row.knows):
            if other in result.peers:
                g.add_edge(row.peer_id, other)
    return g
