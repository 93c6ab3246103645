"""Requests of the relay's trust service on `/darkbloom/ledger/1.0.0`: fetch the signed reputation table, report a failed spot check.

These ride on the ledger protocol (the relay that settles epochs is the one that computes
and signs reputation), next to the requests in `darkbloom.wire.ledger`:

- `ReputationQuery` -> `ReputationReply`: anyone; the table is signed by the ledger's key
  (verify with `darkbloom.ledger.reputation.verify_table`), so who relays it does not matter.
- `SpotCheckReport` (darkbloom.wire.trust) -> `SpotCheckAck`: a shim reports a node it
  flagged; the relay checks the evidence (`darkbloom.ledger.intake`) and answers with the
  outcome, or a `LedgerErrorReply` (code "EvidenceRejected" / "InvalidSignature") saying why.
"""

from __future__ import annotations

from dataclasses import dataclass

from darkbloom.wire.codec import message
from darkbloom.wire.trust import ReputationTable

__all__ = ["ReputationQuery", "ReputationReply", "SpotCheckAck"]


@message("reputation.query")
@dataclass(frozen=True, slots=True, kw_only=True)
class ReputationQuery:
    """Anyone -> relay: the newest signed table, a page at a time (a large network's table does not
    fit one frame). `after`: only entries whose node key sorts after it (the last key of the
    previous page). `node` (hex key): that node's entry only."""

    node: str = ""
    after: str = ""


@message("reputation.reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class ReputationReply:
    """Relay -> asker: a signed table (None before the first one was computed) holding the entries
    asked for, at most a page of them; every page is signed on its own and carries the same
    `epoch` and `computed_ms`. `more`: further entries follow after this page's last key."""

    table: ReputationTable | None = None
    more: bool = False


@message("reputation.spot_check_ack")
@dataclass(frozen=True, slots=True, kw_only=True)
class SpotCheckAck:
    """Relay -> reporter: the evidence held. `counted` is False for a report the relay already had
    (same reporter, same output) or one more from a reporter already heard on this node this epoch."""

    suspect: str  # hex key of the flagged node
    reason: str  # the verdict the relay re-computed under its own policy
    counted: bool
    epoch: int  # the epoch the failure counts in (the next one to close)
