"""Spot-check report intake on the relay: check the evidence (pure), keep what holds (SQLite), give reputation its failed checks.

A shim that flagged a node sends a `SpotCheckReport` (darkbloom.wire.trust) carrying the
suspect's signed `OutputAttestation` and the verifier's signed `ScoreAttestation`.
`admit` refuses, with a reason, anything that proves nothing:

- a report not signed by its reporter, or whose attestations are not signed by the node
  and the verifier they name (`InvalidSignature`);
- a node reporting itself, a node verifying itself, attestations about different work,
  scores that do not cover the output, a report or output too old or from the future, or
  signed scores that pass the relay's own policy (`EvidenceRejected`).

The reporter must also have opened a lane with the suspect at this ledger (`require_lane`):
keys cost nothing to make, a funded lane does.

The relay judges with its own `VerifyPolicy` (by default the loosest shipped policy, safe
for every sampling temperature), never the one the report names. What it cannot check is
the scores themselves (it never sees the prompt), so `TrustStore` counts at most one
failure per (suspect, reporter, epoch): one shim colluding with one verifier can cost a
node one failure per epoch, not an unbounded number. Storage is a small SQLite file next to
the ledger (reports are evidence: they survive restarts); calls run on the caller's thread.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from darkbloom.api.trust.evidence import check_report
from darkbloom.api.trust.verify import DEFAULT_POLICY, Verdict, VerifyPolicy
from darkbloom.errors import EvidenceRejected, InvalidSignature, MalformedMessage
from darkbloom.wire.codec import decode, encode
from darkbloom.wire.trust import OutputAttestation, ScoreAttestation, SpotCheckReport

__all__ = ["RELAY_POLICY", "Accepted", "IntakePolicy", "TrustStore", "admit", "merge_failures", "reporter_had_lane"]

DAY_MS = 86_400_000
# The shim's default policy, plus the raw mean-logprob rule at the level calibrated safe for every
# sampling temperature on SmolLM2 (-8.07 nats/token), so evidence from verifiers that send only
# logprobs and ranks is judged too.
RELAY_POLICY = replace(DEFAULT_POLICY, min_mean_logprob=-8.07)


@dataclass(frozen=True, slots=True, kw_only=True)
class IntakePolicy:
    max_age_ms: int = DAY_MS  # a report (and the output it is about) older than this is refused
    max_skew_ms: int = 5 * 60 * 1000  # ... and one dated further in the future than this
    verify: VerifyPolicy = field(default_factory=lambda: RELAY_POLICY)  # the relay's own judgement of the signed scores
    # The reporter must be a ledger account that opened a lane with the suspect (a consumer of its
    # service): reporter keys are free to make, funded lanes are not.
    require_lane: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Accepted:
    """A report whose evidence holds."""

    suspect: str
    reporter: str
    verifier: str
    output_hash: bytes
    reason: str
    time_ms: int


def _is_key(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def admit(report: SpotCheckReport, *, now_ms: int, policy: IntakePolicy = IntakePolicy()) -> tuple[Accepted, Verdict]:
    """Check a report's evidence; raise InvalidSignature or EvidenceRejected (with the reason)."""
    suspect = report.suspect
    if not _is_key(report.reporter) or not _is_key(suspect):
        raise EvidenceRejected(suspect, "reporter and suspect must be hex public keys")
    if report.reporter == suspect:
        raise EvidenceRejected(suspect, "a node cannot report itself")
    if not report.signature:
        raise EvidenceRejected(suspect, "the report is not signed")
    if report.time_ms < now_ms - policy.max_age_ms:
        raise EvidenceRejected(suspect, f"the report is older than {policy.max_age_ms // 1000}s")
    if report.time_ms > now_ms + policy.max_skew_ms:
        raise EvidenceRejected(suspect, "the report is dated in the future")
    try:
        verdict = check_report(report, policy.verify)
        output = decode(report.output, OutputAttestation)
        score_verifier = decode(report.score, ScoreAttestation).verifier
    except InvalidSignature:
        raise  # forged or unsigned attestation: the caller answers with InvalidSignature
    except MalformedMessage as exc:
        raise EvidenceRejected(suspect, exc.reason) from None
    if output.time_ms < now_ms - policy.max_age_ms or output.time_ms > now_ms + policy.max_skew_ms:
        raise EvidenceRejected(suspect, "the attested output is too old or dated in the future")
    if score_verifier == report.reporter:
        raise EvidenceRejected(suspect, "the reporter cannot be its own verifier")
    return (
        Accepted(suspect=suspect, reporter=report.reporter, verifier=score_verifier, output_hash=output.output_hash,
                 reason=verdict.reason, time_ms=report.time_ms),
        verdict,
    )


_SCHEMA = """
CREATE TABLE IF NOT EXISTS spot_checks (
    suspect TEXT NOT NULL,
    reporter TEXT NOT NULL,
    output_hash BLOB NOT NULL,
    epoch INTEGER NOT NULL,
    counted INTEGER NOT NULL,
    verifier TEXT NOT NULL,
    reason TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    report BLOB NOT NULL,
    PRIMARY KEY (suspect, reporter, output_hash)
);
CREATE INDEX IF NOT EXISTS spot_checks_epoch ON spot_checks (epoch);
"""


class TrustStore:
    """Accepted spot-check reports, one SQLite file (WAL). Thread-safe through one lock."""

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, accepted: Accepted, report: SpotCheckReport, *, epoch: int) -> bool:
        """Keep the report; True when it counts as a failure (not a duplicate of this output, and
        the first from this reporter against this suspect in `epoch`)."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                cur = db.execute("SELECT 1 FROM spot_checks WHERE suspect=? AND reporter=? AND output_hash=?",
                                 (accepted.suspect, accepted.reporter, accepted.output_hash))
                if cur.fetchone() is not None:
                    db.execute("COMMIT")
                    return False
                cur = db.execute("SELECT 1 FROM spot_checks WHERE suspect=? AND reporter=? AND epoch=? AND counted=1",
                                 (accepted.suspect, accepted.reporter, epoch))
                counted = cur.fetchone() is None
                db.execute(
                    "INSERT INTO spot_checks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (accepted.suspect, accepted.reporter, accepted.output_hash, epoch, int(counted), accepted.verifier,
                     accepted.reason, accepted.time_ms, encode(report)),
                )
                db.execute("COMMIT")
            except Exception:  # undo the half-written step, then let the error propagate
                db.execute("ROLLBACK")
                raise
            return counted

    def failed_checks(self, first_epoch: int = 0) -> dict[str, list[int]]:
        """suspect -> the epoch of each counted failure from `first_epoch` on (input to compute_reputation)."""
        with self._lock:
            rows = self._db.execute("SELECT suspect, epoch FROM spot_checks WHERE counted=1 AND epoch>=? ORDER BY epoch",
                                    (first_epoch,)).fetchall()
        out: dict[str, list[int]] = {}
        for suspect, epoch in rows:
            out.setdefault(suspect, []).append(int(epoch))
        return out

    def reports(self, suspect: str) -> list[SpotCheckReport]:
        """The stored evidence against `suspect` (for audits), oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT report FROM spot_checks WHERE suspect=? ORDER BY time_ms", (suspect,)).fetchall()
        return [decode(bytes(r[0]), SpotCheckReport) for r in rows]


def reporter_had_lane(store: Any, reporter: str, suspect: str, *, lookback: int = 1000) -> bool:
    """Did `reporter` reserve a lane with `suspect` among its last `lookback` journal entries? (store I/O: run on
    the ledger's worker thread)."""
    for entry in store.history(reporter, lookback):
        if entry.kind == "reserve":
            lane = store.lane(entry.ref)
            if lane is not None and lane.node == suspect and lane.consumer == reporter:
                return True
    return False


def merge_failures(*sources: Mapping[str, list[int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for src in sources:
        for node, epochs in src.items():
            out.setdefault(node, []).extend(epochs)
    return out
