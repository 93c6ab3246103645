"""How the crawler reaches a network: the simulator's Kademlia, or libp2p through darkbloom.p2p.

`SimCrawlPort` speaks the simulator's FIND_NODE (keys are already in sha256 space, so probe
keys are built directly). `LibP2PCrawlPort` needs `find_node(peer_id, key, addrs=...)` from
the libp2p PeerNetwork; py-libp2p hashes FIND_NODE keys, so its probe keys are sha256
preimages landing in the wanted buckets.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from darkbloom.errors import MalformedMessage, StreamClosed
from darkbloom.p2p.api import recv_message, send_message
from darkbloom.p2p.keys import b58decode, model_cid
from darkbloom.sim.crawl import PeerAddrs, preimage_in_bucket
from darkbloom.sim.keys import KEY_BITS, content_key
from darkbloom.sim.messages import KAD_PROTOCOL, KadReply, KadRequest
from darkbloom.sim.peer import SimPeer
from darkbloom.wire.caps import CapabilityRecord

__all__ = ["LibP2PCrawlPort", "SimCrawlPort"]


def _bucket_key(peer_key: int, bucket: int, rng: random.Random) -> int:
    """A key sharing exactly `bucket` leading bits with `peer_key`."""
    top = (peer_key >> (KEY_BITS - bucket)) << (KEY_BITS - bucket) if bucket else 0
    flipped = (((peer_key >> (KEY_BITS - 1 - bucket)) & 1) ^ 1) << (KEY_BITS - 1 - bucket)
    return top | flipped | rng.getrandbits(KEY_BITS - 1 - bucket)


class SimCrawlPort:
    """Crawl a simulated network from one of its peers (a client, ideally)."""

    def __init__(self, peer: SimPeer) -> None:
        self.peer = peer

    def probe_keys(self, peer_id: str, count: int, rng: random.Random) -> list[bytes]:
        key = self.peer.dht._key_of(peer_id)
        return [_bucket_key(key, i, rng).to_bytes(32, "big") for i in range(count)]

    async def find_node(self, peer_id: str, addrs: Sequence[str], key: bytes) -> list[PeerAddrs]:
        stream = await self.peer.open_stream(peer_id, KAD_PROTOCOL, addrs=addrs)
        try:
            await send_message(stream, KadRequest(op="find_node", key=key))
            await stream.close()
            reply = await recv_message(stream, KadReply)
        except MalformedMessage as exc:
            raise StreamClosed(peer_id, f"bad reply: {exc.reason}") from exc
        if reply is None:
            raise StreamClosed(peer_id, "no reply")
        world = self.peer.world
        return [(p, world.nodes[p].net.listen_addrs if p in world.nodes and world.nodes[p].net else ()) for p in reply.closer]

    async def get_record(self, peer_id: str) -> CapabilityRecord | None:
        return await self.peer.get_record(peer_id, fresh=True)

    async def find_providers(self, model_id: str) -> list[PeerAddrs]:
        key = content_key(model_cid(model_id))
        found: dict[str, tuple[str, ...]] = {}

        def collect(_: str, reply: KadReply) -> bool:
            for e in reply.providers:
                found.setdefault(e.peer_id, e.addrs)
            return False  # every provider, not the first few

        await self.peer.dht.lookup(key, KadRequest(op="get_providers", key=key.to_bytes(32, "big")), on_reply=collect)
        return list(found.items())


class LibP2PCrawlPort:
    """Crawl the live network through a running libp2p PeerNetwork (client mode).

    Uses `network.find_node(peer_id, key, addrs=...)`, one FIND_NODE to one peer, from darkbloom.p2p.
    """

    def __init__(self, network: object) -> None:
        self.network = network
        # A crawl wants every provider's record, not the bounded sample a router is content with.
        if hasattr(network, "discovery_candidates"):
            network.discovery_candidates = 0

    def probe_keys(self, peer_id: str, count: int, rng: random.Random) -> list[bytes]:
        peer_key = hashlib.sha256(b58decode(peer_id)).digest()
        return [preimage_in_bucket(peer_key, i, rng) for i in range(count)]

    async def find_node(self, peer_id: str, addrs: Sequence[str], key: bytes) -> list[PeerAddrs]:
        return list(await self.network.find_node(peer_id, key, addrs=tuple(addrs)))  # type: ignore[attr-defined]

    async def get_record(self, peer_id: str) -> CapabilityRecord | None:
        return await self.network.get_record(peer_id, fresh=True)  # type: ignore[attr-defined]

    async def find_providers(self, model_id: str) -> list[PeerAddrs]:
        providers = await self.network.find_providers(model_id, fresh=True)  # type: ignore[attr-defined]
        return [(p.peer_id, tuple(p.addrs)) for p in providers]
