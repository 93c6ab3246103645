"""The relay's own look at nodes: periodic status probes (uptime, hence the derived class) and capability canaries (JSON mode, tools, logprobs) for the features nodes advertise.

`RelayProber.run` (in the relay's nursery; both intervals from `[relay]`, 0 turns a loop
off) sleeps first, then every round:

- learns nodes: connected peers with a capability record that lists models, plus the
  providers of every model seen so far (and of `models` given at start);
- probes each known node's `/darkbloom/status/1.0.0`: answered is "up", anything else
  "down" (`RelayTrust.record_probe`, with the decode speed of its record), so the class in
  the reputation table comes from measured uptime, not the class a node declares;
- sends each node one canary per advertised canaried feature and model
  (`api.trust.canary.make_canary`), paying like any consumer when `meter` is given: the
  relay's own account, topped up to `[relay] canary_budget` by the ledger operator
  (these credits are minted by the network's operator, like the network fee they come
  back as). A failure is recorded in `RelayTrust.record_canary` and published in the
  table, so shims stop sending such requests to the node; unreachable or busy nodes are
  not failures.

Nothing here blocks a relay: a probe or canary is bounded by `timeout_s` and one node's
failure never stops the round.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from darkbloom.errors import DarkbloomError, NoCapacity, P2PError
from darkbloom.relay.trust import RelayTrust

__all__ = ["CanaryPurse", "RelayProber", "SelfLedgerNetwork"]

log = logging.getLogger(__name__)

FORGET_AFTER_S = 86_400.0  # a node not seen (no record, no answer) this long is dropped
NOT_NODE_RECHECK_S = 3600.0  # a connected peer without a record (shim, relay) is asked again after this


@dataclass
class RelayProber:
    network: Any  # PeerNetwork of the relay
    trust: RelayTrust
    probe_interval_s: float = 300.0
    canary_interval_s: float = 3600.0
    timeout_s: float = 30.0
    meter: Any | None = None  # darkbloom.api.metering.ConsumerMeter paying canaries; None: ask for free serving
    models: tuple[str, ...] = ()  # model ids to look up providers of from the start
    rng: random.Random = field(default_factory=random.Random)
    known: dict[str, Any] = field(default_factory=dict)  # peer id -> its last capability record
    seen_at: dict[str, float] = field(default_factory=dict)  # peer id -> last time a record or answer came
    canaries_run: int = 0
    parallel: int = 16  # probes and record lookups in flight at once
    not_nodes: dict[str, float] = field(default_factory=dict)  # peer id -> when it was found to have no record

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as nursery:
            if self.probe_interval_s > 0:
                nursery.start_soon(self._every, self.probe_interval_s, self.probe_round)
            if self.canary_interval_s > 0:
                nursery.start_soon(self._every, self.canary_interval_s, self.canary_round)

    async def _every(self, interval_s: float, step: Any) -> None:
        while True:
            await trio.sleep(interval_s)
            await step()

    # --- discovery ---------------------------------------------------------------------

    async def discover(self) -> list[str]:
        """Refresh `known` from connected peers' records and model providers; returns node peer ids."""
        now = self.trust.clock()
        candidates = set(self.network.peers())
        models = set(self.models) | {m.id for r in self.known.values() for m in r.models}
        for model in sorted(models):
            try:
                with trio.move_on_after(self.timeout_s):
                    for p in await self.network.find_providers(model):
                        self.known[p.peer_id] = p.record
                        self.seen_at[p.peer_id] = now
            except P2PError as exc:  # the DHT is unhappy: probe whom we know
                log.debug("provider lookup of %s failed: %s", model, exc)
        fresh = [p for p in sorted(candidates - set(self.known)) if now - self.not_nodes.get(p, -FORGET_AFTER_S) > NOT_NODE_RECHECK_S]

        async def look(peer: str) -> None:
            record = None
            try:
                with trio.move_on_after(self.timeout_s):
                    record = await self.network.get_record(peer)
            except P2PError:
                pass  # not a node, or not now
            if record is not None and record.models:
                self.known[peer] = record
                self.seen_at[peer] = now
                self.not_nodes.pop(peer, None)
            else:
                self.not_nodes[peer] = now  # a shim or a relay: asked again after NOT_NODE_RECHECK_S

        await self._each(fresh, look)
        for peer in [p for p, t in self.seen_at.items() if now - t > FORGET_AFTER_S]:
            self.known.pop(peer, None)
            self.seen_at.pop(peer, None)
        return sorted(self.known)

    # --- probes ------------------------------------------------------------------------

    async def probe_round(self) -> None:
        from darkbloom.p2p.keys import public_key_from_peer_id
        from darkbloom.p2p.status import query_status

        async def probe(peer: str) -> None:
            up = False
            with trio.move_on_after(self.timeout_s):
                try:
                    await query_status(self.network, peer)
                    up = True
                except DarkbloomError as exc:  # unreachable or broken: down for this probe
                    log.debug("status probe of %s failed: %s", peer[-8:], exc)
            now = self.trust.clock()
            if up:
                self.seen_at[peer] = now
            record = self.known.get(peer)
            self.trust.record_probe(public_key_from_peer_id(peer).hex(), now, up=up,
                                    decode_tps=getattr(record, "decode_tps", None))

        await self._each(await self.discover(), probe)

    async def _each(self, peers: Iterable[str], step: Any) -> None:
        """`step(peer)` for every peer, at most `parallel` at once."""
        limiter = trio.CapacityLimiter(max(1, self.parallel))

        async def one(peer: str) -> None:
            async with limiter:
                await step(peer)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(one, peer)

    # --- canaries ----------------------------------------------------------------------

    def plan(self, peers: Iterable[str]) -> list[tuple[str, str, str]]:
        """(peer, model, feature) for every canaried feature a known node advertises (one model per feature)."""
        from darkbloom.api.trust.canary import CANARY_FEATURES

        out = []
        for peer in peers:
            record = self.known.get(peer)
            if record is None:
                continue
            done: set[str] = set()
            for cap in record.models:
                for feature in CANARY_FEATURES:
                    if feature in cap.features and feature not in done:
                        done.add(feature)
                        out.append((peer, cap.id, feature))
        return out

    async def canary_round(self) -> None:
        if self.meter is not None and hasattr(self.meter, "fund"):
            await self.meter.fund()
        by_peer: dict[str, list[tuple[str, str]]] = {}
        for peer, model, feature in self.plan(await self.discover()):
            by_peer.setdefault(peer, []).append((model, feature))

        async def run_for(peer: str) -> None:  # one node's canaries one after another; nodes in parallel
            for model, feature in by_peer[peer]:
                await self.canary(peer, model, feature)

        await self._each(sorted(by_peer), run_for)

    async def canary(self, peer: str, model: str, feature: str) -> bool | None:
        """Send one canary; True/False recorded, None when it could not run (busy, unreachable)."""
        from darkbloom.api.metering import open_metered
        from darkbloom.api.trust.canary import CanaryResult, make_canary, reply_from_frames
        from darkbloom.p2p.keys import public_key_from_peer_id
        from darkbloom.wire.infer import InferRequest

        record = self.known[peer]
        canary = make_canary(feature, self.rng)
        request = InferRequest(request_id=f"relay-canary-{secrets.token_hex(8)}", kind="chat", model=model,
                               params=canary.params)
        frames: list[Any] = []
        try:
            with trio.fail_after(self.timeout_s):
                meter = getattr(self.meter, "meter", self.meter)
                call = await open_metered(self.network, meter, peer, request, addrs=tuple(record.addrs),
                                          price_input_per_m=record.price_input_per_m,
                                          price_output_per_m=record.price_output_per_m)
                try:
                    while (frame := await call.receive()) is not None:
                        frames.append(frame)
                finally:
                    await call.aclose()
            result = canary.check(reply_from_frames(frames))
        except (NoCapacity, trio.TooSlowError, P2PError) as exc:
            log.info("relay canary %s to %s not run (%s)", feature, peer[-8:], type(exc).__name__)
            return None
        except DarkbloomError as exc:  # refused or broke a request for a feature it advertises
            result = CanaryResult(False, type(exc).__name__)
        self.canaries_run += 1
        self.trust.record_canary(public_key_from_peer_id(peer).hex(), feature, self.trust.clock(), ok=result.ok,
                                 reason=result.reason)
        if not result.ok:
            log.warning("node %s failed the relay's %s canary: %s", peer[-8:], feature, result.reason)
        return result.ok


class _PairStream:
    """One end of a trio memory stream pair with the PeerNetwork stream methods."""

    def __init__(self, stream: Any, peer_id: str) -> None:
        self._stream, self.peer_id = stream, peer_id

    async def read(self, n: int = 65536) -> bytes:
        return await self._stream.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def close(self) -> None:
        await self._stream.aclose()

    async def reset(self) -> None:
        await self._stream.aclose()


class SelfLedgerNetwork:
    """The relay's network, except that ledger streams to the relay itself go straight to its
    ledger service (a host cannot dial itself). Everything else is the wrapped network's."""

    def __init__(self, network: Any, service: Any, nursery: trio.Nursery) -> None:
        self._network, self._service, self._nursery = network, service, nursery

    def __getattr__(self, name: str) -> Any:
        return getattr(self._network, name)

    async def open_stream(self, peer_id: str, protocol: str, *, addrs: Iterable[str] = (), first: bytes = b"") -> Any:
        from darkbloom.wire.ledger import LEDGER_PROTOCOL

        if peer_id == self._network.peer_id and protocol == LEDGER_PROTOCOL:
            import trio.testing

            mine, theirs = trio.testing.memory_stream_pair()
            self._nursery.start_soon(self._service.handle, _PairStream(theirs, peer_id))
            stream = _PairStream(mine, peer_id)
            if first:
                await stream.write(first)
            return stream
        return await self._network.open_stream(peer_id, protocol, addrs=tuple(addrs), first=first)


class CanaryPurse:
    """Pays the relay's canaries from its own ledger account, topped up to `budget` before each round.
    Lanes reserve little (`lane_reserve`): a canary costs a few dozen tokens."""

    def __init__(self, network: SelfLedgerNetwork, identity: Any, service: Any, ledger_config: Any, *, budget: int,
                 lane_reserve: int = 10_000) -> None:
        import dataclasses

        from darkbloom.api.metering import ConsumerMeter

        self.identity, self.service, self.budget = identity, service, budget
        cfg = dataclasses.replace(ledger_config, lane_reserve=min(ledger_config.lane_reserve, lane_reserve))
        self.meter = ConsumerMeter(network, identity, cfg, ledger_peer=network.peer_id)

    async def fund(self) -> None:
        store, account = self.service.ledger.store, self.identity.public_key.hex()
        balance, _reserved = await self.service.ledger.call(store.balance, account)
        if balance < self.budget:
            await self.service.ledger.call(store.deposit, account, self.budget - balance, now_ms=self.service.now_ms())

    async def aclose(self) -> None:
        await self.meter.aclose()
