"""Kademlia DHT as Darkbloom uses it: our record validator, server-only routing, fresh lookups.

Wraps py-libp2p 0.8.1's KadDHT with workarounds:
- defect 8: `find_providers` and `get_value` answer from the local store once anything is
  cached; `fresh_providers` / `fresh_value` move the local entries aside so the query goes
  to the network (a DHT server keeps what peers stored with it);
- defect 9: a server adds any peer that opens a KAD stream to its routing table, clients
  and relayed peers included; `ServerOnlyRoutingTable` admits only peers that identify as
  KAD servers and have a direct (non-circuit) address, so relayed peers stay out of DHT
  storage;
- defect 11 (found here): lookups fall back to every connected and every peerstore peer
  when the routing table holds fewer than 5 peers, opening KAD streams to clients and to
  dead peers (10 s each); and a server drops FIND_NODE for keys longer than 50 bytes that
  are not multihashes, which all `/darkbloom/caps/<peer-id>` keys are.
  `ServerPeerRouting` starts from the routing table only (or the trusted bootstrap peers)
  and looks up long keys by their sha2-256 multihash.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import trio
from libp2p.bitswap.cid import parse_cid
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.peer_routing import PeerRouting
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.kad_dht.routing_table import RoutingTable
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.validator import NamespacedValidator, Validator

from darkbloom.errors import RecordRejected

__all__ = ["CapsValidator", "DarkbloomDHT", "DHTMode", "ServerOnlyRoutingTable", "multihash_of"]

log = logging.getLogger(__name__)

IDENTIFY_WAIT_S = 3.0
PEER_QUERY_TIMEOUT_S = 3.0  # one FIND_NODE; 0.8.1 waits 10 s
LOOKUP_ALPHA = 3
LOOKUP_MAX_ROUNDS = 10


def multihash_of(cid_text: str) -> bytes:
    return parse_cid(cid_text).multihash


class CapsValidator(Validator):
    """libp2p Validator calling our pure record rules (through the network's clock)."""

    def __init__(self, validate: Callable[[str, bytes], object], select: Callable[[str, list[bytes]], int]) -> None:
        self._validate = validate
        self._select = select

    def validate(self, key: str, value: bytes) -> None:
        self._validate(key, value)  # raises RecordRejected

    def select(self, key: str, values: list[bytes]) -> int:
        return self._select(key, values)


def _is_circuit(addr: object) -> bool:
    return "/p2p-circuit" in str(addr)


class ServerOnlyRoutingTable(RoutingTable):
    """Admit only KAD servers with a direct address (0.8.1 defect 9 workaround)."""

    trusted: set[ID]

    async def add_peer(self, peer_obj: PeerInfo | ID, *, skip_server_mode_check: bool = False) -> bool:
        peer_id = peer_obj.peer_id if isinstance(peer_obj, PeerInfo) else peer_obj
        if not await self._is_server(peer_id):
            log.debug("routing table: not adding %s (client, relayed or unidentified)", peer_id)
            return False
        return await super().add_peer(peer_obj, skip_server_mode_check=True)

    async def _is_server(self, peer_id: ID) -> bool:
        store = self.host.get_peerstore()
        try:
            addrs = store.addrs(peer_id)
        except Exception:  # PeerStoreError: unknown peer
            addrs = []
        if not any(not _is_circuit(a) for a in addrs):
            return False
        if peer_id in getattr(self, "trusted", set()):
            return True
        protocols = _protocols(store, peer_id)
        if not protocols and self.host.get_network().get_connections(peer_id):
            # Identify has not finished yet: run it now rather than guess.
            with trio.move_on_after(IDENTIFY_WAIT_S):
                await self.host._identify_peer(peer_id, reason="darkbloom-routing")  # type: ignore[attr-defined]
            protocols = _protocols(store, peer_id)
        return str(KAD_PROTOCOL_ID) in protocols


def _protocols(store: object, peer_id: ID) -> list[str]:
    try:
        return [str(p) for p in (store.get_protocols(peer_id) or [])]  # type: ignore[attr-defined]
    except Exception:  # PeerStoreError: unknown peer
        return []


def lookup_key(key: bytes) -> bytes:
    """Keys a 0.8.1 server accepts in FIND_NODE: long non-multihash keys become sha2-256 multihashes."""
    if len(key) <= 50:
        return key
    try:
        import multihash

        multihash.decode(key)
        return key
    except Exception:  # not a multihash
        return bytes([0x12, 0x20]) + hashlib.sha256(key).digest()


class ServerPeerRouting(PeerRouting):
    """Iterative lookup over DHT servers only (0.8.1 defect 11 workaround)."""

    trusted: Callable[[], list[ID]]

    async def find_closest_peers_network(self, target_key: bytes, count: int = 20) -> list[ID]:
        key = lookup_key(target_key)
        local = self.host.get_id()
        closest = self.routing_table.find_local_closest_peers(key, count)
        if not closest:
            closest = [p for p in self.trusted() if self.host.get_network().get_connections(p)]
        queried: set[ID] = set()
        for _ in range(LOOKUP_MAX_ROUNDS):
            batch = [p for p in closest if p not in queried and p != local][:LOOKUP_ALPHA]
            if not batch:
                break
            learned: list[ID] = []

            async def ask(peer: ID) -> None:
                with trio.move_on_after(PEER_QUERY_TIMEOUT_S):
                    learned.extend(await self._query_peer_for_closest(peer, key))

            async with trio.open_nursery() as nursery:
                for peer in batch:
                    queried.add(peer)
                    nursery.start_soon(ask, peer)
            servers = [p for p in dict.fromkeys(learned) if p != local]  # servers list servers only
            merged = sort_peer_ids_by_distance(key, list(dict.fromkeys(closest + servers)))[:count]
            if merged == closest:
                break
            closest = merged
        return closest


class DarkbloomDHT(KadDHT):
    """KadDHT with our validator, strict namespaces and the server-only routing table."""

    def __init__(self, host: object, mode: DHTMode, validator: CapsValidator) -> None:
        namespaced = NamespacedValidator({"darkbloom": validator}, strict_validation=True)
        super().__init__(host, mode, validator=namespaced, validator_changed=False, strict_validation=True)  # type: ignore[arg-type]
        table = ServerOnlyRoutingTable(self.local_peer_id, host)  # type: ignore[arg-type]
        table.trusted = set()
        self.routing_table = table
        routing = ServerPeerRouting(host, table)  # type: ignore[arg-type]
        routing.trusted = lambda: list(table.trusted)
        self.peer_routing = routing
        self.provider_store.peer_routing = routing

    def trust(self, peer_id: ID) -> None:
        """Bootstrap relays: admitted before identify completes."""
        self.routing_table.trusted.add(peer_id)  # type: ignore[attr-defined]

    async def fresh_providers(self, cid_text: str, *, keep_local: bool, count: int = 64) -> list[PeerInfo]:
        """Providers from a network query, plus (on servers) what peers stored here."""
        key = multihash_of(cid_text)
        store = self.provider_store
        local = store.providers.pop(key, None)  # defect 8: force the network query
        try:
            found = await store.find_providers(key, count)
        finally:
            if local and keep_local:
                entries = store.providers.setdefault(key, {})
                for pid, rec in local.items():
                    entries.setdefault(pid, rec)
        if keep_local and local:
            found = found + [rec.provider_info for rec in local.values() if not rec.is_expired()]
        return found

    async def fresh_value(self, key: str, *, keep_local: bool) -> bytes | None:
        """The best valid value from the network (local copy used only on servers)."""
        key_bytes = key.encode()
        local = self.value_store.get(key_bytes)
        if local is not None and not keep_local:
            self.value_store.remove(key_bytes)  # defect 8: get_value answers from cache
        value = await self.get_value(key)
        if value is None and local is not None and keep_local:
            return local.value
        return value
