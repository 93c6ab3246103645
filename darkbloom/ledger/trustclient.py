"""The client end of the relay's trust requests on `/darkbloom/ledger/1.0.0`: fetch the signed reputation table, report a failed spot check.

Used by the shim (table for routing, reports of nodes it flagged) and the node (its own
entry for the operator's status page). Any stream with `read(n)`, `write(data)` and
`close()`; a refusal comes back as the typed error it names.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import trio

from darkbloom.errors import EvidenceRejected, InvalidSignature, LedgerError, StreamClosed
from darkbloom.ledger.reputation import verify_table
from darkbloom.ledger.service import MAX_FRAME_BYTES, LedgerStream
from darkbloom.wire.codec import FrameDecoder, encode_frame, read_frame
from darkbloom.wire.ledger import LedgerErrorReply
from darkbloom.wire.reputation import ReputationQuery, ReputationReply, SpotCheckAck
from darkbloom.wire.trust import ReputationEntry, ReputationTable, SpotCheckReport

__all__ = ["TrustClient"]


class TrustClient:
    """Trust requests over one ledger stream, one at a time. `ledger_key` (hex) signs the tables."""

    def __init__(self, stream: LedgerStream, *, ledger_key: str) -> None:
        self.stream = stream
        self.ledger_key = ledger_key
        self._decoder = FrameDecoder(MAX_FRAME_BYTES)
        self._lock = trio.Lock()

    async def _ask(self, request: Any, expect: type) -> Any:
        async with self._lock:
            await self.stream.write(encode_frame(request, MAX_FRAME_BYTES))
            reply = await read_frame(self.stream.read, self._decoder, (expect, LedgerErrorReply))
        if reply is None:
            raise StreamClosed(getattr(self.stream, "peer_id", "ledger"), "the ledger closed the stream")
        if isinstance(reply, LedgerErrorReply):
            if reply.code == "InvalidSignature":
                raise InvalidSignature(reply.message)
            if reply.code == "EvidenceRejected":
                raise EvidenceRejected(getattr(request, "suspect", ""), reply.message)
            raise LedgerError(f"ledger refused: {reply.message}")
        return reply

    async def reputation(self, *, max_pages: int = 1000) -> ReputationTable | None:
        """The relay's newest table, every page verified against `ledger_key` (InvalidSignature
        otherwise). A table that came in several pages is returned merged with its `signature`
        cleared (each page's was checked); one page comes back as signed."""
        for _attempt in range(3):  # the table may be republished between pages: start over
            reply: ReputationReply = await self._ask(ReputationQuery(), ReputationReply)
            if reply.table is None:
                return None
            verify_table(reply.table, self.ledger_key)
            first, entries, more = reply.table, list(reply.table.entries), reply.more
            for _ in range(max_pages):
                if not more or not entries:
                    break
                reply = await self._ask(ReputationQuery(after=entries[-1].node), ReputationReply)
                if reply.table is None or (reply.table.epoch, reply.table.computed_ms) != (first.epoch, first.computed_ms):
                    break  # republished meanwhile
                verify_table(reply.table, self.ledger_key)
                entries.extend(reply.table.entries)
                more = reply.more
            else:
                raise LedgerError("the reputation table has more pages than this client reads", hint="raise max_pages")
            if not more:
                return first if len(entries) == len(first.entries) else replace(first, entries=tuple(entries), signature=b"")
        raise LedgerError("the reputation table kept changing while it was read", hint="try again")

    async def entry(self, node: str) -> tuple[ReputationTable | None, ReputationEntry | None]:
        """`node`'s entry (hex key) as a one-entry table the relay signed, verified; (None, None) before any table."""
        reply: ReputationReply = await self._ask(ReputationQuery(node=node), ReputationReply)
        if reply.table is None:
            return None, None
        verify_table(reply.table, self.ledger_key)
        found = [e for e in reply.table.entries if e.node == node]
        return reply.table, (found[0] if found else None)

    async def report(self, report: SpotCheckReport) -> SpotCheckAck:
        """Submit a signed spot-check report; EvidenceRejected / InvalidSignature say why it was refused."""
        return await self._ask(report, SpotCheckAck)

    async def close(self) -> None:
        await self.stream.close()
