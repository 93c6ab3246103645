"""Routing under churn (defect 2, shim half): the last good provider list when lookups find
nothing, a clean 503 when that list holds only dead peers, and a fresh record for a peer that
restarted at another address.

Memory network (the hub is the DHT: clearing its provider entries is a lookup finding
nothing while the node is alive), a real engine on the tiny model, the shim's HTTP app and
the official openai SDK.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import asynccontextmanager

import openai
import pytest
import trio
import trio.testing

from darkbloom.api.network import NetworkBackend
from darkbloom.config import ApiConfig, P2PConfig
from darkbloom.errors import PeerUnreachable
from darkbloom.identity import Identity
from darkbloom.inference.catalog import model_info
from darkbloom.inference.engine import open_engine
from darkbloom.node.serve import InferenceService, serve_inference
from darkbloom.p2p.memory import MemoryHub, MemoryNetwork, open_memory_network
from darkbloom.wire.caps import CapabilityRecord, ModelCap

from .harness import running_shim

CHAT = "tiny-chat"
TIMEOUT = 120


def aclient(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0)


async def ask(client: openai.AsyncOpenAI):
    return await client.chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=3)


async def announce(net, info) -> None:
    await net.put_record(CapabilityRecord(
        peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0, max_concurrent=4,
        models=(ModelCap(id=CHAT, digest=info.digest, context_length=info.context_length, features=info.features),)))
    await net.provide(CHAT)


async def test_lookups_finding_nothing_route_by_the_last_good_list(tiny_model_dir):
    hub = MemoryHub()
    info = model_info(CHAT, tiny_model_dir, "chat")
    with trio.fail_after(TIMEOUT):
        async with open_engine([(CHAT, tiny_model_dir)], self_benchmark=False) as engine, \
                open_memory_network(hub, Identity.generate()) as node, \
                open_memory_network(hub, Identity.generate()) as shim_net:
            serve_inference(node, InferenceService(engine, digests={CHAT: info.digest}))
            await announce(node, info)
            backend = NetworkBackend(shim_net, ApiConfig(), known_models=[CHAT])
            async with running_shim(backend) as url, aclient(url) as client:
                assert (await ask(client)).headers["x-darkbloom-node"] == node.peer_id
                # The DHT servers holding the provider entries are gone; the node is alive.
                hub.providers.clear()
                assert await shim_net.find_providers(CHAT, fresh=True) == []
                for _ in range(3):
                    backend._cache.clear()  # every request looks the providers up afresh
                    raw = await ask(client)
                    assert raw.headers["x-darkbloom-node"] == node.peer_id
                    assert raw.parse().choices[0].finish_reason in ("stop", "length")


async def test_a_dead_only_fallback_answers_a_clean_503(tiny_model_dir):
    hub = MemoryHub()
    info = model_info(CHAT, tiny_model_dir, "chat")
    with trio.fail_after(TIMEOUT):
        async with open_engine([(CHAT, tiny_model_dir)], self_benchmark=False) as engine, \
                open_memory_network(hub, Identity.generate()) as shim_net:
            backend = NetworkBackend(shim_net, ApiConfig(max_attempts=3), known_models=[CHAT])
            async with running_shim(backend) as url, aclient(url) as client:
                async with open_memory_network(hub, Identity.generate()) as node:
                    serve_inference(node, InferenceService(engine, digests={CHAT: info.digest}))
                    await announce(node, info)
                    assert (await ask(client)).headers["x-darkbloom-node"] == node.peer_id
                hub.providers.clear()  # the node left and nobody announces the model any more
                codes = []
                for _ in range(5):  # unreachable, then circuit-broken (each request a half-open probe): clean 503s
                    backend._cache.clear()
                    with pytest.raises(openai.APIStatusError) as err:
                        await ask(client)
                    assert err.value.status_code == 503
                    assert isinstance(err.value.body, dict) and err.value.body.get("message")
                    codes.append(err.value.body.get("code"))
                assert set(codes) <= {"providers_failed", "no_provider"}, codes
                assert backend.stats[node.peer_id].failures >= 5  # every request went to the fallback's peer
                assert backend.stats[node.peer_id].open_until > trio.current_time()  # and its breaker is open


async def test_a_node_back_after_every_breaker_opened_is_probed_and_used(tiny_model_dir):
    """A storm of failures opened every provider's breaker for long; the node is back: the next
    request goes to it as a half-open probe instead of answering no_provider until the breaker closes."""
    from darkbloom.api import router

    hub = MemoryHub()
    info = model_info(CHAT, tiny_model_dir, "chat")
    with trio.fail_after(TIMEOUT):
        async with open_engine([(CHAT, tiny_model_dir)], self_benchmark=False) as engine, \
                open_memory_network(hub, Identity.generate()) as node, \
                open_memory_network(hub, Identity.generate()) as shim_net:
            serve_inference(node, InferenceService(engine, digests={CHAT: info.digest}))
            await announce(node, info)
            backend = NetworkBackend(shim_net, ApiConfig(), known_models=[CHAT])
            stats = backend._stats(node.peer_id)
            for _ in range(10):  # ten requests failed on it at once while it was down
                router.record_failure(stats, trio.current_time())
            assert stats.open_until - trio.current_time() >= 60
            async with running_shim(backend) as url, aclient(url) as client:
                raw = await ask(client)
                assert raw.headers["x-darkbloom-node"] == node.peer_id
                assert raw.parse().choices[0].finish_reason in ("stop", "length")
            assert not router.breaker_open(stats, trio.current_time())  # the probe's success closed it


class AddressedMemoryNetwork(MemoryNetwork):
    """A memory network whose peers are reached only at the address they listen on now
    (`port`), like a TCP node that restarted on another port."""

    def __init__(self, *args, port: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.port = port

    @property
    def listen_addrs(self) -> tuple[str, ...]:
        return (f"/memory/{self.port}/p2p/{self.peer_id}",)

    async def open_stream(self, peer_id: str, protocol: str, *, addrs: Sequence[str] = (), first: bytes = b""):
        target = self.hub.networks.get(peer_id)
        if addrs and target is not None and not set(addrs) & set(target.listen_addrs):
            await trio.lowlevel.checkpoint()
            raise PeerUnreachable(peer_id, "nothing listens at the dialled address")
        return await super().open_stream(peer_id, protocol, addrs=addrs, first=first)


@asynccontextmanager
async def addressed(hub: MemoryHub, identity: Identity, port: int):
    net = AddressedMemoryNetwork(hub, identity, P2PConfig(), port=port)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        try:
            yield net
        finally:
            nursery.cancel_scope.cancel()


async def test_a_node_restarted_at_another_address_is_redialled_there(tiny_model_dir):
    hub = MemoryHub()
    info = model_info(CHAT, tiny_model_dir, "chat")
    node_identity = Identity.generate()
    with trio.fail_after(TIMEOUT):
        async with open_engine([(CHAT, tiny_model_dir)], self_benchmark=False) as engine, \
                addressed(hub, Identity.generate(), port=1) as shim_net:
            service = InferenceService(engine, digests={CHAT: info.digest})
            backend = NetworkBackend(shim_net, ApiConfig(max_attempts=3), known_models=[CHAT])
            async with running_shim(backend) as url, aclient(url) as client:
                async with addressed(hub, node_identity, port=4001) as node:
                    serve_inference(node, service)
                    await announce(node, info)
                    assert (await ask(client)).headers["x-darkbloom-node"] == node.peer_id
                old = (await shim_net.get_record(node.peer_id)).addrs
                async with addressed(hub, node_identity, port=4002) as node:  # same identity, new port
                    serve_inference(node, service)
                    await announce(node, info)
                    assert (await shim_net.get_record(node.peer_id)).addrs == old  # the shim's cache is stale
                    raw = await ask(client)
                    assert raw.headers["x-darkbloom-node"] == node.peer_id
                    assert raw.parse().choices[0].finish_reason in ("stop", "length")
                    assert (await shim_net.get_record(node.peer_id)).addrs == node.listen_addrs


async def test_requests_wait_for_a_running_probe_instead_of_failing_at_once(tiny_model_dir):
    """Every breaker open, the only provider being probed: a second request waits for the probe's
    verdict (bounded) and is served when it succeeds, instead of an instant no_provider."""
    from darkbloom.api import router

    from .netharness import HoldingEngine

    hub = MemoryHub()
    info = model_info(CHAT, tiny_model_dir, "chat")
    with trio.fail_after(TIMEOUT):
        async with open_engine([(CHAT, tiny_model_dir)], self_benchmark=False) as engine, \
                open_memory_network(hub, Identity.generate()) as node, \
                open_memory_network(hub, Identity.generate()) as shim_net:
            held = HoldingEngine(engine)  # the probe's answer waits after Admitted until released
            serve_inference(node, InferenceService(held, digests={CHAT: info.digest}, max_per_peer=4))
            await announce(node, info)
            backend = NetworkBackend(shim_net, ApiConfig(), known_models=[CHAT])
            for _ in range(5):
                router.record_failure(backend._stats(node.peer_id), trio.current_time())
            served: list[str] = []
            async with running_shim(backend) as url, aclient(url) as client:
                async def one() -> None:
                    served.append((await ask(client)).headers["x-darkbloom-node"])

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(one)
                    await held.admitted.wait()  # the probe is in flight
                    assert backend._probing == {node.peer_id}
                    nursery.start_soon(one)
                    await trio.testing.wait_all_tasks_blocked()  # the second request is waiting, not answered
                    assert served == []
                    held.release.set()
            assert served == [node.peer_id, node.peer_id]
