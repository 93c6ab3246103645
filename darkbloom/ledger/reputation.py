"""Reputation from settled epochs, pure: settled work, distinct paying consumers and failed spot checks -> a signed table.

For each node, over the last `window_epochs` settled epochs, with epoch weight
w(e) = 0.5 ** ((last - e) / half_life_epochs):

    consumers  = sum over distinct paying consumers c (c != node, paid > 0) of max w(e) over
                 the epochs in which c paid the node
    tokens     = sum over epochs of w(e) x completion tokens settled for the node
    evidence   = (1 - exp(-consumers / consumers_scale)) x (1 - exp(-tokens / tokens_scale))
    failures   = sum over accepted failed spot checks of w(epoch of the report)
    score      = (prior + (1 - prior) x evidence) x failure_penalty ** failures

Counting distinct *paying* consumers (each a funded ledger account paying the network fee)
rather than volume is what makes wash trading cost real money: one consumer account buying
a lot from its own node earns little. A node with no history scores `prior` (0.5, the
router's default). Inputs are the ledger's own types (EpochSummary with its NodeEpochStats,
SettlementRow); no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from darkbloom.errors import InvalidSignature
from darkbloom.identity import Identity, verify_signature
from darkbloom.wire.ledger import EpochSummary, SettlementRow, signed_bytes
from darkbloom.wire.trust import ReputationEntry, ReputationTable

__all__ = ["ReputationPolicy", "compute_reputation", "reputation_table", "sign_table", "verify_table"]

PPM = 1_000_000
_ROLE = "ledger"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReputationPolicy:
    window_epochs: int = 144  # one day of 600 s epochs
    half_life_epochs: float = 36.0
    consumers_scale: float = 5.0  # ~63% of the consumer factor at 5 distinct payers
    tokens_scale: float = 200_000.0  # ~63% of the volume factor at 200k settled completion tokens
    prior: float = 0.5
    failure_penalty: float = 0.5  # each (recent) failed spot check halves the score


class PaidRow(Protocol):
    """What reputation reads of a settled row (a SettlementRow, or the relay's folded pairs)."""

    consumer: str
    node: str
    paid: int


def _weight(policy: ReputationPolicy, last: int, epoch: int) -> float:
    return 0.5 ** ((last - epoch) / policy.half_life_epochs)


def compute_reputation(
    epochs: Iterable[tuple[EpochSummary, Sequence[SettlementRow] | Sequence[PaidRow]]],
    failed_checks: Mapping[str, Sequence[int]] = {},
    *,
    policy: ReputationPolicy = ReputationPolicy(),
    last_epoch: int | None = None,
) -> dict[str, ReputationEntry]:
    """Reputation per node from settled epochs (summary + its rows) and failed spot checks
    (node -> the epochs in which accepted reports against it arrived).

    `last_epoch` defaults to the newest epoch given; epochs outside the window are ignored.
    """
    data = sorted(epochs, key=lambda er: er[0].epoch)
    if last_epoch is None:
        last_epoch = data[-1][0].epoch if data else max((e for es in failed_checks.values() for e in es), default=0)
    first = last_epoch - policy.window_epochs + 1
    consumer_w: dict[str, dict[str, float]] = {}
    tokens_w: dict[str, float] = {}
    tokens: dict[str, int] = {}
    paid_epochs: dict[str, set[int]] = {}
    for summary, rows in data:
        e = summary.epoch
        if e < first or e > last_epoch:
            continue
        w = _weight(policy, last_epoch, e)
        for st in summary.nodes:
            tokens_w[st.node] = tokens_w.get(st.node, 0.0) + w * st.completion_tokens
            tokens[st.node] = tokens.get(st.node, 0) + st.completion_tokens
            if st.paid > 0:
                paid_epochs.setdefault(st.node, set()).add(e)
        for row in rows:
            if row.paid <= 0 or row.consumer == row.node:
                continue  # nothing paid, or a node buying from itself
            seen = consumer_w.setdefault(row.node, {})
            seen[row.consumer] = max(seen.get(row.consumer, 0.0), w)
    nodes = set(tokens_w) | set(consumer_w) | set(failed_checks)
    out: dict[str, ReputationEntry] = {}
    for node in sorted(nodes):
        consumers = consumer_w.get(node, {})
        evidence = (1 - math.exp(-sum(consumers.values()) / policy.consumers_scale)) * (
            1 - math.exp(-tokens_w.get(node, 0.0) / policy.tokens_scale)
        )
        fails = [e for e in failed_checks.get(node, ()) if first <= e <= last_epoch]
        penalty = policy.failure_penalty ** sum(_weight(policy, last_epoch, e) for e in fails)
        score = (policy.prior + (1 - policy.prior) * evidence) * penalty
        out[node] = ReputationEntry(
            node=node,
            score_ppm=max(0, min(PPM, round(score * PPM))),
            consumers=len(consumers),
            completion_tokens=tokens.get(node, 0),
            failed_checks=len(fails),
            epochs=len(paid_epochs.get(node, ())),
        )
    return out


def reputation_table(entries: Mapping[str, ReputationEntry], *, epoch: int, now_ms: int, policy: ReputationPolicy = ReputationPolicy()) -> ReputationTable:
    return ReputationTable(
        epoch=epoch,
        window_epochs=policy.window_epochs,
        computed_ms=now_ms,
        entries=tuple(entries[n] for n in sorted(entries)),
    )


def sign_table(identity: Identity, table: ReputationTable) -> ReputationTable:
    """The relay signs the table it publishes (sets `ledger` to its key)."""
    table = replace(table, ledger=identity.public_key.hex(), signature=b"")
    return replace(table, signature=identity.sign(signed_bytes(table, _ROLE)))


def verify_table(table: ReputationTable, ledger_key: str) -> None:
    """Raise InvalidSignature unless `table` is signed by `ledger_key` (hex) and names it."""
    try:
        key = bytes.fromhex(ledger_key)
    except ValueError:
        key = b""
    if table.ledger != ledger_key or len(key) != 32 or not verify_signature(key, signed_bytes(table, _ROLE), table.signature):
        raise InvalidSignature("trust.reputation", ledger_key)
