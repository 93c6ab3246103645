"""Limits that existing tests did not cover (the others are listed in docs/RELIABILITY.md):
inbound streams per peer, one peer's share of a node, a chunked request body over the limit,
slowloris on the HTTP listener, and a peer flooding the DHT with provider records.
"""

from __future__ import annotations

import dataclasses

import trio
import trio.testing

import darkbloom.api.app as api_app
from darkbloom.api.client import open_infer
from darkbloom.config import P2PConfig
from darkbloom.errors import NoCapacity, StreamClosed
from darkbloom.identity import Identity
from darkbloom.inference.engine import open_engine
from darkbloom.node.serve import InferenceService, serve_inference
from darkbloom.p2p.memory import MemoryHub, open_memory_network
from darkbloom.p2p.testing import swarm
from darkbloom.wire.caps import CapabilityRecord, ModelCap
from darkbloom.wire.infer import ChoiceEnd, Delta, InferRequest

from api.fakes import FakeEngineBackend  # tests/api: an HTTP-only test, the fake says so
from api.harness import running_shim

TIMEOUT = 60
HOLD = "/darkbloom/test-hold/1.0.0"
MODEL = "tiny"
DIGEST = "sha256:" + "11" * 32
NO_END = {"0": -100, "2": -100}


async def test_inbound_streams_per_peer_are_capped_and_other_peers_still_served():
    hub = MemoryHub()
    cfg = dataclasses.replace(P2PConfig(), max_streams_per_peer=4)
    release = trio.Event()
    with trio.fail_after(TIMEOUT):
        async with open_memory_network(hub, Identity.generate(), cfg) as server, \
                open_memory_network(hub, Identity.generate()) as greedy, \
                open_memory_network(hub, Identity.generate()) as polite:

            async def hold(stream):
                await release.wait()
                await stream.write(b"done")

            server.serve(HOLD, hold)
            streams = [await greedy.open_stream(server.peer_id, HOLD) for _ in range(10)]
            await trio.testing.wait_all_tasks_blocked()
            assert server._inbound == {greedy.peer_id: 4}
            other = await polite.open_stream(server.peer_id, HOLD)  # another peer is not affected
            await trio.testing.wait_all_tasks_blocked()
            assert server._inbound[polite.peer_id] == 1
            release.set()
            answers = []
            for s in streams:
                try:
                    answers.append(await s.read())
                except StreamClosed:
                    answers.append(None)
            assert answers.count(b"done") == 4 and answers.count(None) + answers.count(b"") == 6
            assert await other.read() == b"done"
            await trio.testing.wait_all_tasks_blocked()
            assert server._inbound == {}


async def test_one_peer_cannot_take_every_slot_of_a_node(tiny_model_dir):
    """Defect 4: a peer gets at most half the node's slots + queue (here 2 of 4); the rest stay for others."""
    hub = MemoryHub()
    with trio.fail_after(TIMEOUT):
        async with open_engine([(MODEL, tiny_model_dir)], max_concurrent=2, max_queue=2, self_benchmark=False) as engine, \
                open_memory_network(hub, Identity.generate()) as node, \
                open_memory_network(hub, Identity.generate()) as greedy, \
                open_memory_network(hub, Identity.generate()) as polite:
            serve_inference(node, InferenceService(engine, digests={MODEL: DIGEST}))

            def long(rid: str) -> InferRequest:
                return InferRequest(request_id=rid, kind="chat", model=MODEL, params={
                    "messages": [{"role": "user", "content": "go"}], "max_tokens": 3000, "logit_bias": NO_END})

            calls = []
            for i in range(4):  # two running, two queued: the node is full
                try:
                    calls.append(await open_infer(greedy, node.peer_id, long(f"g{i}")))
                except NoCapacity:
                    break
            assert len(calls) == 2  # the third is refused although the node has room
            try:
                call = await open_infer(polite, node.peer_id, long("p"))
                assert isinstance(await call.receive(), (Delta, ChoiceEnd))
                await call.aclose()
            finally:
                for c in calls:
                    await c.aclose()


async def test_a_chunked_body_over_the_limit_is_413_and_the_shim_keeps_serving():
    with trio.fail_after(TIMEOUT):
        async with running_shim(FakeEngineBackend(), max_body_bytes=20_000) as url:
            host, port = url.split("//")[1].split("/")[0].split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
            await stream.send_all(head)
            chunk = b"[" + b" " * 8190 + b"]"
            reply = b""
            try:
                for _ in range(10):  # 80 KB in chunks, no Content-Length to check up front
                    await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await stream.send_all(b"0\r\n\r\n")
            except trio.BrokenResourceError:
                pass  # the shim may hang up once it has answered
            with trio.move_on_after(10):
                while b"\r\n\r\n" not in reply and (data := await stream.receive_some(65536)):
                    reply += data
            await stream.aclose()
            assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
            import openai

            async with openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0) as client:
                r = await client.chat.completions.create(model="fake-chat", messages=[{"role": "user", "content": "hi"}])
            assert r.choices[0].message.content


async def test_slowloris_connections_are_cut_and_the_shim_keeps_serving(monkeypatch):
    """Connections that never finish their headers count as idle: hypercorn closes them after the
    keep-alive timeout (75 s in serve(); 2 s here), and meanwhile real requests are served."""

    class ShortIdle(api_app.HypercornConfig):
        @property
        def keep_alive_timeout(self) -> float:
            return 2.0

        @keep_alive_timeout.setter
        def keep_alive_timeout(self, value: float) -> None:
            assert value == 75  # what serve() sets; this test shortens it

    monkeypatch.setattr(api_app, "HypercornConfig", ShortIdle)
    import openai

    with trio.fail_after(TIMEOUT):
        async with running_shim(FakeEngineBackend()) as url:
            host, port = url.split("//")[1].split("/")[0].split(":")
            slow = []
            for _ in range(200):
                s = await trio.open_tcp_stream(host, int(port))
                await s.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
                slow.append(s)
            async with openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0) as client:
                r = await client.chat.completions.create(model="fake-chat", messages=[{"role": "user", "content": "hi"}])
            assert r.choices[0].message.content
            started = trio.current_time()
            closed = 0
            with trio.fail_after(20):
                for s in slow:
                    try:
                        while await s.receive_some(4096):
                            pass
                    except trio.BrokenResourceError:
                        pass
                    closed += 1
                    await s.aclose()
            assert closed == 200
            assert trio.current_time() - started < 20


async def test_a_record_flood_is_bounded_and_the_honest_record_still_served():
    """One peer pushes 150 signed capability records for 150 sybil identities (valid), 150 forged or
    oversize ones, and 150 under keys outside our namespace to the relay: the forged, oversize and
    foreign ones are refused, the relay stays responsive, and an honest node is still discovered."""
    from darkbloom.p2p import records
    from darkbloom.p2p.keys import caps_key, peer_id_from_public_key
    from darkbloom.wire.codec import encode

    with trio.fail_after(180):
        async with swarm(nodes=1, relays=1, clients=1) as s:
            honest, relay, flooder = s.nodes[0].net, s.relays[0].net, s.clients[0].net
            await honest.put_record(CapabilityRecord(
                peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0, max_concurrent=1,
                models=(ModelCap(id="flooded-model", digest="ab" * 32, context_length=2048),)))
            await honest.provide("flooded-model")
            before = len(relay.dht.value_store.store)
            refused = accepted = 0
            now = flooder.now_ms()
            template = CapabilityRecord(peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0, region="x" * 12000)
            for i in range(150):
                sybil = Identity.generate()
                pid = peer_id_from_public_key(sybil.public_key)
                good = records.build_record(sybil, template, seq=now, now_ms=now, ttl_ms=60_000, addrs=(),
                                            reachability="public")
                forged = dataclasses.replace(good, region="y" * 12000)  # signature no longer matches
                huge = records.build_record(sybil, dataclasses.replace(template, region="z" * 20000), seq=now + 1,
                                            now_ms=now, ttl_ms=60_000, addrs=(), reachability="public")
                for key, value in ((caps_key(pid), encode(good)), (caps_key(pid), encode(forged)),
                                   (caps_key(pid), encode(huge)), (f"/other/{i}", b"x" * 100)):
                    try:
                        await relay.dht.put_value(key, value)  # what a PUT_VALUE from the flooder reaches
                        accepted += 1
                    except Exception:  # RecordRejected, or libp2p's refusal of a foreign namespace
                        refused += 1
            stored = len(relay.dht.value_store.store) - before
            assert accepted <= 150 and refused >= 450  # only the validly signed, small records got in
            assert stored <= 150
            found = await s.clients[0].net.find_providers("flooded-model", fresh=True)
            assert honest.peer_id in {p.peer_id for p in found}
            with trio.fail_after(5):  # the relay still answers a lookup promptly
                assert await flooder.get_record(honest.peer_id, fresh=True) is not None


async def test_the_relay_daemon_applies_its_configured_circuit_limits(tmp_path):
    """[relay] limits reach the circuit relay hop (py-libp2p's defaults are 4 reservations, 1 h, 1 GB)."""
    from darkbloom.config import Config, RelayConfig
    from darkbloom.relay.daemon import open_relay

    relay_cfg = RelayConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",), status_port=0, max_reservations=3,
                            max_circuits_per_peer=2, circuit_duration_s=120, circuit_max_bytes=1 << 20)
    config = Config(data_dir=str(tmp_path), relay=relay_cfg,
                    p2p=dataclasses.replace(P2PConfig(), use_bundled_bootstrap=False))
    with trio.fail_after(TIMEOUT):
        async with open_relay(config) as relay:
            limits = relay.network.hop.limits
            assert (limits.max_reservations, limits.max_circuit_conns, limits.duration, limits.data) == (
                3, 2, 120, 1 << 20)
