"""Discovery, records and inbound-stream policy shared by the libp2p and the memory network.

Subclasses supply the raw operations (`_raw_provide`, `_raw_find_providers`,
`_raw_put_value`, `_raw_get_value`, `_raw_addrs`); this class adds what Darkbloom means by
them: model keys, signed capability records with seq and expiry, a validator, replay
protection, provider lists filtered to peers with a valid record (so a peer that stops
announcing disappears within one record lifetime), periodic re-announcement, and inbound
stream handling that is bounded per peer and logs bad input once.

Bounded discovery: `find_providers` answers with every provider whose valid record is cached
(free), and fetches records of the others (in random order, providers whose fetch failed
recently last) only until `discovery_candidates` valid providers are known; a fetch is
started only while valid + in-flight < that number, so a cold discovery of N providers
with valid records fetches exactly that many. The providers left unchecked are handed to a
background loop (run by the subclass's nursery with the announce loop) that fetches their
records a few at a time into the cache, so later discoveries list them too; without that
loop (the simulator drives peers by hand) they are checked by a later discovery that lacks
valid providers. Each record is validated as before (forged, expired, replayed: rejected),
only validated records are listed, and a provider whose record cannot be fetched is skipped.
At 50 providers, checking all of them on the request path (each a DHT get_value of seconds
under load) ran cold requests out of their 60 s (docs/RESEARCH.md, real hosts).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import trio

from darkbloom.errors import MalformedMessage, P2PError, RecordRejected, StreamClosed
from darkbloom.identity import Identity
from darkbloom.log import short_id
from darkbloom.p2p import records
from darkbloom.p2p.api import Handler, Provider, Stream
from darkbloom.p2p.keys import caps_key, model_cid, peer_id_from_public_key
from darkbloom.wire.caps import CapabilityRecord, Reachability

__all__ = ["DISCOVERY_CANDIDATES", "DiscoveryStats", "NetworkCore"]

log = logging.getLogger(__name__)

_PROVIDER_LOOKUP_LIMIT = 16  # records fetched concurrently while filtering providers
DISCOVERY_CANDIDATES = 8  # valid providers a discovery waits for; 0: check every provider's record
BACKGROUND_FETCHES = 4  # deferred record fetches in flight at once (background loop)
RECORD_RETRY_S = 60.0  # a provider whose record fetch failed is not retried in the background this long
_DEFERRED_MAX = 4096  # providers waiting for a background record fetch


@dataclass(frozen=True, slots=True)
class DiscoveryStats:
    """What one `find_providers` call did (diagnostics, tests, the real-host comparison)."""

    listed: frozenset[str]  # provider peer ids the DHT listed (deduplicated)
    cached: int  # of them, with a valid record already cached (no fetch)
    fetched: int  # record fetches this call started
    valid: int  # providers returned (valid record serving the model)
    deferred: int  # providers left for the background loop or a later discovery


class NetworkCore:
    """Base of both PeerNetwork implementations (see darkbloom.p2p.api.PeerNetwork)."""

    def __init__(
        self,
        identity: Identity,
        *,
        record_ttl_s: float,
        announce_interval_s: float,
        max_record_bytes: int,
        max_streams_per_peer: int,
        providers_cache_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        discovery_candidates: int = DISCOVERY_CANDIDATES,
    ) -> None:
        self.identity = identity
        self.peer_id = peer_id_from_public_key(identity.public_key)
        self.record_ttl_s = record_ttl_s
        self.announce_interval_s = announce_interval_s
        self.max_record_bytes = max_record_bytes
        self.max_streams_per_peer = max_streams_per_peer
        self.providers_cache_s = providers_cache_s
        self.clock = clock
        self.reachability: Reachability = "public"
        self._cache = records.RecordCache()
        self._provided: set[str] = set()
        self._template: CapabilityRecord | None = None
        self._own_record: CapabilityRecord | None = None
        self._seq = 0
        self._provider_cache: dict[str, tuple[float, list[tuple[str, tuple[str, ...]]]]] = {}
        self._handlers: dict[str, Handler] = {}
        self._inbound: dict[str, int] = {}
        self._logged: set[tuple[str, str, str]] = set()
        self._announce_now = trio.Event()
        self.announcements = 0  # completed announce rounds (models and record)
        self._announced = trio.Event()
        self.discovery_candidates = discovery_candidates
        self._rng = random.Random(self.peer_id)  # repeatable per identity (the simulator's runs are seeded)
        self._fetching: dict[str, trio.Event] = {}  # record fetches in flight, by peer
        self._unfetchable: dict[str, float] = {}  # peer -> clock time its last record fetch failed
        self._deferred: dict[str, None] = {}  # providers whose record the background loop should fetch
        self._deferred_wanted = trio.Event()
        self.record_fetches = 0  # record fetches from the network (foreground and background)
        self.background_fetches = 0  # of which by the background loop
        self.last_discovery: DiscoveryStats | None = None

    # --- raw operations (subclasses) -----------------------------------------------

    async def _raw_provide(self, key: str) -> None:
        raise NotImplementedError

    async def _raw_find_providers(self, key: str, fresh: bool) -> list[tuple[str, tuple[str, ...]]]:
        raise NotImplementedError

    async def _raw_put_value(self, key: str, value: bytes) -> None:
        raise NotImplementedError

    async def _raw_get_value(self, key: str, fresh: bool) -> bytes | None:
        raise NotImplementedError

    def _raw_addrs(self) -> tuple[str, ...]:
        raise NotImplementedError

    # --- time -----------------------------------------------------------------------

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # --- validator (used by the DHT on every peer) ----------------------------------

    def validate_value(self, key: str, value: bytes) -> CapabilityRecord:
        """The verified record, or RecordRejected. Every peer runs this on put and get."""
        return records.verify_record(key, value, now_ms=self.now_ms(), max_bytes=self.max_record_bytes)

    def select_value(self, key: str, values: Sequence[bytes]) -> int:
        """Index of the best of `values`; invalid ones lose."""
        valid: list[tuple[int, CapabilityRecord]] = []
        for i, v in enumerate(values):
            try:
                valid.append((i, self.validate_value(key, v)))
            except RecordRejected:
                continue
        if not valid:
            return 0
        best = records.select_best([r for _, r in valid])
        return valid[best][0]

    # --- records ---------------------------------------------------------------------

    async def put_record(self, template: CapabilityRecord) -> CapabilityRecord:
        """Sign and store our record now; the announce loop keeps it fresh from then on."""
        self._template = template
        return await self._publish_record()

    async def _publish_record(self) -> CapabilityRecord:
        assert self._template is not None
        now = self.now_ms()
        self._seq = records.next_seq(self._seq, now)
        record = records.build_record(
            self.identity,
            self._template,
            seq=self._seq,
            now_ms=now,
            ttl_ms=int(self.record_ttl_s * 1000),
            addrs=self.announce_addrs,
            reachability=self.reachability,
        )
        value = records.encode_record(record)
        self.validate_value(caps_key(self.peer_id), value)  # oversize templates fail here, loudly
        self._own_record = record
        self._cache.offer(record, now)
        await self._raw_put_value(caps_key(self.peer_id), value)
        log.debug("record seq=%d published by %s", record.seq, short_id(self.peer_id))
        return record

    def withdraw_record(self) -> None:
        """Stop refreshing our record; it expires from every cache within one lifetime."""
        self._template = None

    async def get_record(self, peer_id: str, *, fresh: bool = False) -> CapabilityRecord | None:
        now = self.now_ms()
        if peer_id == self.peer_id and self._own_record is not None:
            return self._own_record if now < self._own_record.expires_at_ms else None
        if not fresh:
            cached = self._cache.get(peer_id, now)
            if cached is not None:
                return cached
        key = caps_key(peer_id)
        try:
            value = await self._raw_get_value(key, True)
        except P2PError as exc:
            log.debug("get_record %s failed: %s", short_id(peer_id), exc)
            return self._cache.get(peer_id, now)
        if value is None:
            return self._cache.get(peer_id, self.now_ms())
        try:
            record = self.validate_value(key, value)
            return self._cache.offer(record, self.now_ms())
        except RecordRejected as exc:
            self._log_once(peer_id, "record", f"record rejected: {exc.reason}")
            return self._cache.get(peer_id, self.now_ms())

    # --- models ---------------------------------------------------------------------

    async def provide(self, model_id: str) -> None:
        self._provided.add(model_id)
        await self._raw_provide(model_cid(model_id))

    def unprovide(self, model_id: str) -> None:
        self._provided.discard(model_id)

    @property
    def provided(self) -> frozenset[str]:
        return frozenset(self._provided)

    async def find_providers(self, model_id: str, *, fresh: bool = False) -> list[Provider]:
        """Providers of `model_id` with a valid record, at least `discovery_candidates` of them
        when that many exist (see the module docstring); every one with a cached record."""
        key = model_cid(model_id)
        now = self.clock()
        cached = self._provider_cache.get(key)
        if not fresh and cached is not None and now - cached[0] < self.providers_cache_s:
            raw = cached[1]
        else:
            raw = await self._raw_find_providers(key, fresh)
            self._provider_cache[key] = (self.clock(), raw)
        merged: dict[str, set[str]] = {}
        for peer_id, addrs in raw:  # workaround for 0.8.1 defect 8: duplicates
            merged.setdefault(peer_id, set()).update(addrs)
        found: dict[str, Provider] = {}

        def admit(peer_id: str, record: CapabilityRecord | None) -> bool:
            if record is None or record.model(model_id) is None:
                return False  # no valid record: the peer stopped announcing or lies
            addrs = tuple(record.addrs) or tuple(sorted(merged[peer_id]))
            hint = "relayed" if record.reachability == "relayed" else "direct"
            found[peer_id] = Provider(peer_id=peer_id, addrs=addrs, record=record, route_hint=hint)
            return True

        # A valid cached record is reused even on a fresh provider query: expiry bounds its
        # age, and the provider list (who still announces) is fresh.
        unknown = []
        for peer_id in merged:
            record = self._known_record(peer_id)
            if record is None:
                unknown.append(peer_id)
            else:
                admit(peer_id, record)
        n_cached = len(found)
        want = self.discovery_candidates
        need = len(unknown) if want <= 0 else max(0, want - len(found))
        pending = self._fetch_order(unknown)
        fetched = 0
        if need and pending:
            send, receive = trio.open_memory_channel[tuple[str, CapabilityRecord | None]](math.inf)

            async def check(peer_id: str) -> None:
                await send.send((peer_id, await self._fetch_record(peer_id)))

            async with trio.open_nursery() as nursery:
                in_flight = got = 0
                while True:
                    # Start a fetch only while it could be needed: all of them succeeding
                    # must not overshoot `need` (a cold discovery fetches `need` records).
                    while pending and in_flight < _PROVIDER_LOOKUP_LIMIT and got + in_flight < need:
                        nursery.start_soon(check, pending.pop(0))
                        in_flight += 1
                        fetched += 1
                    if not in_flight:
                        break
                    peer_id, record = await receive.receive()
                    in_flight -= 1
                    got += admit(peer_id, record)
        self._defer(pending)
        self.last_discovery = DiscoveryStats(listed=frozenset(merged), cached=n_cached, fetched=fetched,
                                             valid=len(found), deferred=len(pending))
        log.debug("find_providers %s: %d listed, %d cached, %d fetched, %d valid, %d deferred", model_id,
                  len(merged), n_cached, fetched, len(found), len(pending))
        return [found[p] for p in merged if p in found]

    def _known_record(self, peer_id: str) -> CapabilityRecord | None:
        """Our own or a cached valid record, without asking the network."""
        now = self.now_ms()
        if peer_id == self.peer_id and self._own_record is not None:
            return self._own_record if now < self._own_record.expires_at_ms else None
        return self._cache.get(peer_id, now)

    def _fetch_order(self, peers: list[str]) -> list[str]:
        """Random order, providers whose record fetch failed within RECORD_RETRY_S last."""
        order = list(peers)
        self._rng.shuffle(order)
        now = self.clock()
        return sorted(order, key=lambda p: now - self._unfetchable.get(p, -math.inf) < RECORD_RETRY_S)

    async def _fetch_record(self, peer_id: str) -> CapabilityRecord | None:
        """`get_record`, one fetch per peer at a time (a second caller waits for the first)."""
        running = self._fetching.get(peer_id)
        if running is not None:
            await running.wait()
            return self._known_record(peer_id)  # None: that fetch failed (or was cancelled): skip it
        done = self._fetching[peer_id] = trio.Event()
        try:
            self.record_fetches += 1
            record = await self.get_record(peer_id)
            if record is None:
                now = self.clock()
                if len(self._unfetchable) >= _DEFERRED_MAX:  # keep only the failures that still matter
                    self._unfetchable = {p: t for p, t in self._unfetchable.items() if now - t < RECORD_RETRY_S}
                self._unfetchable[peer_id] = now
            else:
                self._unfetchable.pop(peer_id, None)
            return record
        finally:
            del self._fetching[peer_id]
            done.set()

    def _defer(self, peers: Iterable[str]) -> None:
        """Hand unchecked providers to the background loop (bounded; oldest dropped first)."""
        for peer_id in peers:
            self._deferred[peer_id] = None
        while len(self._deferred) > _DEFERRED_MAX:
            del self._deferred[next(iter(self._deferred))]
        if self._deferred:
            self._deferred_wanted.set()

    async def _fetch_deferred_loop(self) -> None:
        """Fetch the records discoveries left unchecked, BACKGROUND_FETCHES at a time, into the cache."""
        limiter = trio.CapacityLimiter(BACKGROUND_FETCHES)

        async def fetch(peer_id: str) -> None:
            async with limiter:
                failed = self._unfetchable.get(peer_id)
                if self._known_record(peer_id) is not None or (
                        failed is not None and self.clock() - failed < RECORD_RETRY_S):
                    return
                self.background_fetches += 1
                await self._fetch_record(peer_id)

        while True:
            await self._deferred_wanted.wait()
            self._deferred_wanted = trio.Event()
            batch, self._deferred = list(self._deferred), {}
            async with trio.open_nursery() as nursery:
                for peer_id in batch:
                    nursery.start_soon(fetch, peer_id)

    # --- announcing -------------------------------------------------------------------

    async def announce_once(self) -> None:
        """Re-provide every model and re-sign the record (new seq, new expiry)."""
        for model_id in sorted(self._provided):
            try:
                await self._raw_provide(model_cid(model_id))
            except P2PError as exc:
                log.warning("re-provide of %s failed: %s", model_id, exc)
        if self._template is not None:
            try:
                await self._publish_record()
            except P2PError as exc:
                log.warning("record refresh failed: %s", exc)
        self.announcements += 1
        self._announced.set()
        self._announced = trio.Event()

    async def wait_announcements(self, count: int) -> None:
        """Return once `count` announce rounds completed (tests, readiness checks)."""
        while self.announcements < count:
            await self._announced.wait()

    def request_announce(self) -> None:
        """Announce at once (joined the DHT again, addresses changed)."""
        self._announce_now.set()

    async def _announce_loop(self) -> None:
        """The core's background work, started by each subclass in its nursery: re-announcing,
        and fetching the provider records discoveries deferred."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._fetch_deferred_loop)
            await self._announce_forever()

    async def _announce_forever(self) -> None:
        while True:
            with trio.move_on_after(self.announce_interval_s):
                await self._announce_now.wait()
            self._announce_now = trio.Event()
            if self._provided or self._template is not None:
                await self.announce_once()

    # --- inbound streams ----------------------------------------------------------

    def serve(self, protocol: str, handler: Handler) -> None:
        self._handlers[protocol] = handler

    async def _dispatch(self, protocol: str, stream: Stream) -> None:
        """Run the handler for an inbound stream under our per-peer and error policy."""
        handler = self._handlers.get(protocol)
        peer = stream.peer_id
        if handler is None:
            await stream.reset()
            return
        if self._inbound.get(peer, 0) >= self.max_streams_per_peer:
            self._log_once(peer, protocol, "too many concurrent streams; resetting the excess")
            await stream.reset()
            return
        self._inbound[peer] = self._inbound.get(peer, 0) + 1
        ok = False
        try:
            await handler(stream)
            ok = True
        except MalformedMessage as exc:
            self._log_once(peer, protocol, f"malformed input: {exc.reason}")
        except StreamClosed:
            pass  # the remote went away; nothing to do
        except P2PError as exc:
            self._log_once(peer, protocol, f"{type(exc).__name__}: {exc}")
        finally:
            self._inbound[peer] -= 1
            if not self._inbound[peer]:
                del self._inbound[peer]
            with trio.move_on_after(2, shield=True):
                try:
                    if ok:
                        await stream.close()
                    else:
                        await stream.reset()
                except P2PError:
                    pass

    def _log_once(self, peer: str, protocol: str, what: str) -> None:
        kind = what.split(":", 1)[0]
        if (peer, protocol, kind) in self._logged:
            return
        if len(self._logged) > 10_000:
            self._logged.clear()
        self._logged.add((peer, protocol, kind))
        log.warning("peer %s on %s: %s", short_id(peer), protocol, what)

    # --- addresses ------------------------------------------------------------------

    @property
    def announce_addrs(self) -> tuple[str, ...]:
        return self._raw_addrs()

    def record_for_announce(self) -> CapabilityRecord | None:
        return self._own_record

    def _replace_template(self, **changes: object) -> None:
        if self._template is not None:
            self._template = dataclasses.replace(self._template, **changes)  # type: ignore[arg-type]
