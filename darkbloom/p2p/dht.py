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
  and looks up long keys by their sha2-256 multihash;
- defect 13 (found here): a server handles at most 12 inbound KAD streams at once and resets
  the rest, and a handler waits forever for the next message on a stream its client never
  closes (py-libp2p's own client cancels its close when a query times out). A few timed-out
  queries leave a server, the single bootstrap relay included, resetting every KAD stream
  for good: at 50 hosts every routing table held only the relay and lookups found nothing.
  `DarkbloomDHT.handle_stream` waits briefly for a slot, caps concurrent streams per peer,
  and resets a stream idle for `INBOUND_IDLE_S`;
- defect 14 (found here): a server keeps at most 20 providers per key (ignoring newcomers),
  and `find_providers` stops at `count` entries counting duplicates, so a model with more
  than 20 providers is only partly found. `BoundedProviderStore` keeps up to
  `PROVIDERS_PER_KEY` (replacing the stalest), and `fresh_providers` asks the closest
  servers and the trusted bootstrap servers and returns each provider once;
- defect 19 (found here): `get_value` with its default quorum of 0 never stops early: it asks
  every server it hears of (the whole network, up to 10 at a time, 10 s each) and then stores
  the value at those that lacked it. A shim checks up to 16 provider records at once, so at 50
  hosts one discovery sent thousands of KAD RPCs, each record took 15-57 s and requests ran
  out of their 60 s (docs/RESEARCH.md). `fresh_value` asks with a quorum of `VALUE_QUORUM`
  valid copies (the best of them wins, as before), which is also what the simulator models;
- defect 7 of docs/RELIABILITY.md: the value store holds 50,000 records and evicts the
  oldest when full, so a flood of validly signed sybil records evicts honest ones.
  `QuotaValueStore` holds `VALUE_STORE_CAP` records, at most `VALUES_PER_PEER` new keys per
  sending peer, and when full evicts from the peer holding the most.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable

import trio
from libp2p.bitswap.cid import parse_cid
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.peer_routing import PeerRouting
from libp2p.kad_dht.provider_store import ProviderRecord, ProviderStore
from libp2p.kad_dht.value_store import ValueStore
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.kad_dht.routing_table import RoutingTable
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.validator import NamespacedValidator, Validator

from darkbloom.errors import RecordRejected

__all__ = [
    "BoundedProviderStore", "CapsValidator", "DarkbloomDHT", "DHTMode", "QuotaValueStore",
    "ServerOnlyRoutingTable", "multihash_of",
]

log = logging.getLogger(__name__)

IDENTIFY_WAIT_S = 3.0
PEER_QUERY_TIMEOUT_S = 3.0  # one FIND_NODE; 0.8.1 waits 10 s
LOOKUP_ALPHA = 3
LOOKUP_MAX_ROUNDS = 10

INBOUND_STREAMS = 32  # concurrent inbound KAD streams per server (0.8.1: 12, the rest reset)
INBOUND_PER_PEER = 12  # of which one peer may hold (a shim checks 16 provider records at once)
INBOUND_WAIT_S = 2.0  # a stream waits this long for a slot before it is reset
INBOUND_IDLE_S = 5.0  # a KAD stream with no message for this long is reset (0.8.1: never)
PROVIDERS_PER_KEY = 256  # provider entries a server keeps per key (0.8.1: 20)
PROVIDER_QUERY_TIMEOUT_S = 3.0  # one GET_PROVIDERS
PROVIDER_QUERY_CONCURRENCY = 8
PROVIDER_RATE_MAX = 64  # ADD_PROVIDER per peer per 10 s (0.8.1: 10)
VALUE_QUORUM = 2  # get_value stops after this many valid copies (0.8.1 default 0: asks every server)
VALUE_STORE_CAP = 4096  # records a server keeps (0.8.1: 50,000 of up to 1 MiB)
VALUES_PER_PEER = 32  # new keys one sending peer may place on a server

_SENDER: contextvars.ContextVar[ID | None] = contextvars.ContextVar("darkbloom_dht_sender", default=None)


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
        connected = bool(self.host.get_network().get_connections(peer_id))
        if not protocols and not connected:
            # Learned from a server's FIND_NODE answer (servers list servers only) and not
            # met yet: admit it, as Kademlia does; a failed RPC removes it again. Refusing
            # these left every table holding only the bootstrap relay.
            return True
        if not protocols:
            # Connected but identify has not finished yet: run it now rather than guess.
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
        closest, _depth, _rounds = await self.traced_lookup(target_key, count)
        return closest

    async def traced_lookup(self, target_key: bytes, count: int = 20) -> tuple[list[ID], dict[ID, int], int]:
        """The k closest servers, each peer's depth (0: from our table; d+1: learned from a
        depth-d peer's answer, i.e. sequential RPCs to learn it) and the rounds run."""
        key = lookup_key(target_key)
        local = self.host.get_id()
        closest = self.routing_table.find_local_closest_peers(key, count)
        if not closest:
            closest = [p for p in self.trusted() if self.host.get_network().get_connections(p)]
        depth = {p: 0 for p in closest}
        queried: set[ID] = set()
        rounds = 0
        for _ in range(LOOKUP_MAX_ROUNDS):
            batch = [p for p in closest if p not in queried and p != local][:LOOKUP_ALPHA]
            if not batch:
                break
            rounds += 1
            learned: list[tuple[ID, ID]] = []

            async def ask(peer: ID) -> None:
                with trio.move_on_after(PEER_QUERY_TIMEOUT_S):
                    for other in await self._query_peer_for_closest(peer, key):
                        learned.append((peer, other))

            async with trio.open_nursery() as nursery:
                for peer in batch:
                    queried.add(peer)
                    nursery.start_soon(ask, peer)
            for source, other in learned:
                if other != local and other not in depth:
                    depth[other] = depth[source] + 1
            servers = [p for p in dict.fromkeys(o for _s, o in learned) if p != local]  # servers list servers only
            merged = sort_peer_ids_by_distance(key, list(dict.fromkeys(closest + servers)))[:count]
            if merged == closest:
                break
            closest = merged
        return closest, depth, rounds


class _IdleStream:
    """An inbound KAD stream whose reads fail after `idle_s` without data (defect 13)."""

    def __init__(self, raw: object, idle_s: float) -> None:
        self._raw = raw
        self._idle_s = idle_s

    async def read(self, n: int | None = None) -> bytes:
        with trio.fail_after(self._idle_s):  # TooSlowError: the handler resets the stream
            return await self._raw.read(n)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._raw, name)


async def _reset(stream: object) -> None:
    try:
        await stream.reset()  # type: ignore[attr-defined]
    except Exception:  # already gone; resetting is best effort
        log.debug("resetting a KAD stream failed", exc_info=True)


class BoundedProviderStore(ProviderStore):
    """Up to `per_key` providers per key; when full the stalest entry makes room (defect 14)."""

    def __init__(self, host: object, peer_routing: object, *, per_key: int = PROVIDERS_PER_KEY) -> None:
        super().__init__(host, peer_routing)  # type: ignore[arg-type]
        self.per_key = per_key

    def add_provider(self, key: bytes, provider: PeerInfo) -> None:
        if not provider or not provider.peer_id:
            return
        entries = self.providers.setdefault(key, {})
        pid = str(provider.peer_id)
        if pid not in entries and len(entries) >= self.per_key:
            # Honest providers re-announce every few minutes; a peer that stopped is the stalest.
            stalest = min(entries, key=lambda p: entries[p].timestamp)
            del entries[stalest]
        entries[pid] = ProviderRecord(provider_info=provider, timestamp=time.time())


class QuotaValueStore(ValueStore):
    """At most `cap` records, `per_peer` new keys per sending peer; full: evict from the largest holder.

    The sender of an inbound PUT_VALUE is known from the stream (`_SENDER`, set by
    `DarkbloomDHT.handle_stream`); local puts and records cached by our own lookups count
    as ours and have no quota. Replacing the value of a key already stored keeps its holder.
    """

    def __init__(self, host: object, local_peer_id: ID, *, cap: int = VALUE_STORE_CAP,
                 per_peer: int = VALUES_PER_PEER) -> None:
        super().__init__(host=host, local_peer_id=local_peer_id)  # type: ignore[arg-type]
        self.cap = cap
        self.per_peer = per_peer
        self.holder: dict[bytes, ID] = {}
        self.refused = 0  # new keys refused (quota or full), for tests and diagnostics
        self.evicted = 0

    def held(self) -> Counter[ID]:
        """Keys each sending peer holds here now."""
        for key in [k for k in self.holder if k not in self.store]:
            del self.holder[key]  # removed or expired meanwhile
        return Counter(self.holder.values())

    def _admit(self, key: bytes) -> None:
        sender = _SENDER.get() or self.local_peer_id
        if key in self.store:
            self.holder.setdefault(key, sender)
            return
        held = self.held()
        if sender != self.local_peer_id and held[sender] >= self.per_peer:
            self.refused += 1
            raise RecordRejected(key.decode(errors="replace"), f"peer {sender} already stores {held[sender]} records here")
        if len(self.store) >= self.cap:
            self.cleanup_expired()
            held = self.held()
        if len(self.store) >= self.cap:
            victim, most = held.most_common(1)[0] if held else (None, 0)
            if victim is None or most <= held[sender]:
                self.refused += 1
                raise RecordRejected(key.decode(errors="replace"), "value store full")
            oldest = next(k for k, h in self.holder.items() if h == victim and k in self.store)
            del self.store[oldest]
            del self.holder[oldest]
            self.evicted += 1
        self.holder[key] = sender

    def put(self, key: bytes, value: bytes, validity: float = 0.0) -> None:
        self._admit(key)
        super().put(key, value, validity)

    def put_record(self, key: bytes, record: object) -> None:
        self._admit(key)
        super().put_record(key, record)  # type: ignore[arg-type]


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
        self.provider_store = BoundedProviderStore(host, routing)
        self.value_store = QuotaValueStore(host, self.local_peer_id)
        self._inbound_slots = trio.Semaphore(INBOUND_STREAMS)
        self._inbound_by_peer: Counter[ID] = Counter()
        self.inbound_refused = 0  # inbound KAD streams reset for want of a slot
        # 0.8.1 resets a peer's 11th ADD_PROVIDER within 10 s; a node announcing several models
        # sends two per model to a trusted server (as one of the closest, and as trusted).
        self._provider_rate_max = PROVIDER_RATE_MAX

    async def handle_stream(self, stream: object) -> None:  # type: ignore[override]
        """Inbound KAD stream: bounded per server and per peer, reset when idle (defect 13)."""
        if self.mode == DHTMode.CLIENT:
            await stream.close()  # type: ignore[attr-defined]
            return
        peer: ID = stream.muxed_conn.peer_id  # type: ignore[attr-defined]
        if self._inbound_by_peer[peer] >= INBOUND_PER_PEER:
            self.inbound_refused += 1
            await _reset(stream)
            return
        self._inbound_by_peer[peer] += 1
        try:
            with trio.move_on_after(INBOUND_WAIT_S) as waiting:
                await self._inbound_slots.acquire()
            if waiting.cancelled_caught:
                self.inbound_refused += 1
                await _reset(stream)
                return
            token = _SENDER.set(peer)
            try:
                await self._do_handle_stream(_IdleStream(stream, INBOUND_IDLE_S))  # type: ignore[arg-type]
            finally:
                _SENDER.reset(token)
                self._inbound_slots.release()
        finally:
            self._inbound_by_peer[peer] -= 1
            if self._inbound_by_peer[peer] <= 0:
                del self._inbound_by_peer[peer]

    def _trusted_peers(self) -> list[ID]:
        return [p for p in self.routing_table.trusted if p != self.local_peer_id]  # type: ignore[attr-defined]

    async def provide(self, key: str) -> bool:
        """Announce to the servers closest to the key and, always, to the trusted bootstrap servers."""
        ok = await super().provide(key)
        mh = multihash_of(key)
        sent = 0
        for peer in self._trusted_peers():  # defect 2: they answer while the nearest servers are dead
            with trio.move_on_after(PROVIDER_QUERY_TIMEOUT_S):
                sent += await self.provider_store._send_add_provider(peer, mh)
        return ok or sent > 0

    async def put_value(self, key: str, value: bytes) -> None:
        """Store at the servers closest to the key and, always, at the trusted bootstrap servers."""
        await super().put_value(key, value)
        key_bytes = key.encode()
        for peer in self._trusted_peers():
            with trio.move_on_after(PROVIDER_QUERY_TIMEOUT_S):
                await self.value_store._store_at_peer(peer, key_bytes, value)

    async def trace_peer_lookup(self, peer_id: str) -> tuple[bool, int, int]:
        """FIND_NODE lookup of a peer, for research: (found it, hops, rounds).

        hops is the depth of the nearest result (sequential RPCs until it was learned; 0 when
        it was in our table), as the simulator counts it (darkbloom.sim.traversal).
        """
        target = ID.from_base58(peer_id)
        closest, depth, rounds = await self.peer_routing.traced_lookup(target.to_bytes())  # type: ignore[attr-defined]
        if not closest:
            return False, -1, rounds
        return closest[0] == target, depth.get(closest[0], 0), rounds

    def trust(self, peer_id: ID) -> None:
        """Bootstrap relays: admitted before identify completes."""
        self.routing_table.trusted.add(peer_id)  # type: ignore[attr-defined]

    async def fresh_providers(self, cid_text: str, *, keep_local: bool, count: int = 64) -> list[PeerInfo]:
        """Each provider once: from the servers closest to the key and the trusted bootstrap servers.

        The trusted servers are always asked (defect 2 of docs/RELIABILITY.md): they hear every
        announcement of the nodes that joined through them, so a model stays findable while
        the servers nearest its key are dead. On servers, what peers stored here counts too.
        Unlike 0.8.1's `find_providers`, nothing found is cached locally (defect 8) and
        duplicates do not count towards `count` (defect 14).
        """
        key = multihash_of(cid_text)
        found: dict[ID, PeerInfo] = {}
        if keep_local:
            for info in self.provider_store.get_providers(key):
                found.setdefault(info.peer_id, info)
        local = self.local_peer_id
        trusted = self._trusted_peers()
        t0 = trio.current_time()
        closest = await self.peer_routing.find_closest_peers_network(key)
        targets = list(dict.fromkeys(trusted + [p for p in closest if p != local]))
        limiter = trio.CapacityLimiter(PROVIDER_QUERY_CONCURRENCY)
        store = self.provider_store

        async def ask(peer: ID, always: bool) -> None:
            async with limiter:
                if len(found) >= count and not always:
                    return
                with trio.move_on_after(PROVIDER_QUERY_TIMEOUT_S):
                    providers, _closer = await store._get_providers_from_peer_with_closers(peer, key)
                    for info in providers:
                        found.setdefault(info.peer_id, info)

        t1 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for peer in targets:
                nursery.start_soon(ask, peer, peer in trusted)
        log.debug("fresh_providers %s: lookup %.2f s, %d servers asked in %.2f s, %d providers", cid_text[-8:],
                  t1 - t0, len(targets), trio.current_time() - t1, len(found))
        return list(found.values())[:count]

    async def fresh_value(self, key: str, *, keep_local: bool) -> bytes | None:
        """The best valid value from the network (local copy used only on servers)."""
        key_bytes = key.encode()
        local = self.value_store.get(key_bytes)
        if local is not None and not keep_local:
            self.value_store.remove(key_bytes)  # defect 8: get_value answers from cache
        t0 = trio.current_time()
        value = await self.get_value(key, quorum=VALUE_QUORUM)  # defect 19: without a quorum it asks everyone
        log.debug("get_value %s: %.2f s, %s", key[-8:], trio.current_time() - t0, "found" if value else "nothing")
        if value is None:
            # defect 2: the servers nearest the key may be dead; the trusted ones hold it too.
            for peer in self._trusted_peers():
                with trio.move_on_after(PROVIDER_QUERY_TIMEOUT_S):
                    found = await self.value_store._get_from_peer(peer, key_bytes)
                    if isinstance(found, bytes):
                        try:
                            self.validator.validate(key, found)  # type: ignore[union-attr]
                        except Exception:  # RecordRejected and libp2p's validation errors
                            continue
                        return found
        if value is None and local is not None and keep_local:
            return local.value
        return value
