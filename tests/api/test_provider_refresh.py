"""Provider lookups off the request path: with `NetworkBackend.run` running, a provider list past
CANDIDATES_TTL_S routes at once while one background lookup refreshes it; without it (or past
STALE_MAX_S) the request waits for the lookup, as before.

Memory network with a real signed capability record and provider entry; the lookup is held
on a trio.Event so the test can see who waits for it.
"""

from __future__ import annotations

import trio
import trio.testing

from darkbloom.api.network import CANDIDATES_TTL_S, STALE_MAX_S, NetworkBackend
from darkbloom.config import ApiConfig
from darkbloom.identity import Identity
from darkbloom.p2p.memory import MemoryHub, open_memory_network
from darkbloom.wire.caps import CapabilityRecord, ModelCap

CHAT = "tiny-chat"
TIMEOUT = 30


class HeldLookups:
    """Wraps a network's find_providers: counts calls, each waits for `release`."""

    def __init__(self, net) -> None:
        self.inner = net.find_providers
        self.calls = 0
        self.release = trio.Event()
        net.find_providers = self

    async def __call__(self, model_id: str, *, fresh: bool = False):
        self.calls += 1
        await self.release.wait()
        return await self.inner(model_id, fresh=fresh)


async def announce(net) -> None:
    await net.put_record(CapabilityRecord(
        peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0, max_concurrent=4,
        models=(ModelCap(id=CHAT, digest="0" * 64, context_length=2048, features=("chat",)),)))
    await net.provide(CHAT)


def age(backend: NetworkBackend, seconds: float) -> None:
    """Make the cached provider list `seconds` old."""
    stamp, cands = backend._cache[CHAT]
    backend._cache[CHAT] = (trio.current_time() - seconds, cands)


async def test_a_stale_list_routes_at_once_while_one_background_lookup_refreshes_it():
    hub = MemoryHub()
    with trio.fail_after(TIMEOUT):
        async with open_memory_network(hub, Identity.generate()) as node, \
                open_memory_network(hub, Identity.generate()) as shim_net, trio.open_nursery() as nursery:
            await announce(node)
            backend = NetworkBackend(shim_net, ApiConfig(), known_models=[CHAT])
            await nursery.start(backend.run)
            assert [c.peer_id for c in await backend._candidates(CHAT)] == [node.peer_id]  # the first lookup
            held = HeldLookups(shim_net)
            age(backend, CANDIDATES_TTL_S + 1)
            for _ in range(3):  # the lookup is held, yet every request gets the (stale) list at once
                assert [c.peer_id for c in await backend._candidates(CHAT)] == [node.peer_id]
            await trio.testing.wait_all_tasks_blocked()
            assert held.calls == 1  # one background lookup for all of them
            held.release.set()
            await trio.testing.wait_all_tasks_blocked()
            assert not backend._refreshing
            stamp, cands = backend._cache[CHAT]
            assert trio.current_time() - stamp < CANDIDATES_TTL_S  # refreshed
            assert [c.peer_id for c in cands] == [node.peer_id]
            nursery.cancel_scope.cancel()


async def waits_for_lookup(backend: NetworkBackend, held: HeldLookups) -> bool:
    """Whether `_candidates` waited for the held lookup (it does not return before the release)."""
    done = trio.Event()

    async def ask() -> None:
        await backend._candidates(CHAT)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        waited = not done.is_set()
        held.release.set()
    return waited


async def test_without_run_or_past_stale_max_a_request_waits_for_the_lookup():
    hub = MemoryHub()
    with trio.fail_after(TIMEOUT):
        async with open_memory_network(hub, Identity.generate()) as node, \
                open_memory_network(hub, Identity.generate()) as shim_net:
            await announce(node)
            backend = NetworkBackend(shim_net, ApiConfig(), known_models=[CHAT])
            await backend._candidates(CHAT)
            held = HeldLookups(shim_net)
            age(backend, CANDIDATES_TTL_S + 1)
            assert await waits_for_lookup(backend, held)  # no background: the request looks up itself
            assert held.calls == 1
            async with trio.open_nursery() as nursery:
                await nursery.start(backend.run)
                held.release = trio.Event()
                age(backend, STALE_MAX_S + 1)
                assert await waits_for_lookup(backend, held)  # too old to route by
                assert held.calls == 2
                nursery.cancel_scope.cancel()
            assert backend._nursery is None
