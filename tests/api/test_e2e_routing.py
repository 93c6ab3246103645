"""Routing with real engines: first-token timeout failover (libp2p), the route header (memory
network, whose hub marks routes), and no prompt or output text in any log line (libp2p)."""

from __future__ import annotations

import logging

import openai
import trio

from darkbloom.api.network import NetworkBackend
from darkbloom.api.trust.hedge import HedgePolicy
from darkbloom.api.trust.routing import TrustedRouting
from darkbloom.config import ApiConfig
from darkbloom.identity import Identity
from darkbloom.inference.catalog import model_info
from darkbloom.inference.engine import open_engine
from darkbloom.node.serve import InferenceService, serve_inference
from darkbloom.p2p.memory import MemoryHub, open_memory_network
from darkbloom.wire.caps import CapabilityRecord, ModelCap

from .harness import running_shim
from .netharness import CHAT, network

TIMEOUT = 120


def aclient(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0)


async def test_a_node_without_a_first_token_in_time_is_skipped(tiny_model_dir):
    with trio.fail_after(TIMEOUT):
        # The first node ranks first and never produces a token; the shim gives up on it after
        # first_token_timeout_s and the second node answers.
        async with network(tiny_model_dir, [{"decode_tps": 1000.0, "hold": True}, {"decode_tps": 10.0}],
                           api={"first_token_timeout_s": 2.0}) as net:
            stuck, good = net.nodes
            async with aclient(net.url) as client:
                raw = await client.chat.completions.with_raw_response.create(
                    model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            assert raw.headers["x-darkbloom-node"] == good.peer_id
            assert stuck.engine.admitted.is_set()
            served = await stuck.served_nth(1)  # the shim closed its stream: the stuck node stops too
            assert served.outcome == "cancelled"
            assert net.backend.stats[stuck.peer_id].failures == 1


async def test_route_header_follows_the_stream_route(tiny_model_dir):
    """Over the in-memory network, whose hub can mark a pair of peers as relayed."""
    hub = MemoryHub()
    info = model_info(CHAT, tiny_model_dir, "chat")
    with trio.fail_after(TIMEOUT):
        async with open_engine([(CHAT, tiny_model_dir)], self_benchmark=False) as engine, \
                open_memory_network(hub, Identity.generate()) as node, \
                open_memory_network(hub, Identity.generate()) as shim_net:
            serve_inference(node, InferenceService(engine, digests={CHAT: info.digest}))
            await node.put_record(CapabilityRecord(
                peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0, max_concurrent=4,
                models=(ModelCap(id=CHAT, digest=info.digest, context_length=info.context_length,
                                 features=info.features),)))
            await node.provide(CHAT)
            backend = NetworkBackend(shim_net, ApiConfig())
            async with running_shim(backend) as url, aclient(url) as client:
                for route in ("direct", "relayed", "hole-punched"):
                    hub.routes[frozenset((node.peer_id, shim_net.peer_id))] = route
                    raw = await client.chat.completions.with_raw_response.create(
                        model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
                    assert raw.headers["x-darkbloom-route"] == route
                    assert raw.headers["x-darkbloom-node"] == node.peer_id
                    assert raw.parse().usage.completion_tokens <= 3


async def test_no_prompt_or_output_in_logs(tiny_model_dir, caplog):
    canary = "canary-7f3e9b2d-prompt"
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(TIMEOUT):
        async with network(tiny_model_dir, [{}]) as net:
            async with aclient(net.url) as client:
                r = await client.chat.completions.create(
                    model=CHAT, messages=[{"role": "user", "content": canary}], max_tokens=8, temperature=0)
                stream = await client.chat.completions.create(
                    model=CHAT, messages=[{"role": "user", "content": canary}], max_tokens=8, stream=True)
                streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                try:
                    await client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": canary}],
                                                         temperature=99)
                except openai.BadRequestError:
                    pass
    output = r.choices[0].message.content
    assert len(output) >= 8 and len(streamed) >= 8  # long enough that a chance match means a leak
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert any(CHAT in rec.getMessage() for rec in caplog.records)  # the shim and node did log
    assert canary not in text and output not in text and streamed not in text


async def test_trusted_routing_hedges_to_a_second_node(tiny_model_dir):
    """With the trust layer and hedging on, a first node that sits on its first token is raced by a
    second one after the hedge delay; the loser's stream is closed and it stops generating."""
    trust = TrustedRouting(hedge=HedgePolicy(enabled=True, default_delay_s=0.3), max_attempts=3)
    with trio.fail_after(TIMEOUT):
        async with network(tiny_model_dir, [{"decode_tps": 1000.0, "hold": True}, {"decode_tps": 10.0}],
                           trust=trust) as net:
            slow, fast = net.nodes
            async with aclient(net.url) as client:
                raw = await client.chat.completions.with_raw_response.create(
                    model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            assert raw.headers["x-darkbloom-node"] == fast.peer_id
            assert slow.engine.admitted.is_set()  # the first attempt did reach the slow node
            assert (await slow.served_with("cancelled")).completion_tokens == 0
            now = trio.current_time()
            assert trust.book.peers[fast.peer_id].stats.success_rate(now) == 1.0
            assert trust.book.usable(slow.peer_id, now)  # a lost race is not a failure


async def test_trusted_routing_proves_features_with_canaries_first(tiny_model_dir):
    trust = TrustedRouting()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    with trio.fail_after(TIMEOUT):
        async with network(tiny_model_dir, [{}], trust=trust) as net:
            node = net.nodes[0]
            async with aclient(net.url) as client:
                r = await client.chat.completions.create(
                    model=CHAT, messages=[{"role": "user", "content": "ok?"}], max_tokens=20, logprobs=True,
                    response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
                assert r.choices[0].logprobs.content
                assert [s.request_id.startswith("canary-") for s in node.served].count(True) == 2
                plain = await client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}],
                                                             max_tokens=2)
            now = trio.current_time()
            assert trust.canaries.status(node.peer_id, "json", now) == "passed"
            assert trust.canaries.status(node.peer_id, "logprobs", now) == "passed"
            assert trust.canaries.status(node.peer_id, "tools", now) == "unknown"  # never needed
            assert plain.usage.completion_tokens <= 2
            assert len(node.served) == 4  # two canaries, then the two requests: canaries are cached
