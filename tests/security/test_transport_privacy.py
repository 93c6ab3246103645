"""Privacy on the wire, over real libp2p hosts on 127.0.0.1.

1. On the relayed path, every byte the relay forwards (a tap on its circuit forwarder) is
   free of the prompt canary and of the answer, while the same canary provably went through
   that circuit (a tap on the shim's stream writes sees it in the clear before Noise).
2. A peer offering only plaintext or only SECIO gets no connection to a Darkbloom peer, in
   either direction; a Noise peer built the same way does (so the refusal is the security
   protocol, not the test's host).
"""

from __future__ import annotations

import openai
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secio.transport import ID as SECIO_PROTOCOL_ID
from libp2p.security.secio.transport import Transport as SecioTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr

import darkbloom.p2p.network as p2p_network
import darkbloom.p2p.relay as p2p_relay
from darkbloom.api.network import NetworkBackend
from darkbloom.config import ApiConfig
from darkbloom.errors import PeerUnreachable
from darkbloom.inference.catalog import model_info
from darkbloom.inference.engine import open_engine
from darkbloom.node.serve import InferenceService, serve_inference
from darkbloom.p2p.testing import swarm
from darkbloom.wire.caps import CapabilityRecord, ModelCap
from darkbloom.wire.infer import PROTOCOL_VERSION

from api.harness import running_shim  # tests/api (pytest puts tests/ on sys.path)

TIMEOUT = 90
CHAT = "tiny-chat"
CANARY = "canary-relay-9c41e07d-secret-prompt"
ECHO = "/darkbloom/test-echo/1.0.0"


async def test_relay_forwards_only_ciphertext(tiny_model_dir, monkeypatch):
    forwarded: list[bytes] = []
    sent_by_shim: list[bytes] = []
    requests: list[bytes] = []  # the shim's requests, which ride with the stream open
    real_write_all = p2p_relay.write_all
    real_stream_write = p2p_network.LibP2PStream.write

    async def tapped_write_all(raw, data):  # the relay's forwarder, both directions of every circuit
        forwarded.append(bytes(data))
        await real_write_all(raw, data)

    async def tapped_stream_write(self, data):  # application bytes before Noise, on every peer
        if self.protocol.startswith("/darkbloom/infer/"):
            sent_by_shim.append(bytes(data))
        await real_stream_write(self, data)

    real_open = p2p_network.LibP2PNetwork.open_stream

    async def tapped_open(self, peer_id, protocol, *, addrs=(), first=b""):  # the request rides with the open
        if protocol.startswith("/darkbloom/infer/") and first:
            sent_by_shim.append(bytes(first))
            requests.append(bytes(first))
        return await real_open(self, peer_id, protocol, addrs=addrs, first=first)

    monkeypatch.setattr(p2p_relay, "write_all", tapped_write_all)
    monkeypatch.setattr(p2p_network.LibP2PStream, "write", tapped_stream_write)
    monkeypatch.setattr(p2p_network.LibP2PNetwork, "open_stream", tapped_open)
    info = model_info(CHAT, tiny_model_dir, "chat")
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=0, relays=1, clients=0) as s, \
                open_engine([(CHAT, tiny_model_dir)], self_benchmark=False) as engine:
            node = await s.add("node", reachability="private")
            await node.net.relay_ready.wait()
            serve_inference(node.net, InferenceService(engine, digests={CHAT: info.digest}))
            await node.net.put_record(CapabilityRecord(
                peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0, max_concurrent=4, protocol_version=PROTOCOL_VERSION,
                models=(ModelCap(id=CHAT, digest=info.digest, context_length=info.context_length,
                                 features=info.features),)))
            await node.net.provide(CHAT)
            shim = await s.add("shim")
            backend = NetworkBackend(shim.net, ApiConfig(), known_models={CHAT})
            async with running_shim(backend) as url, \
                    openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0) as client:
                raw = await client.chat.completions.with_raw_response.create(
                    model=CHAT, max_tokens=24, temperature=0,
                    messages=[{"role": "user", "content": f"Repeat after me: {CANARY}"}])
                answer = raw.parse().choices[0].message.content
                stream = await client.chat.completions.create(
                    model=CHAT, max_tokens=24, stream=True, messages=[{"role": "user", "content": CANARY * 3}])
                streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert raw.headers["x-darkbloom-route"] == "relayed"
    wire = b"".join(forwarded)
    clear = b"".join(sent_by_shim)
    assert CANARY.encode() in clear  # the prompt really crossed this circuit, in frames the shim wrote
    # The tap saw the circuit's traffic: both requests crossed the relay before their answers came
    # back, so it forwarded at least their bytes (plus Noise and Yamux overhead). Not all of
    # `clear`: a write returns once queued, and the last frames of a finished stream may still be
    # queued when the swarm is torn down (seen once in CI: 7221 bytes forwarded of 7227 written).
    assert len(requests) == 2 and CANARY.encode() in b"".join(requests)
    assert len(wire) > len(b"".join(requests))
    assert CANARY.encode() not in wire
    assert CANARY[:12].encode() not in wire  # not even a fragment split across frames
    assert len(answer) >= 8 and len(streamed) >= 8
    assert answer.encode() not in wire and streamed.encode() not in wire


def _raw_host(security: str):
    """A plain py-libp2p host offering exactly one security protocol."""
    kp = create_new_key_pair()
    sec = {
        "plaintext": {PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)},
        "secio": {SECIO_PROTOCOL_ID: SecioTransport(kp)},
        "noise": {NOISE_PROTOCOL_ID: NoiseTransport(kp, noise_privkey=create_x25519().private_key)},
    }[security]
    return new_host(key_pair=kp, sec_opt=sec, muxer_opt={YAMUX_PROTOCOL_ID: Yamux})


def _addr_of(net) -> tuple[ID, list[Multiaddr]]:
    text = net.listen_addrs[0]
    return ID.from_base58(net.peer_id), [Multiaddr(text[: text.index("/p2p/")])]


@pytest.mark.parametrize("security", ["plaintext", "secio", "noise"])
async def test_only_noise_peers_get_a_connection(security):
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=1, clients=0) as s:
            target = s.nodes[0].net
            target.serve(ECHO, _echo)
            host = _raw_host(security)
            async with host.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                pid, addrs = _addr_of(target)
                # outbound from the foreign peer to a Darkbloom node
                inbound_ok = True
                try:
                    with trio.fail_after(15):
                        await host.connect(PeerInfo(pid, addrs))
                        stream = await host.new_stream(pid, [ECHO])
                        await stream.write(b"hello")
                        assert await stream.read(5) == b"hello"
                except Exception:  # refused: negotiation fails in one of several libp2p exception types
                    inbound_ok = False
                # outbound from a Darkbloom peer to the foreign one
                foreign = str(host.get_id())
                listen = [f"{a}/p2p/{foreign}" for a in host.get_addrs()]
                outbound_ok = True
                try:
                    with trio.fail_after(15):
                        await s.relays[0].net.connect(foreign, [a.split("/p2p/")[0] + f"/p2p/{foreign}" for a in listen])
                except (PeerUnreachable, trio.TooSlowError):
                    outbound_ok = False
                connected_to_foreign = foreign in target.peers() or foreign in s.relays[0].net.peers()
    if security == "noise":
        assert inbound_ok and outbound_ok  # the control: the same host with Noise is accepted
    else:
        assert not inbound_ok and not outbound_ok
        assert not connected_to_foreign


async def _echo(stream):
    while data := await stream.read():
        await stream.write(data)
