"""What the shim believes about each peer, pure: the relay's signed reputation mixed with this shim's live statistics, breaker and spot-check flags.

    reputation(peer, now) = ledger_score                       (relay table; prior 0.5 if absent)
                          x success_rate(now) ** success_power  (decayed live outcomes)
                          x flag_penalty ** local_flags         (spot checks this shim failed it on)

A local flag is a failed spot check, or the accumulated evidence of its checks reaching
1/alpha (accumulate.EvidenceBook, per node and weights digest). A peer is usable when its
breaker lets a request through, it is not quarantined (a flag quarantines it for `quarantine_s`, doubling per further flag) and, for requests
needing tools / JSON / logprobs, it passed that capability's canary recently
(canary.CanaryBook). The router multiplies `reputation` into its score; everything takes
`now` (trio.current_time()).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from darkbloom.api.trust.accumulate import EvidenceBook
from darkbloom.api.trust.breaker import BreakerPolicy, CircuitBreaker
from darkbloom.api.trust.stats import LatencyWindow, PeerLiveStats, StatsPolicy
from darkbloom.api.trust.verify import Verdict
from darkbloom.wire.trust import ReputationTable

__all__ = ["MixPolicy", "PeerTrust", "TrustBook"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MixPolicy:
    prior: float = 0.5  # ledger score of a peer the relay's table does not list
    success_power: float = 2.0  # a 70%-reliable peer keeps 0.49 of its score
    flag_penalty: float = 0.05  # per spot check this shim saw it fail
    quarantine_s: float = 600.0  # first quarantine after a failed spot check; doubles per flag
    max_quarantine_s: float = 86_400.0
    floor: float = 1e-4  # never exactly 0: with nobody else left a peer may still serve


@dataclass(slots=True)
class PeerTrust:
    stats: PeerLiveStats
    breaker: CircuitBreaker
    ledger_score: float | None = None  # from the relay's table, 0..1
    local_flags: int = 0
    quarantined_until: float = -math.inf
    checks_passed: int = 0
    flagged_by: list[str] = field(default_factory=list)  # verifier of each standing flag ("" unknown)


@dataclass(slots=True)
class TrustBook:
    policy: MixPolicy = field(default_factory=MixPolicy)
    breaker_policy: BreakerPolicy = field(default_factory=BreakerPolicy)
    stats_policy: StatsPolicy = field(default_factory=StatsPolicy)
    peers: dict[str, PeerTrust] = field(default_factory=dict)
    ttfts: dict[str, LatencyWindow] = field(default_factory=dict)  # model -> recent TTFTs over all peers
    evidence: EvidenceBook = field(default_factory=EvidenceBook)  # per-(node, digest) e-detectors over checks
    table_epoch: int = -1
    table_computed_ms: int = -1

    def peer(self, peer_id: str) -> PeerTrust:
        p = self.peers.get(peer_id)
        if p is None:
            p = self.peers[peer_id] = PeerTrust(PeerLiveStats(self.stats_policy), CircuitBreaker(self.breaker_policy))
        return p

    # --- questions -------------------------------------------------------------------

    def usable(self, peer_id: str, now: float) -> bool:
        """Read-only, for ranking: breaker available and not quarantined."""
        p = self.peers.get(peer_id)
        return p is None or (p.breaker.available(now) and now >= p.quarantined_until)

    def allow(self, peer_id: str, now: float) -> bool:
        """Right before sending: claims the half-open probe when the breaker is recovering."""
        p = self.peer(peer_id)
        return now >= p.quarantined_until and p.breaker.allow(now)

    def reputation(self, peer_id: str, now: float) -> float:
        p = self.peers.get(peer_id)
        if p is None:
            return self.policy.prior
        ledger = self.policy.prior if p.ledger_score is None else p.ledger_score
        live = p.stats.success_rate(now) ** self.policy.success_power
        value = ledger * live * self.policy.flag_penalty**p.local_flags
        return max(self.policy.floor, min(1.0, value))

    def ttft_window(self, model: str) -> LatencyWindow:
        w = self.ttfts.get(model)
        if w is None:
            w = self.ttfts[model] = LatencyWindow()
        return w

    # --- events ----------------------------------------------------------------------

    def record_success(self, peer_id: str, now: float, *, model: str = "", ttft_s: float | None = None,
                       tokens: int = 0, duration_s: float | None = None) -> None:
        p = self.peer(peer_id)
        p.stats.record_success(now, ttft_s=ttft_s, tokens=tokens, duration_s=duration_s)
        p.breaker.record_success(now)
        if model and ttft_s is not None and math.isfinite(ttft_s) and ttft_s >= 0:
            self.ttft_window(model).add(ttft_s)

    def record_failure(self, peer_id: str, now: float, kind: str) -> None:
        """A failure the peer is responsible for (unreachable, timeout, broken stream, bad output).
        Not for "busy" answers (NoCapacity): those are load, not unreliability."""
        p = self.peer(peer_id)
        p.stats.record_failure(now, kind)
        p.breaker.record_failure(now)

    def record_cancelled(self, peer_id: str) -> None:
        """A hedge loser or a client that went away: no outcome, but free a half-open probe."""
        p = self.peers.get(peer_id)
        if p is not None:
            p.breaker.release_probe()

    def record_spot_check(self, peer_id: str, now: float, verdict: Verdict, *, verifier: str = "",
                          digest: str = "") -> Verdict:
        """A verifier's verdict on `peer_id`'s answer (served with weights `digest`); returns the
        verdict that counts: the same one, or, when the check passed but the node's accumulated
        evidence reached the threshold (accumulate.EvidenceBook), a flag with reason
        "accumulated_evalue" and the accumulated ln e-value and check count filled in.

        The verifier may itself be the cheat (it serves the same digest, and a node running
        other weights scores honest tokens badly). So a flag from a verifier that is flagged
        itself is ignored (and its checks do not accumulate), and when a node gets flagged, the
        flags it raised as a verifier against peers nobody else flagged are withdrawn (their
        quarantine lifted) and its scores leave the others' accumulated evidence."""
        p = self.peer(peer_id)
        if verdict.inconclusive:
            return verdict
        if verifier and verifier in self.peers and self.peers[verifier].local_flags > 0:
            return verdict  # a flagged node's opinion of others does not count
        crossed = False
        if verdict.check_log_evalue != 0.0:  # exactly 0: greedy or no sampled statistics (E = 1, nothing to add)
            log_s, n, crossed = self.evidence.add(peer_id, digest, verdict.check_log_evalue, verifier=verifier)
        if not verdict.flagged:
            p.checks_passed += 1
            if not crossed:
                return verdict
            verdict = replace(verdict, flagged=True, reason="accumulated_evalue", accumulated_log_evalue=log_s,
                              accumulated_checks=n)
        self._flag(peer_id, now, verifier)
        return verdict

    def _flag(self, peer_id: str, now: float, verifier: str) -> None:
        p = self.peer(peer_id)
        p.local_flags += 1
        p.flagged_by.append(verifier)
        p.stats.record_failure(now, "spot_check_failed")
        q = min(self.policy.max_quarantine_s, self.policy.quarantine_s * 2 ** (p.local_flags - 1))
        p.quarantined_until = max(p.quarantined_until, now + q)
        self.evidence.drop_verifier(peer_id)
        for other_id, other in self.peers.items():  # withdraw what the newly flagged node said as verifier
            if other_id == peer_id or peer_id not in other.flagged_by:
                continue
            other.flagged_by = [v for v in other.flagged_by if v != peer_id]
            other.local_flags = len(other.flagged_by)
            if other.local_flags == 0:
                other.quarantined_until = -math.inf

    def apply_table(self, table: ReputationTable, peer_of_key: dict[str, str] | None = None) -> bool:
        """Take a (verified: ledger.reputation.verify_table) relay table; older tables are ignored
        (ordered by epoch, then by `computed_ms`: the relay republishes within an epoch when a
        spot-check report counts). `peer_of_key` maps node public keys (hex) to the peer ids
        routing uses; identity when None."""
        if (table.epoch, table.computed_ms) <= (self.table_epoch, self.table_computed_ms):
            return False
        self.table_epoch, self.table_computed_ms = table.epoch, table.computed_ms
        for e in table.entries:
            pid = (peer_of_key or {}).get(e.node, e.node)
            self.peer(pid).ledger_score = e.score_ppm / 1_000_000
        return True

    def _evidence_of(self, peer_id: str) -> float | None:
        """The largest accumulated ln e-value over the digests `peer_id` served (None: none yet)."""
        vals = [ev.log_s for (n, _), ev in self.evidence.nodes.items() if n == peer_id and ev.k > 0]
        return round(max(vals), 3) if vals else None

    def snapshot(self, peer_ids: Iterable[str], now: float) -> dict[str, dict[str, object]]:
        """For status pages and logs (no request content)."""
        out: dict[str, dict[str, object]] = {}
        for pid in peer_ids:
            p = self.peers.get(pid)
            if p is None:
                continue
            out[pid] = {
                "reputation": round(self.reputation(pid, now), 4),
                "success_rate": round(p.stats.success_rate(now), 4),
                "ttft_s": p.stats.ttft_s,
                "per_token_s": p.stats.per_token_s,
                "breaker": p.breaker.state(now),
                "errors": dict(p.stats.errors),
                "flags": p.local_flags,
                "evidence_log_e": self._evidence_of(pid),
                "quarantined": now < p.quarantined_until,
            }
        return out
