"""A simulated peer: Darkbloom's own `NetworkCore` (records, discovery) over the sim DHT and wire.

`SimPeer` is a full `darkbloom.p2p.api.PeerNetwork`: capability records are built, signed,
validated and cached by the same code as on libp2p (darkbloom.p2p.core and records); only the
raw operations differ: providers and values travel through the simulator's Kademlia
(darkbloom.sim.dht) and streams through `SimWorld`. No task runs per peer: re-announcing is
driven by the scenario's scheduler calling `announce_once`.
"""

from __future__ import annotations

from collections.abc import Sequence

from darkbloom.errors import RecordRejected
from darkbloom.identity import Identity
from darkbloom.p2p.api import Provider
from darkbloom.p2p.core import NetworkCore
from darkbloom.p2p.keys import model_cid
from darkbloom.sim.dht import DhtNode, DhtParams
from darkbloom.sim.keys import content_key
from darkbloom.sim.messages import KAD_PROTOCOL, KadRequest, PeerEntry
from darkbloom.sim.network import SimNode, SimStream, SimWorld
from darkbloom.wire.caps import CapabilityRecord

__all__ = ["SimPeer"]


class SimPeer(NetworkCore):
    """One node's PeerNetwork inside a `SimWorld`."""

    def __init__(
        self,
        world: SimWorld,
        node: SimNode,
        identity: Identity,
        key_of,
        params: DhtParams,
        *,
        record_ttl_s: float = 600.0,
        announce_interval_s: float = 120.0,
        max_record_bytes: int = 16384,
    ) -> None:
        super().__init__(
            identity,
            record_ttl_s=record_ttl_s,
            announce_interval_s=announce_interval_s,
            max_record_bytes=max_record_bytes,
            max_streams_per_peer=64,
            providers_cache_s=0.0,
            clock=world.clock,
        )
        if self.peer_id != node.peer_id:
            raise ValueError("the node's peer id must be its identity's")
        self.world = world
        self.node = node
        node.net = self
        self.reachability = "public" if node.public else "relayed"
        self.dht = DhtNode(
            self.peer_id,
            key_of,
            params,
            server=node.public,
            is_server=world.is_dht_server,
            clock=world.clock,
            dial=self._dial,
            validate=self.validate_value,
            select=self.select_value,
            addrs=self._raw_addrs,
        )
        if node.public:  # DHT server mode: answer KAD queries (clients do not)
            self.serve(KAD_PROTOCOL, self.dht.handle)
        self.last_lookup = None  # LookupResult of the last provider lookup (for metrics)

    # --- validation (memoised: 20 servers check the same bytes) ----------------------------

    def validate_value(self, key: str, value: bytes) -> CapabilityRecord:
        """As NetworkCore's, with the signature check of identical bytes done once per world."""
        cache = self.world.verified
        record = cache.get((key, value))
        if record is None:
            record = super().validate_value(key, value)
            if len(cache) > 100_000:
                cache.clear()
            cache[(key, value)] = record
        elif self.now_ms() >= record.expires_at_ms:
            raise RecordRejected(key, "expired")
        return record

    # --- addresses and streams ------------------------------------------------------------

    @property
    def listen_addrs(self) -> tuple[str, ...]:
        return (f"/ip4/{self.node.ip}/tcp/4001/p2p/{self.peer_id}",)

    def _raw_addrs(self) -> tuple[str, ...]:
        if self.node.public:
            return self.listen_addrs
        relay = self.world.nodes.get(self.node.relay) if self.node.relay else None
        if relay is None:
            return ()
        return (f"/ip4/{relay.ip}/tcp/4001/p2p/{relay.peer_id}/p2p-circuit/p2p/{self.peer_id}",)

    @property
    def served(self) -> frozenset[str]:
        return frozenset(self._handlers)

    def peers(self) -> list[str]:
        return sorted(
            b if a == self.peer_id else a
            for a, b in self.world._connected
            if self.peer_id in (a, b) and self.world.nodes[b if a == self.peer_id else a].alive
        )

    async def _dial(self, peer_id: str, protocol: str) -> SimStream:
        return await self.world.dial(self.peer_id, peer_id, protocol)

    async def open_stream(self, peer_id: str, protocol: str, *, addrs: Sequence[str] = (),
                          first: bytes = b"") -> SimStream:
        stream = await self.world.dial(self.peer_id, peer_id, protocol)
        if first:
            await stream.write(first)
        return stream

    # --- raw DHT operations (NetworkCore) ---------------------------------------------------

    def _servers(self) -> dict[str, DhtNode]:
        return self.world.warm_dhts

    async def _raw_provide(self, key: str) -> None:
        if self.world.warm_dhts:  # warm start: as if announced before the scenario began
            k = content_key(key)
            self.dht.store_sync(k, KadRequest(op="add_provider", key=k.to_bytes(32, "big"), provider=PeerEntry(peer_id=self.peer_id, addrs=self._raw_addrs())), self._servers())
            return
        await self.dht.provide(content_key(key))

    async def _raw_find_providers(self, key: str, fresh: bool) -> list[tuple[str, tuple[str, ...]]]:
        found, self.last_lookup = await self.dht.find_providers(content_key(key))
        return found

    async def provider_candidates(self, model_id: str, rng, limit: int) -> list[Provider]:
        """What a shim should do with a popular model: up to `limit` random providers, each
        with a valid record. (`find_providers` fetches a record for every provider found.)"""
        raw = await self._raw_find_providers(model_cid(model_id), True)
        rng.shuffle(raw)
        out: list[Provider] = []
        for peer_id, addrs in raw:
            if len(out) >= limit:
                break
            if peer_id == self.peer_id:
                continue
            record = await self.get_record(peer_id, fresh=True)
            if record is None or record.model(model_id) is None:
                continue
            hint = "relayed" if record.reachability == "relayed" else "direct"
            out.append(Provider(peer_id=peer_id, addrs=tuple(record.addrs) or addrs, record=record, route_hint=hint))
        return out

    async def _raw_put_value(self, key: str, value: bytes) -> None:
        if self.world.warm_dhts:
            k = content_key(key)
            self.dht.store_sync(k, KadRequest(op="put_value", key=k.to_bytes(32, "big"), record_key=key, value=value), self._servers())
            return
        await self.dht.put_value(key, content_key(key), value)

    async def _raw_get_value(self, key: str, fresh: bool) -> bytes | None:
        return await self.dht.get_value(key, content_key(key))
