"""A cold discovery checks records only until enough providers are valid; the rest in the background.

At 50 real hosts a shim fetched every provider's record (a DHT get_value of seconds each under
load) before answering, and cold requests ran out of their 60 s (docs/RESEARCH.md, real hosts).
`NetworkCore.find_providers` now fetches records only until `discovery_candidates` valid
providers are known, and hands the rest to its background loop. Most tests run a real
`MemoryNetwork` shim against providers and records placed on its hub (signed by real
identities); the last one runs a real libp2p swarm on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses

import trio
import trio.testing

from darkbloom.config import P2PConfig
from darkbloom.identity import Identity
from darkbloom.p2p import records
from darkbloom.p2p.keys import caps_key, model_cid, peer_id_from_public_key
from darkbloom.p2p.memory import MemoryHub, MemoryNetwork, open_memory_network
from darkbloom.p2p.testing import OffsetClock, loopback_config, swarm
from darkbloom.wire.caps import CapabilityRecord, ModelCap

MODEL = "m"
CFG = P2PConfig(record_ttl_s=600.0, announce_interval_s=300.0)


def template(model: str = MODEL) -> CapabilityRecord:
    return CapabilityRecord(peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0,
                            models=(ModelCap(id=model, digest="d", context_length=512),))


def add_provider(hub: MemoryHub, value: str = "valid", *, model: str = MODEL) -> str:
    """A provider of `model` on the hub whose stored record is `value`: valid, forged, expired,
    other-model (valid, another model) or missing (provides, stores no record)."""
    identity = Identity.generate()
    pid = peer_id_from_public_key(identity.public_key)
    now = int(hub.clock() * 1000)
    hub.providers.setdefault(model_cid(model), {})[pid] = (hub.clock() + 600, (f"/memory/{pid}/p2p/{pid}",))
    if value == "missing":
        return pid
    issued, ttl = (now - 120_000, 60_000) if value == "expired" else (now, 600_000)
    tmpl = template("other") if value == "other-model" else template(model)
    record = records.build_record(identity, tmpl, seq=issued, now_ms=issued, ttl_ms=ttl, addrs=(),
                                  reachability="public")
    if value == "forged":
        record = dataclasses.replace(record, price_input_per_m=1)  # signature no longer matches
    hub.values[caps_key(pid)] = records.encode_record(record)
    return pid


class CountingFetches:
    """Wraps a network's raw record fetch: counts calls; `reached(n)` waits until n completed."""

    def __init__(self, net: object) -> None:
        self.inner = net._raw_get_value  # type: ignore[attr-defined]
        self.calls = 0
        self.done = 0
        self._changed = trio.Event()
        net._raw_get_value = self  # type: ignore[attr-defined]

    async def __call__(self, key: str, fresh: bool) -> bytes | None:
        self.calls += 1
        try:
            return await self.inner(key, fresh)
        finally:
            self.done += 1
            self._changed.set()
            self._changed = trio.Event()

    async def reached(self, n: int) -> None:
        while self.done < n:
            await self._changed.wait()


async def settle(net: MemoryNetwork, fetches: CountingFetches, n: int) -> None:
    """Wait until n fetches completed and their records reached the cache."""
    await fetches.reached(n)
    while net._fetching:  # a fetch's caller caches the record after the raw fetch returned
        await trio.lowlevel.checkpoint()


async def test_a_cold_discovery_fetches_only_as_many_records_as_it_needs():
    hub = MemoryHub(clock=OffsetClock())
    honest = {add_provider(hub) for _ in range(20)}
    with trio.fail_after(10):
        async with open_memory_network(hub, Identity.generate(), CFG) as shim:
            shim.discovery_candidates = 5
            fetches = CountingFetches(shim)

            found = await shim.find_providers(MODEL, fresh=True)

            stats = shim.last_discovery
            assert stats is not None
            assert len(found) == 5 and {p.peer_id for p in found} <= honest
            assert stats.fetched == 5 and stats.cached == 0 and stats.deferred == 15
            assert stats.listed == frozenset(honest)
            assert fetches.calls == 5  # the background loop starts after the discovery returned
            # the other 15 are fetched by the background loop, and then listed at no cost
            await settle(shim, fetches, 20)
            assert fetches.calls == 20
            again = await shim.find_providers(MODEL, fresh=True)
            assert {p.peer_id for p in again} == honest
            assert shim.last_discovery.fetched == 0 and shim.last_discovery.cached == 20
            assert fetches.calls == 20


async def test_forged_expired_foreign_and_missing_records_are_never_listed():
    hub = MemoryHub(clock=OffsetClock())
    honest = {add_provider(hub) for _ in range(3)}
    bad = {add_provider(hub, kind) for kind in ("forged", "expired", "other-model", "missing") for _ in range(3)}
    with trio.fail_after(10):
        async with open_memory_network(hub, Identity.generate(), CFG) as shim:
            shim.discovery_candidates = 3
            fetches = CountingFetches(shim)

            found = await shim.find_providers(MODEL, fresh=True)

            # all three honest providers are found whatever the order: bad records do not count
            assert {p.peer_id for p in found} == honest
            assert shim.last_discovery.fetched <= len(honest) + len(bad)
            await settle(shim, fetches, len(honest) + len(bad))
            again = await shim.find_providers(MODEL, fresh=True)
            assert {p.peer_id for p in again} == honest
            assert all(p.record.model(MODEL) is not None for p in again)
            for pid in bad:
                record = await shim.get_record(pid)
                assert record is None or record.model(MODEL) is None


async def test_providers_whose_record_failed_are_asked_last_and_not_retried_at_once():
    hub = MemoryHub(clock=OffsetClock())
    missing = {add_provider(hub, "missing") for _ in range(4)}
    with trio.fail_after(10):
        async with open_memory_network(hub, Identity.generate(), CFG) as shim:
            shim.discovery_candidates = 2
            fetches = CountingFetches(shim)
            assert await shim.find_providers(MODEL, fresh=True) == []  # tried all 4, none has a record
            assert shim.last_discovery.fetched == 4
            honest = {add_provider(hub) for _ in range(2)}
            await trio.testing.wait_all_tasks_blocked()
            before = fetches.calls

            found = await shim.find_providers(MODEL, fresh=True)

            # the two new providers are fetched first; the four that just failed wait
            assert {p.peer_id for p in found} == honest
            assert fetches.calls - before == 2
            await trio.testing.wait_all_tasks_blocked()
            assert fetches.calls - before == 2  # the background loop does not retry them yet
            assert missing.isdisjoint(p.peer_id for p in found)


async def test_discovery_candidates_zero_checks_every_record_before_answering():
    hub = MemoryHub(clock=OffsetClock())
    honest = {add_provider(hub) for _ in range(12)}
    with trio.fail_after(10):
        async with open_memory_network(hub, Identity.generate(), CFG) as shim:
            shim.discovery_candidates = 0
            fetches = CountingFetches(shim)
            found = await shim.find_providers(MODEL, fresh=True)
            assert {p.peer_id for p in found} == honest
            assert fetches.calls == 12 and shim.last_discovery.deferred == 0


async def test_bounded_discovery_on_real_libp2p_hosts():
    """1 relay, 6 providers, 1 shim on 127.0.0.1: a cold discovery with a bound of 3 fetches
    3 records and returns 3 valid providers; the background loop then fetches the other 3."""
    with trio.fail_after(90):
        config = loopback_config(record_ttl_s=600.0, announce_interval_s=300.0)
        async with swarm(nodes=6, relays=1, clients=1, config=config) as s:
            async with trio.open_nursery() as n:
                for m in s.nodes:
                    async def announce(net=m.net) -> None:
                        await net.put_record(template())
                        await net.provide(MODEL)
                    n.start_soon(announce)
            shim = s.clients[0].net
            shim.discovery_candidates = 3
            fetches = CountingFetches(shim)
            nodes = {m.peer_id for m in s.nodes}

            found = await shim.find_providers(MODEL, fresh=True)

            stats = shim.last_discovery
            assert stats.listed == frozenset(nodes)
            assert len(found) == 3 and {p.peer_id for p in found} <= nodes
            assert stats.fetched == 3 and stats.deferred == 3
            await settle(shim, fetches, 6)
            assert {p.peer_id for p in await shim.find_providers(MODEL, fresh=True)} == nodes
            assert shim.last_discovery.fetched == 0
