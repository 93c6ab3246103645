"""Pure build, sign, verify and select of capability records; time comes in as `now_ms`.

A record is valid when: it decodes strictly, fits `max_bytes`, sits under the key of the
peer that signed it (`/darkbloom/caps/<peer-id>`), carries that peer's Ed25519 signature
over `canonical_bytes(record, exclude=("signature",))`, has not expired, was not issued in
the future (beyond a clock skew allowance) and does not claim a lifetime above `max_ttl_ms`.
Among valid records the highest `seq` wins; `RecordCache` refuses a record older than one
already seen for the same peer (a replay), so an attacker cannot roll a node back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from darkbloom.errors import MalformedMessage, RecordRejected
from darkbloom.identity import Identity, verify_signature
from darkbloom.p2p.keys import caps_key, peer_id_from_public_key, peer_id_of_caps_key, public_key_from_peer_id
from darkbloom.wire.caps import CapabilityRecord, Reachability
from darkbloom.wire.codec import canonical_bytes, decode, encode

__all__ = [
    "CLOCK_SKEW_MS",
    "DEFAULT_MAX_TTL_MS",
    "RecordCache",
    "build_record",
    "encode_record",
    "next_seq",
    "select_best",
    "sign_record",
    "verify_record",
]

CLOCK_SKEW_MS = 60_000  # a record "issued" up to a minute in the future still counts
DEFAULT_MAX_TTL_MS = 24 * 3600 * 1000  # no record may claim to live longer than a day
_SIGNATURE_EXCLUDE = ("signature",)


def sign_record(identity: Identity, record: CapabilityRecord) -> CapabilityRecord:
    """`record` with its signature set by `identity` (which must own `record.peer_id`)."""
    if record.peer_id != peer_id_from_public_key(identity.public_key):
        raise ValueError("a record must be signed by the peer it names")
    unsigned = dataclasses.replace(record, signature=b"")
    return dataclasses.replace(unsigned, signature=identity.sign(canonical_bytes(unsigned, exclude=_SIGNATURE_EXCLUDE)))


def build_record(
    identity: Identity,
    template: CapabilityRecord,
    *,
    seq: int,
    now_ms: int,
    ttl_ms: int,
    addrs: Sequence[str],
    reachability: Reachability,
) -> CapabilityRecord:
    """A signed record from a node's `template` (models, speeds, prices...) and network facts."""
    if ttl_ms <= 0:
        raise ValueError("ttl_ms must be positive")
    record = dataclasses.replace(
        template,
        peer_id=peer_id_from_public_key(identity.public_key),
        seq=seq,
        issued_at_ms=now_ms,
        expires_at_ms=now_ms + ttl_ms,
        addrs=tuple(addrs),
        reachability=reachability,
        signature=b"",
    )
    return sign_record(identity, record)


def next_seq(previous: int, now_ms: int) -> int:
    """A sequence number above `previous` that also survives restarts (time-based)."""
    return max(previous + 1, now_ms)


def encode_record(record: CapabilityRecord) -> bytes:
    return encode(record)


def verify_record(
    key: str,
    value: bytes,
    *,
    now_ms: int,
    max_bytes: int,
    max_ttl_ms: int = DEFAULT_MAX_TTL_MS,
) -> CapabilityRecord:
    """The record stored under `key`, or RecordRejected saying why it is not acceptable."""
    if len(value) > max_bytes:
        raise RecordRejected(key, f"oversize: {len(value)} bytes > {max_bytes}")
    try:
        peer_id = peer_id_of_caps_key(key)
    except ValueError as exc:
        raise RecordRejected(key[:80], str(exc)) from None
    try:
        record = decode(value, CapabilityRecord)
    except MalformedMessage as exc:
        raise RecordRejected(key, f"malformed: {exc.reason}") from None
    if record.peer_id != peer_id:
        raise RecordRejected(key, "record names another peer than its key")
    try:
        public_key = public_key_from_peer_id(peer_id)
    except ValueError:
        raise RecordRejected(key, "peer id does not inline an Ed25519 key") from None
    if not record.signature:
        raise RecordRejected(key, "unsigned")
    if not verify_signature(public_key, canonical_bytes(record, exclude=_SIGNATURE_EXCLUDE), record.signature):
        raise RecordRejected(key, "bad signature (forged or foreign-signed)")
    if now_ms >= record.expires_at_ms:
        raise RecordRejected(key, "expired")
    if record.issued_at_ms > now_ms + CLOCK_SKEW_MS:
        raise RecordRejected(key, "issued in the future")
    if record.expires_at_ms - record.issued_at_ms > max_ttl_ms:
        raise RecordRejected(key, "lifetime above the allowed maximum")
    if record.seq < 0:
        raise RecordRejected(key, "negative seq")
    return record


def select_best(records: Sequence[CapabilityRecord]) -> int:
    """Index of the best record: highest seq, then latest expiry, then first."""
    if not records:
        raise ValueError("no records to select from")
    best = 0
    for i, r in enumerate(records):
        b = records[best]
        if (r.seq, r.expires_at_ms) > (b.seq, b.expires_at_ms):
            best = i
    return best


class RecordCache:
    """Best known record per peer, with replay protection. Pure: callers pass `now_ms`."""

    def __init__(self) -> None:
        self._best: dict[str, CapabilityRecord] = {}
        self._highest_seq: dict[str, int] = {}

    def offer(self, record: CapabilityRecord, now_ms: int) -> CapabilityRecord:
        """Keep `record` when it is the newest seen for its peer; return the current best.

        Raises RecordRejected when `record` is older than one already seen (a replay).
        The caller has verified the record.
        """
        highest = self._highest_seq.get(record.peer_id, -1)
        if record.seq < highest:
            raise RecordRejected(caps_key(record.peer_id), f"older: seq {record.seq} < seen {highest}")
        self._highest_seq[record.peer_id] = record.seq
        current = self._best.get(record.peer_id)
        if current is None or (record.seq, record.expires_at_ms) >= (current.seq, current.expires_at_ms):
            self._best[record.peer_id] = record
        return self._best[record.peer_id]

    def get(self, peer_id: str, now_ms: int) -> CapabilityRecord | None:
        """The cached record for `peer_id`, or None when absent or expired."""
        record = self._best.get(peer_id)
        if record is None:
            return None
        if now_ms >= record.expires_at_ms:
            del self._best[peer_id]
            return None
        return record

    def forget_expired(self, now_ms: int) -> int:
        gone = [p for p, r in self._best.items() if now_ms >= r.expires_at_ms]
        for p in gone:
            del self._best[p]
        return len(gone)
