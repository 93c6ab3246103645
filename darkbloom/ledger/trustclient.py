"""The client end of the relay's trust requests on `/darkbloom/ledger/1.0.0`: fetch the signed reputation table, report a failed spot check.

Used by the shim (table for routing, reports of nodes it flagged) and the node (its own
entry for the operator's status page). Any stream with `read(n)`, `write(data)` and
`close()`; a refusal comes back as the typed error it names.
"""

from __future__ import annotations

from typing import Any

import trio

from darkbloom.errors import EvidenceRejected, InvalidSignature, LedgerError, StreamClosed
from darkbloom.ledger.reputation import verify_table
from darkbloom.ledger.service import MAX_FRAME_BYTES, LedgerStream
from darkbloom.wire.codec import FrameDecoder, encode_frame, read_frame
from darkbloom.wire.ledger import LedgerErrorReply
from darkbloom.wire.reputation import ReputationQuery, ReputationReply, SpotCheckAck
from darkbloom.wire.trust import ReputationTable, SpotCheckReport

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

    async def reputation(self) -> ReputationTable | None:
        """The relay's newest table, verified against `ledger_key` (InvalidSignature otherwise)."""
        reply: ReputationReply = await self._ask(ReputationQuery(), ReputationReply)
        if reply.table is not None:
            verify_table(reply.table, self.ledger_key)
        return reply.table

    async def report(self, report: SpotCheckReport) -> SpotCheckAck:
        """Submit a signed spot-check report; EvidenceRejected / InvalidSignature say why it was refused."""
        return await self._ask(report, SpotCheckAck)

    async def close(self) -> None:
        await self.stream.close()
