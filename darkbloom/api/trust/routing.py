"""Trust-aware routing glue: ranked candidates -> usable, canaried, reputation-ordered attempts, raced with failover and hedging, outcomes recorded.

This is the seam the shim's NetworkBackend calls (see the report in the commit history):

    stats = trusted.router_stats(peer_ids, now, backend.stats)   # reputation + TTFT from TrustBook
    ranked, reason = router.rank(candidates, stats, hints, now)
    order = trusted.order(ranked, features, now)                  # breaker, quarantine, canaries
    opened = await trusted.open(order, attempt, discard=..., is_final=..., model=...)
    ... stream opened.value (the session) ...
    trusted.finished(opened.candidate.peer_id, now, ttft_s=opened.ttft_s, tokens=..., duration_s=...)
    if trusted.want_spot_check(eligible): verdict = trusted.judge_spot_check(cand.peer_id, scores, now)

`attempt(candidate)` is the backend's own "connect, get Accepted and the first content frame"
(NetworkBackend._attempt); `discard(session)` closes a session nobody will read. Failures
are classified once here into the error kinds TrustBook counts; a busy answer (NoCapacity)
is load, not unreliability, so it neither opens a breaker nor lowers reputation.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import trio

from darkbloom.api.router import PeerStats
from darkbloom.api.trust.canary import CanaryBook
from darkbloom.api.trust.hedge import HedgeOutcome, HedgePolicy, hedge_delay, race
from darkbloom.api.trust.reputation_mix import TrustBook
from darkbloom.api.trust.verify import DEFAULT_POLICY, PolicySet, ScoredOutput, Verdict, VerifyPolicy, judge, should_spot_check
from darkbloom.errors import DarkbloomError, NoCapacity, PeerUnreachable, ProtocolMismatch, StreamClosed
from darkbloom.wire.trust import ReputationTable

__all__ = ["BreakerRefused", "Opened", "TrustedRouting", "failure_kind"]

log = logging.getLogger(__name__)
S = TypeVar("S")


class BreakerRefused(DarkbloomError):
    """The peer's breaker (or quarantine) refused the attempt at the last moment; try another."""

    def __init__(self, peer_id: str) -> None:
        super().__init__(f"peer {peer_id[-8:]} is circuit-broken")
        self.peer_id = peer_id


def failure_kind(exc: BaseException) -> str | None:
    """The error kind TrustBook records for a failed attempt; None when it is not the peer's fault."""
    if isinstance(exc, (NoCapacity, BreakerRefused)):
        return None
    if isinstance(exc, trio.TooSlowError):
        return "timeout_first_token"
    if isinstance(exc, PeerUnreachable):
        return "unreachable"
    if isinstance(exc, StreamClosed):
        return "stream_closed"
    if isinstance(exc, ProtocolMismatch):
        return "protocol"
    return type(exc).__name__


@dataclass(frozen=True, slots=True)
class Opened(Generic[S]):
    outcome: HedgeOutcome[S]
    candidate: Any | None  # the winner's candidate; None when every attempt failed
    ttft_s: float | None  # the winning attempt's own time to first token

    @property
    def value(self) -> S | None:
        return self.outcome.value


@dataclass(slots=True)
class TrustedRouting:
    book: TrustBook = field(default_factory=TrustBook)
    canaries: CanaryBook = field(default_factory=CanaryBook)
    hedge: HedgePolicy = field(default_factory=HedgePolicy)
    verify_policy: VerifyPolicy = DEFAULT_POLICY  # used when the request's temperature is not given
    policies: PolicySet | None = None  # per-temperature policies (verify.DEFAULT_POLICIES for SmolLM2)
    spot_check_probability: float = 0.0
    max_attempts: int = 3
    rng: random.Random = field(default_factory=random.Random)
    relay_classes: dict[str, str] = field(default_factory=dict)  # peer id -> class the relay derived (its table)

    def router_stats(self, peer_ids: Iterable[str], now: float, base: dict[str, PeerStats] | None = None) -> dict[str, PeerStats]:
        """PeerStats for router.rank with this book's mixed reputation and TTFT EWMA filled in
        (load and in-flight counts kept from `base`, the backend's own PeerStats)."""
        out: dict[str, PeerStats] = {}
        for pid in peer_ids:
            old = (base or {}).get(pid)
            st = PeerStats() if old is None else replace(old)
            st.reputation = self.book.reputation(pid, now)
            p = self.book.peers.get(pid)
            if p is not None and p.stats.ttft_s is not None:
                st.latency_s = p.stats.ttft_s
            out[pid] = st
        return out

    def order(self, ranked: Sequence[Any], features: Iterable[str], now: float) -> list[Any]:
        """The router's order (ranked with `router_stats`), keeping only peers whose breaker and
        quarantine allow a request and that passed the canaries `features` need."""
        feats = list(features)
        return [c for c in ranked if self.book.usable(c.peer_id, now) and self.canaries.eligible(c.peer_id, feats, now)]

    def canaries_needed(self, ranked: Sequence[Any], features: Iterable[str], now: float) -> dict[str, list[str]]:
        """peer -> features to canary before it may take such requests (send these first)."""
        feats = list(features)
        out = {c.peer_id: self.canaries.needed(c.peer_id, feats, now) for c in ranked}
        return {p: f for p, f in out.items() if f}

    async def open(
        self,
        order: Sequence[Any],
        attempt: Callable[[Any], Awaitable[S]],
        *,
        discard: Callable[[S], Awaitable[None]],
        is_final: Callable[[Exception], bool],
        model: str,
    ) -> Opened[S]:
        """Try peers in `order` (at most max_attempts), failing over on errors and hedging
        after the p95 TTFT when enabled. Records every failure; the winner's success is
        recorded by `finished` when its answer is complete."""
        cands = list(order[: max(1, self.max_attempts)])
        started: dict[int, float] = {}

        def make(i: int, cand: Any) -> Callable[[], Awaitable[S]]:
            async def go() -> S:
                now = trio.current_time()
                if not self.book.allow(cand.peer_id, now):
                    raise BreakerRefused(cand.peer_id)
                started[i] = now
                return await attempt(cand)

            return go

        delay = hedge_delay(self.hedge, self.book.ttft_window(model)._samples)
        out = await race(
            [make(i, c) for i, c in enumerate(cands)],
            delay_s=delay,
            discard=discard,
            is_final=is_final,
            max_parallel=2 if self.hedge.enabled else 1,
        )
        now = trio.current_time()
        for i, exc in out.failures:
            kind = failure_kind(exc)
            if kind is not None:
                self.book.record_failure(cands[i].peer_id, now, kind)
                log.warning("peer %s failed before the first token (%s)", cands[i].peer_id[-8:], kind)
            else:
                self.book.record_cancelled(cands[i].peer_id)
        for i in out.cancelled:
            self.book.record_cancelled(cands[i].peer_id)
        if out.winner is None:
            return Opened(out, None, None)
        ttft = now - started.get(out.winner, now)
        self.book.ttft_window(model).add(ttft)  # the attempt's own TTFT, not including the hedge wait
        return Opened(out, cands[out.winner], ttft)

    def finished(self, peer_id: str, now: float, *, ttft_s: float | None, tokens: int = 0, duration_s: float | None = None) -> None:
        """The request streamed to its end: a success with its TTFT and per-token time
        (`duration_s` from the winning attempt's start to the last token)."""
        self.book.record_success(peer_id, now, ttft_s=ttft_s, tokens=tokens, duration_s=duration_s)

    def failed_midstream(self, peer_id: str, now: float, kind: str = "stream_closed") -> None:
        self.book.record_failure(peer_id, now, kind)

    def apply_table(self, table: ReputationTable, now: float) -> bool:
        """Take the relay's verified reputation table: ledger scores into the book, capability
        canaries the relay saw a node fail bar that feature here too, derived classes kept in
        `relay_classes` (peer id -> class). False when the table is not newer than the last."""
        from darkbloom.api.trust.canary import CanaryResult
        from darkbloom.p2p.keys import peer_id_from_public_key

        peer_of_key = {}
        for e in table.entries:
            try:
                peer_of_key[e.node] = peer_id_from_public_key(bytes.fromhex(e.node))
            except ValueError:
                continue  # not a key: nothing can route to it
        if not self.book.apply_table(table, peer_of_key):
            return False
        for e in table.entries:
            pid = peer_of_key.get(e.node)
            if pid is None:
                continue
            for feature in e.failed_features:
                if self.canaries.status(pid, feature, now) != "failed":
                    self.canaries.record(pid, feature, CanaryResult(False, "failed the relay's canary"), now)
            if e.node_class:
                self.relay_classes[pid] = e.node_class
        return True

    def with_observed_classes(self, cands: Sequence[Any]) -> list[Any]:
        """Candidates with the class the relay derived from uptime and speed in place of the one
        their records declare (declared classes are not trusted); unchanged where the relay has
        not observed a node yet."""
        return [replace(c, node_class=self.relay_classes[c.peer_id]) if c.peer_id in self.relay_classes else c
                for c in cands]

    def want_spot_check(self, eligible: bool) -> bool:
        return should_spot_check(self.spot_check_probability, self.rng, eligible=eligible)

    def policy_for(self, temperature: float | None) -> VerifyPolicy:
        if temperature is None or self.policies is None:
            return self.verify_policy
        return self.policies.for_temperature(temperature)

    def judge_spot_check(self, peer_id: str, scored: ScoredOutput, now: float, *, temperature: float | None = None,
                         verifier: str = "", digest: str = "") -> Verdict:
        """Judge a verifier's scores of `peer_id`'s output. Pass the request's `temperature`
        (OpenAI default 1.0 when absent) so greedy and low-temperature answers get the
        stricter policies. Pass the `verifier`'s peer id so a cheating verifier's flags can be
        discounted (TrustBook.record_spot_check), and the weights `digest` the node served, so
        the check's e-value adds to that (node, digest)'s accumulated evidence. The verdict
        returned is flagged with reason "accumulated_evalue" when this check passed but the
        accumulated evidence reached the threshold (same consequences as a failed check)."""
        policy = self.policy_for(temperature)
        verdict = self.book.record_spot_check(peer_id, now, judge(scored, policy), verifier=verifier, digest=digest)
        if verdict.reason == "accumulated_evalue":
            log.warning("peer %s flagged on accumulated spot-check evidence (ln E %.2f over %d checks)", peer_id[-8:],
                        verdict.accumulated_log_evalue, verdict.accumulated_checks)
        elif verdict.flagged:
            log.warning("peer %s failed a spot check (%s, mean logprob %.2f, %d/%d outside top-%d)", peer_id[-8:],
                        verdict.reason, verdict.mean_logprob, verdict.outside_top_k, verdict.tokens, policy.top_k)
        return verdict

