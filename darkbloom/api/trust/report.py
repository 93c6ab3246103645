"""Reporting a flagged node to the relay: a signed SpotCheckReport from the node's output attestation and the verifier's score attestation, sent over the ledger protocol.

The shim calls `Reporter.report(...)` after `TrustedRouting.judge_spot_check` flagged a node
(in the spot check's background task, after the client got its answer). Evidence that
cannot prove anything is not sent: an output attestation missing, not signed by the node
that served, or about other tokens than the verifier scored. The relay's refusal
(EvidenceRejected / InvalidSignature) and an unreachable relay are logged, never raised:
the shim's own quarantine of the node does not depend on the relay.

A flag on accumulated evidence (verdict reason "accumulated_evalue", accumulate.py) is reported
the same way: the last check's two attestations, reason "accumulated_evalue". The relay re-judges
only that check, which passed on its own, so today's relay refuses such a report ("the signed
scores pass the policy") and it is counted as refused here. Sending every check involved would
not prove more: a reporter could leave out the checks that passed, and a product over chosen
checks is no e-value. A relay-side count needs the relay to see every check a reporter ran on a
node (e.g. reports of passes too), which the wire messages do not carry yet.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio

from darkbloom.api.trust.evidence import make_report
from darkbloom.api.trust.verify import Verdict, VerifyPolicy
from darkbloom.errors import DarkbloomError, MalformedMessage
from darkbloom.identity import Identity, verify_signature
from darkbloom.ledger.trustclient import TrustClient
from darkbloom.wire.codec import decode
from darkbloom.wire.ledger import signed_bytes
from darkbloom.wire.reputation import SpotCheckAck
from darkbloom.wire.trust import OutputAttestation, ScoreAttestation

__all__ = ["Reporter", "usable_output_attestation"]

log = logging.getLogger(__name__)


def usable_output_attestation(encoded: bytes, node_key: str, score: ScoreAttestation) -> OutputAttestation | None:
    """The node's attestation when it can back a report: decodes, signed by `node_key` (hex), and
    about the prompt, tokens, weights and sampling parameters the verifier scored. None otherwise (pure)."""
    if not encoded:
        return None
    try:
        out = decode(encoded, OutputAttestation)
        key = bytes.fromhex(node_key)
    except (MalformedMessage, ValueError):
        return None
    if out.node != node_key or len(key) != 32 or not verify_signature(key, signed_bytes(out, "node"), out.signature):
        return None
    if (out.prompt_hash, out.output_hash, out.model_digest, out.sampling_digest) != (
            score.prompt_hash, score.output_hash, score.model_digest, score.sampling_digest):
        return None
    return out


@dataclass
class Reporter:
    """Sends reports to the ledger at `ledger` = (peer id, addrs) with `identity` as the reporter."""

    network: object  # PeerNetwork
    identity: Identity
    ledger: tuple[str, tuple[str, ...]]
    sent: list[SpotCheckAck] = field(default_factory=list)  # acknowledgements, newest last (status, tests)
    refused: int = 0

    async def report(self, node_key: str, output: bytes, score: ScoreAttestation, verdict: Verdict,
                     policy: VerifyPolicy) -> SpotCheckAck | None:
        from darkbloom.p2p.keys import public_key_from_peer_id
        from darkbloom.wire.ledger import LEDGER_PROTOCOL

        out = usable_output_attestation(output, node_key, score)
        if out is None:
            log.info("flagged node %s: no usable output attestation, not reported", node_key[:8])
            return None
        report = make_report(self.identity, out, score, verdict, policy, time_ms=int(time.time() * 1000))
        peer, addrs = self.ledger
        try:
            stream = await self.network.open_stream(peer, LEDGER_PROTOCOL, addrs=addrs)  # type: ignore[attr-defined]
            client = TrustClient(stream, ledger_key=public_key_from_peer_id(peer).hex())
            try:
                ack = await client.report(report)
            finally:
                with trio.move_on_after(1, shield=True):
                    await client.close()
        except (DarkbloomError, OSError) as exc:  # refused with a reason, or the relay is unreachable: the local flag stands
            self.refused += 1
            log.warning("report of node %s to the relay failed: %s", node_key[:8], exc)
            return None
        self.sent.append(ack)
        log.info("node %s reported to the relay (%s, counted=%s)", node_key[:8], ack.reason, ack.counted)
        return ack
