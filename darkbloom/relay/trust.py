"""The relay's trust service: reputation computed and signed after every settled epoch, spot-check report intake, and the relay's own node observations.

`RelayTrust` is mounted on the ledger service (`LedgerService.extra` handlers and
`on_settled` hooks, see `attach`):

- after each epoch closes, `publish()` reads the settled epochs of the window (summaries
  and rows, cached: settled epochs never change), the counted spot-check failures
  (`relay.intake.TrustStore`) and computes `ledger.reputation.compute_reputation`; it adds
  what the relay itself observed (capability canaries a node failed, uptime and the class
  derived from it) and signs the table with the ledger's key;
- `ReputationQuery` returns that table; `SpotCheckReport` is checked (`relay.intake.admit`),
  stored, and when it counts, the table is republished at once (same epoch, newer
  `computed_ms`) so shims stop routing to the node before the next epoch.

Observations come from `relay.probe` (status probes for uptime, canaries for features) or
from tests through `record_probe` / `record_canary`; every method takes or reads `now`.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from darkbloom.api.trust.classes import ClassPolicy, UptimeTracker, classify
from darkbloom.errors import EvidenceRejected, InvalidSignature, LedgerError
from darkbloom.identity import Identity
from darkbloom.ledger.reputation import PPM, ReputationPolicy, compute_reputation, reputation_table, sign_table
from darkbloom.ledger.service import AsyncLedger, LedgerService
from darkbloom.relay.intake import IntakePolicy, TrustStore, admit, reporter_had_lane
from darkbloom.wire.ledger import EpochSummary, SettlementRow
from darkbloom.wire.reputation import ReputationQuery, ReputationReply, SpotCheckAck
from darkbloom.wire.trust import ReputationEntry, ReputationTable, SpotCheckReport

__all__ = ["NodeObservations", "RelayTrust"]

log = logging.getLogger(__name__)

PAGE_ENTRIES = 2000  # entries per reply page (~150 bytes each: well inside the 1 MiB frame)


@dataclass(slots=True)
class NodeObservations:
    """What the relay saw of one node (keyed by its hex public key)."""

    uptime: UptimeTracker = field(default_factory=UptimeTracker)
    decode_tps: float = 0.0
    canaries: dict[str, tuple[bool, float, str]] = field(default_factory=dict)  # feature -> (ok, at, reason)


@dataclass(frozen=True, slots=True)
class PaidPair:
    """What reputation needs of an epoch's rows: one entry per (consumer, node) with the total paid."""

    consumer: str
    node: str
    paid: int


def _paying_pairs(rows: list[SettlementRow]) -> list[PaidPair]:
    """An epoch's rows folded to distinct (consumer, node) pairs: the window held in memory stays
    the size of the paying relationships, not of the vouchers settled."""
    totals: dict[tuple[str, str], int] = {}
    for r in rows:
        totals[(r.consumer, r.node)] = totals.get((r.consumer, r.node), 0) + r.paid
    return [PaidPair(c, n, p) for (c, n), p in sorted(totals.items())]


class RelayTrust:
    """Reputation publisher and spot-check intake of one relay."""

    def __init__(
        self,
        ledger: AsyncLedger,
        identity: Identity,
        store: TrustStore,
        *,
        policy: ReputationPolicy = ReputationPolicy(),
        intake: IntakePolicy = IntakePolicy(),
        class_policy: ClassPolicy = ClassPolicy(),
        canary_fail_ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.identity = identity
        self.store = store
        self.policy = policy
        self.intake = intake
        self.class_policy = class_policy
        self.canary_fail_ttl_s = canary_fail_ttl_s
        self.clock = clock
        self.table: ReputationTable | None = None
        self.observed: dict[str, NodeObservations] = {}
        self.reports_counted = 0
        self.reports_refused = 0
        self.published = trio.Event()  # set after each publish (a fresh Event replaces it)
        self._epochs: dict[int, tuple[EpochSummary, list[PaidPair]]] = {}
        self._lock = trio.Lock()

    def attach(self, service: LedgerService) -> None:
        """Mount on the ledger service: answer the trust requests and publish after each epoch."""
        service.extra[ReputationQuery] = self.handle_query
        service.extra[SpotCheckReport] = self.handle_report
        service.on_settled.append(self._after_epoch)

    async def _after_epoch(self, _outcome: object) -> None:
        try:
            await self.publish()
        except (sqlite3.Error, LedgerError) as exc:  # the last table stays published; the next epoch tries again
            log.error("reputation table not published: %s", exc)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # --- observations ----------------------------------------------------------------

    def _obs(self, node: str) -> NodeObservations:
        o = self.observed.get(node)
        if o is None:
            o = self.observed[node] = NodeObservations()
        return o

    def record_probe(self, node: str, now: float, *, up: bool, decode_tps: float | None = None) -> None:
        """A status probe of `node` (hex key) answered (`up`) or not; `decode_tps` from its record."""
        o = self._obs(node)
        o.uptime.record(now, up)
        if decode_tps is not None and decode_tps > 0:
            o.decode_tps = decode_tps

    def record_canary(self, node: str, feature: str, now: float, *, ok: bool, reason: str = "") -> None:
        self._obs(node).canaries[feature] = (ok, now, reason)

    def failed_features(self, node: str, now: float) -> tuple[str, ...]:
        o = self.observed.get(node)
        if o is None:
            return ()
        return tuple(sorted(f for f, (ok, at, _) in o.canaries.items() if not ok and now - at < self.canary_fail_ttl_s))

    def node_class(self, node: str, now: float) -> tuple[str, int]:
        """(class, uptime ppm) from the relay's probes; ("", -1) when it never probed the node."""
        o = self.observed.get(node)
        if o is None or o.uptime.observed_s(now, self.class_policy.day_s) <= 0:
            return "", -1
        share = o.uptime.uptime(now, self.class_policy.day_s)
        return classify(o.decode_tps, o.uptime, now, self.class_policy), -1 if share is None else round(share * PPM)

    # --- publishing --------------------------------------------------------------------

    async def _window(self) -> list[tuple[EpochSummary, list[PaidPair]]]:
        store = self.ledger.store
        last = await self.ledger.call(store.summary, 0)
        if last is None:
            return []
        first = max(1, last.epoch - self.policy.window_epochs + 1)
        for e in range(first, last.epoch + 1):
            if e not in self._epochs:
                summary = last if e == last.epoch else await self.ledger.call(store.summary, e)
                if summary is not None:
                    self._epochs[e] = (summary, _paying_pairs(await self.ledger.call(store.rows, e)))
        for e in [e for e in self._epochs if e < first]:
            del self._epochs[e]
        return [self._epochs[e] for e in sorted(self._epochs)]

    async def last_epoch(self) -> int:
        last = await self.ledger.call(self.ledger.store.summary, 0)
        return 0 if last is None else last.epoch

    async def publish(self) -> ReputationTable:
        """Compute, sign and keep the table from the settled window and the relay's observations."""
        async with self._lock:
            me = self.identity.public_key.hex()  # the relay's own canaries pay nodes: not a consumer that counts
            data = [(summary, [r for r in rows if r.consumer != me]) for summary, rows in await self._window()]
            last = data[-1][0].epoch if data else 0
            first = max(0, last - self.policy.window_epochs + 1)
            failed = await trio.to_thread.run_sync(self.store.failed_checks, first)
            entries = compute_reputation(data, failed, policy=self.policy, last_epoch=last)
            now = self.clock()
            for node in set(self.observed) - set(entries):  # observed only: the prior, plus what was seen
                entries[node] = ReputationEntry(node=node, score_ppm=round(self.policy.prior * PPM), consumers=0,
                                                completion_tokens=0, failed_checks=0, epochs=0)
            for node, entry in list(entries.items()):
                cls, uptime = self.node_class(node, now)
                entries[node] = replace(entry, failed_features=self.failed_features(node, now), node_class=cls, uptime_ppm=uptime)
            # computed_ms only grows, so a republished table within one epoch is always "newer" to shims
            now_ms = max(self.now_ms(), self.table.computed_ms + 1 if self.table is not None else 0)
            table = sign_table(self.identity, reputation_table(entries, epoch=last, now_ms=now_ms, policy=self.policy))
            self.table = table
            event, self.published = self.published, trio.Event()
            event.set()
        log.info("reputation table for epoch %d published: %d nodes", table.epoch, len(table.entries))
        return table

    # --- requests ----------------------------------------------------------------------

    async def handle_query(self, request: ReputationQuery) -> ReputationReply:
        """The table, or the page / the one entry asked for (each a table the relay signs)."""
        if self.table is None:
            await self.publish()
        table = self.table
        assert table is not None
        if request.node:
            return ReputationReply(table=sign_table(self.identity, replace(
                table, entries=tuple(e for e in table.entries if e.node == request.node))))
        rest = [e for e in table.entries if e.node > request.after] if request.after else list(table.entries)
        if not request.after and len(rest) <= PAGE_ENTRIES:
            return ReputationReply(table=table)
        page = tuple(rest[:PAGE_ENTRIES])
        return ReputationReply(table=sign_table(self.identity, replace(table, entries=page)), more=len(rest) > len(page))

    async def handle_report(self, report: SpotCheckReport) -> SpotCheckAck:
        """Check the evidence; store it; count it at most once per reporter, suspect and epoch."""
        try:
            accepted, verdict = admit(report, now_ms=self.now_ms(), policy=self.intake)
        except (EvidenceRejected, InvalidSignature) as exc:  # refused with its reason; the stream goes on
            self.reports_refused += 1
            log.info("spot-check report on %s from %s refused: %s", report.suspect[:8], report.reporter[:8], exc)
            raise
        if self.intake.require_lane and not await self.ledger.call(reporter_had_lane, self.ledger.store, accepted.reporter,
                                                                     accepted.suspect):
            self.reports_refused += 1
            raise EvidenceRejected(accepted.suspect, "the reporter never opened a lane with this node at this ledger")
        epoch = await self.last_epoch()
        counted = await trio.to_thread.run_sync(lambda: self.store.add(accepted, report, epoch=epoch))
        if counted:
            self.reports_counted += 1
            log.warning("node %s failed a spot check (%s), reported by %s", accepted.suspect[:8], verdict.reason, accepted.reporter[:8])
            await self.publish()
        return SpotCheckAck(suspect=accepted.suspect, reason=verdict.reason, counted=counted, epoch=epoch)

    def status(self) -> dict[str, Any]:
        t = self.table
        return {
            "reputation_epoch": None if t is None else t.epoch,
            "reputation_nodes": 0 if t is None else len(t.entries),
            "spot_checks_counted": self.reports_counted,
            "spot_checks_refused": self.reports_refused,
        }
