"""Keeping the relay's reputation table fresh: a trio loop that fetches, verifies and hands it on, and the mapping from table entries to routing state.

`run_table_refresh(connect, ledger_key, on_table, interval_s=...)` asks the ledger every
`interval_s` (and at start) for its signed table; a table that does not verify is dropped
with a warning, an unreachable ledger is retried with backoff. The shim passes
`TrustedRouting.apply_table`, the node its own "reputation from the table" setter.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from darkbloom.errors import DarkbloomError
from darkbloom.ledger.service import LedgerStream
from darkbloom.ledger.trustclient import TrustClient
from darkbloom.wire.trust import ReputationEntry, ReputationTable

__all__ = ["entry_for", "run_table_refresh"]

log = logging.getLogger(__name__)


def entry_for(table: ReputationTable | None, node_key: str) -> ReputationEntry | None:
    """The table's entry for `node_key` (hex public key), or None."""
    if table is None:
        return None
    return next((e for e in table.entries if e.node == node_key), None)


async def run_table_refresh(
    connect: Callable[[], Awaitable[LedgerStream]],
    ledger_key: str,
    on_table: Callable[[ReputationTable], object],
    *,
    interval_s: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Fetch the table now and every `interval_s`; `on_table(table)` for each verified one."""
    task_status.started()
    backoff = 1.0
    while True:
        try:
            stream = await connect()
            client = TrustClient(stream, ledger_key=ledger_key)
            try:
                table = await client.reputation()
            finally:
                with trio.move_on_after(1, shield=True):
                    await client.close()
            if table is not None:
                on_table(table)
            backoff = 1.0
            await trio.sleep(interval_s)
        except (DarkbloomError, OSError) as exc:  # unreachable ledger or a bad table: keep the last one, retry later
            log.warning("reputation table not refreshed (%s); retrying in %.0fs", exc, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, max(interval_s, 1.0))
