"""One peer's Kademlia: server answers (pure, `now` passed in) and client lookups over a dialer.

Layers: `RoutingTable` (pure) -> `Lookup` traversal (pure) -> RPC here over any dialer that
returns `darkbloom.p2p.api.Stream`s (one `KadRequest`, one `KadReply` per stream) -> the
PeerNetwork in darkbloom.sim.peer. Parameters default to py-libp2p 0.8.1's where they matter
(k = 20, beta = 3, 10 s query timeout, 48 h provider records); alpha defaults to 3 (the
Kademlia paper) and is a scenario parameter, since libp2p 0.8.1 uses 10.

Routing-table policy as in libp2p: only server-mode (public) peers enter tables, a full bucket
keeps its live peers and drops the newcomer; a peer that fails an RPC is removed at once.
`DhtParams.routing_table` picks the table model (darkbloom.sim.routing: textbook k-buckets by
default, or py-libp2p 0.8.1's splitting buckets); `admit_learned` adds the servers named in
FIND_NODE answers to the table as they arrive, before they are contacted, as 0.8.1's
`_query_peer_for_closest` does (and Darkbloom's `ServerOnlyRoutingTable` lets through).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from darkbloom.errors import MalformedMessage, P2PError, RecordRejected
from darkbloom.p2p.api import Stream, recv_message, send_message
from darkbloom.sim.messages import KAD_PROTOCOL, KadReply, KadRequest, PeerEntry
from darkbloom.sim.routing import MAX_BUCKETS, RoutingTableModel, new_table
from darkbloom.sim.traversal import Lookup, LookupResult

__all__ = ["DhtNode", "DhtParams", "QueryStats"]

log = logging.getLogger(__name__)

Dialer = Callable[[str, str], Awaitable[Stream]]


@dataclass(frozen=True, slots=True, kw_only=True)
class DhtParams:
    k: int = 20  # bucket size and replication (libp2p BUCKET_SIZE)
    alpha: int = 3  # queries in flight per round (libp2p 0.8.1: 10)
    beta: int = 3  # libp2p BETA
    max_rounds: int = 20  # libp2p MAX_PEER_LOOKUP_ROUNDS
    strict: bool = False  # classic Kademlia termination instead of libp2p's
    rpc_timeout_s: float = 10.0  # libp2p QUERY_TIMEOUT
    provider_ttl_s: float = 48 * 3600.0  # libp2p PROVIDER_RECORD_EXPIRATION_INTERVAL
    max_providers: int = 20  # a provider lookup stops once it knows this many
    providers_per_reply: int = 0  # cap on providers in one GET_PROVIDERS reply; 0: all (libp2p)
    routing_table: RoutingTableModel = "kademlia"  # or "py-libp2p-0.8.1" (splits any full bucket)
    max_buckets: int = MAX_BUCKETS  # py-libp2p-0.8.1 model: buckets per table (0.8.1 MAXIMUM_BUCKETS)
    admit_learned: bool = False  # servers named in answers enter the table uncontacted (0.8.1 does)


@dataclass(slots=True)
class QueryStats:
    """What the last lookups of a node cost; read by the scenario's metrics."""

    rpcs: int = 0
    rpc_failures: int = 0
    answered: int = 0  # requests this node served (as a DHT server)


def _key_bytes(key: int) -> bytes:
    return key.to_bytes(32, "big")


class DhtNode:
    """Kademlia state and operations of one peer."""

    __slots__ = ("peer_id", "params", "table", "server", "_is_server", "_key_of", "_clock", "_dial",
                 "_validate", "_select", "providers", "values", "stats", "addrs")

    def __init__(
        self,
        peer_id: str,
        key_of: Callable[[str], int],
        params: DhtParams,
        *,
        server: bool,
        is_server: Callable[[str], bool],
        clock: Callable[[], float],
        dial: Dialer,
        validate: Callable[[str, bytes], object],
        select: Callable[[str, list[bytes]], int],
        addrs: Callable[[], tuple[str, ...]],
    ) -> None:
        self.peer_id = peer_id
        self.params = params
        self.table = new_table(params.routing_table, peer_id, key_of, k=params.k, max_buckets=params.max_buckets)
        self.server = server
        self._is_server = is_server
        self._key_of = key_of
        self._clock = clock
        self._dial = dial
        self._validate = validate  # raises RecordRejected
        self._select = select
        self.addrs = addrs
        self.providers: dict[int, dict[str, tuple[float, tuple[str, ...]]]] | None = None
        self.values: dict[str, bytes] | None = None
        self.stats = QueryStats()

    # --- routing table --------------------------------------------------------------

    def observe(self, peer_id: str) -> None:
        """A peer showed it is alive; servers enter the table when their bucket has room."""
        if self._is_server(peer_id):
            self.table.observe(peer_id)  # full bucket: the live oldest stays (libp2p pings it)

    def _learn(self, closer: tuple[str, ...]) -> None:
        if self.params.admit_learned:
            for peer in closer:
                if peer != self.peer_id:
                    self.observe(peer)

    # --- server side (pure) --------------------------------------------------------

    def answer(self, req: KadRequest, sender: str, now: float) -> KadReply:
        """The reply to `req` from `sender` at unix time `now`; updates stores and table."""
        self.stats.answered += 1
        self.observe(sender)
        key = int.from_bytes(req.key, "big") if req.key else 0
        if req.op == "ping":
            return KadReply()
        closer = tuple(self.table.closest(key, self.params.k, exclude=sender))
        if req.op == "find_node":
            return KadReply(closer=closer)
        if req.op == "get_providers":
            found: list[PeerEntry] = []
            entries = self.providers.get(key) if self.providers else None
            if entries:
                cap = self.params.providers_per_reply or len(entries)
                for peer, (expires, addrs) in list(entries.items()):
                    if expires <= now:
                        del entries[peer]
                    elif len(found) < cap:
                        found.append(PeerEntry(peer_id=peer, addrs=addrs))
            return KadReply(closer=closer, providers=tuple(found))
        if req.op == "add_provider":
            if req.provider is None or req.provider.peer_id != sender:
                return KadReply(ok=False)  # only a peer itself may say it provides
            if self.providers is None:
                self.providers = {}
            self.providers.setdefault(key, {})[sender] = (now + self.params.provider_ttl_s, req.provider.addrs)
            return KadReply()
        if req.op == "get_value":
            value = self.values.get(req.record_key) if self.values else None
            return KadReply(closer=closer, value=value)
        if req.op == "put_value":
            return KadReply(ok=self.store_value(req.record_key, req.value))
        raise MalformedMessage(f"unknown kad op {req.op!r}")  # unreachable: the codec checks the Literal

    def store_value(self, record_key: str, value: bytes) -> bool:
        try:
            self._validate(record_key, value)
        except RecordRejected:
            return False
        if self.values is None:
            self.values = {}
        old = self.values.get(record_key)
        if old is not None and old != value and self._select(record_key, [old, value]) == 0:
            return False
        self.values[record_key] = value
        return True

    async def handle(self, stream: Stream) -> None:
        """Serve one inbound KAD stream: one request, one reply."""
        req = await recv_message(stream, KadRequest)
        if req is None:
            return
        await send_message(stream, self.answer(req, stream.peer_id, self._clock()))

    # --- client side ---------------------------------------------------------------

    async def rpc(self, peer: str, req: KadRequest) -> KadReply | None:
        """Ask `peer`; None when it fails or times out (and it leaves our table)."""
        self.stats.rpcs += 1
        reply = None
        with trio.move_on_after(self.params.rpc_timeout_s):
            try:
                stream = await self._dial(peer, KAD_PROTOCOL)
                await send_message(stream, req)
                await stream.close()
                reply = await recv_message(stream, KadReply)
            except (P2PError, MalformedMessage) as exc:  # the peer is gone or broken: treat as failed
                log.debug("kad %s to %s failed: %s", req.op, peer[-8:], exc)
        if reply is None:
            self.stats.rpc_failures += 1
            self.table.remove(peer)
            return None
        self.observe(peer)
        return reply

    def _new_lookup(self, target: int) -> Lookup:
        p = self.params
        return Lookup(
            target, self.table.closest(target, p.k), self._key_of,
            k=p.k, alpha=p.alpha, beta=p.beta, max_rounds=p.max_rounds, local_id=self.peer_id, strict=p.strict,
        )

    async def lookup(
        self,
        target: int,
        req: KadRequest | None = None,
        *,
        on_reply: Callable[[str, KadReply], bool] | None = None,
    ) -> LookupResult:
        """Iterative lookup of `target` with `req` (FIND_NODE by default).

        `on_reply(peer, reply)` sees every reply; returning True ends the lookup after the round.
        """
        req = req or KadRequest(op="find_node", key=_key_bytes(target))
        lookup = self._new_lookup(target)
        stop = False

        async def ask(peer: str) -> None:
            nonlocal stop
            reply = await self.rpc(peer, req)
            if reply is None:
                lookup.on_failure(peer)
                return
            lookup.on_reply(peer, reply.closer)
            self._learn(reply.closer)
            if on_reply is not None and on_reply(peer, reply):
                stop = True

        while not stop:
            batch = lookup.start_round()
            if not batch:
                break
            async with trio.open_nursery() as nursery:
                for peer in batch:
                    nursery.start_soon(ask, peer)
            lookup.end_round()
        return lookup.result()

    def lookup_sync(self, target: int, peers: dict[str, DhtNode]) -> LookupResult:
        """A FIND_NODE lookup answered by direct calls (no network, no time): warm starts."""
        lookup = self._new_lookup(target)
        now = self._clock()
        req = KadRequest(op="find_node", key=_key_bytes(target))
        while True:
            batch = lookup.start_round()
            if not batch:
                return lookup.result()
            for peer in batch:
                other = peers.get(peer)
                if other is None:
                    lookup.on_failure(peer)
                    self.table.remove(peer)
                    continue
                reply = other.answer(req, self.peer_id, now)
                self.observe(peer)
                lookup.on_reply(peer, reply.closer)
                self._learn(reply.closer)
            lookup.end_round()

    def store_sync(self, key: int, req: KadRequest, peers: dict[str, DhtNode]) -> int:
        """`req` (add_provider/put_value) to the k closest of `key` by direct calls: warm starts."""
        res = self.lookup_sync(key, peers)
        now = self._clock()
        stored = sum(peers[p].answer(req, self.peer_id, now).ok for p in res.closest if p in peers)
        if self.server:
            stored += self.answer(req, self.peer_id, now).ok
        return stored

    async def provide(self, key: int) -> int:
        """ADD_PROVIDER to the k closest servers of `key`; the number that stored it."""
        res = await self.lookup(key)
        req = KadRequest(op="add_provider", key=_key_bytes(key), provider=PeerEntry(peer_id=self.peer_id, addrs=self.addrs()))
        stored = 0

        async def add(peer: str) -> None:
            nonlocal stored
            reply = await self.rpc(peer, req)
            stored += reply is not None and reply.ok

        async with trio.open_nursery() as nursery:
            for peer in res.closest:
                nursery.start_soon(add, peer)
        if self.server:
            self.answer(req, self.peer_id, self._clock())
        return stored

    async def find_providers(self, key: int) -> tuple[list[tuple[str, tuple[str, ...]]], LookupResult]:
        """Providers of `key` from a GET_PROVIDERS lookup (stops once `max_providers` are known)."""
        found: dict[str, tuple[str, ...]] = {}
        if self.server and self.providers and key in self.providers:
            now = self._clock()
            for peer, (expires, addrs) in self.providers[key].items():
                if expires > now:
                    found[peer] = addrs

        def collect(peer: str, reply: KadReply) -> bool:
            for entry in reply.providers:
                found.setdefault(entry.peer_id, entry.addrs)
            return len(found) >= self.params.max_providers

        res = await self.lookup(key, KadRequest(op="get_providers", key=_key_bytes(key)), on_reply=collect)
        return list(found.items()), res

    async def put_value(self, record_key: str, key: int, value: bytes) -> int:
        """PUT_VALUE to the k closest servers; the number that stored it."""
        res = await self.lookup(key)
        req = KadRequest(op="put_value", key=_key_bytes(key), record_key=record_key, value=value)
        stored = 0

        async def put(peer: str) -> None:
            nonlocal stored
            reply = await self.rpc(peer, req)
            stored += reply is not None and reply.ok

        async with trio.open_nursery() as nursery:
            for peer in res.closest:
                nursery.start_soon(put, peer)
        if self.server:
            stored += self.store_value(record_key, value)
        return stored

    async def get_value(self, record_key: str, key: int) -> bytes | None:
        """The best stored value of `record_key`: ends after the first round that found one."""
        values: list[bytes] = []
        if self.server and self.values and record_key in self.values:
            values.append(self.values[record_key])

        def collect(peer: str, reply: KadReply) -> bool:
            if reply.value is not None:
                values.append(reply.value)
            return bool(values)

        if not values:
            await self.lookup(key, KadRequest(op="get_value", key=_key_bytes(key), record_key=record_key), on_reply=collect)
        if not values:
            return None
        return values[self._select(record_key, values)]
