"""Signing, verifying and hashing ledger messages; prices, lane ids and the request hash chain (pure).

Every signature is Ed25519 over `darkbloom.wire.ledger.signed_bytes(msg, role)`, so it is
bound to the message type (domain prefix) and to the signer's role. Verification uses
libsodium directly through pynacl's bindings with a per-key cache; it is the hot path of
settlement.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import replace
from typing import TypeVar

import msgpack
import nacl.bindings  # noqa: F401 - initialises libsodium (sodium_init) before the first _verify
from nacl import _sodium

from darkbloom.errors import InvalidSignature, MalformedMessage
from darkbloom.identity import Identity
from darkbloom.wire.codec import decode, encode
from darkbloom.wire.ledger import (
    BalanceQuery,
    CloseLane,
    EpochSummary,
    LaneReservation,
    NodeEpochStats,
    OpenLane,
    SettlementRow,
    SubmitVouchers,
    TopUp,
    Voucher,
    encode_flat,
    signed_body,
    signed_bytes,
)

__all__ = [
    "GENESIS_CHAIN",
    "ZERO_HASH",
    "chain_next",
    "cost_of",
    "decode_strict",
    "lane_id",
    "request_hash",
    "row_hash",
    "sign",
    "sign_voucher",
    "stats_hash",
    "summary_hash",
    "verify",
    "verify_voucher",
    "voucher_hash",
]

ZERO_HASH = bytes(32)
GENESIS_CHAIN = ZERO_HASH  # the chain of a lane before its first request
MICRO = 1_000_000  # prices are per 1M tokens

CONSUMER = "consumer"
NODE = "node"

M = TypeVar("M")


def cost_of(prompt_tokens: int, completion_tokens: int, price_input_per_m: int, price_output_per_m: int) -> int:
    """Cost in micro-credits of cumulative usage: the exact price, rounded up to a whole micro-credit.

    Computed on cumulative totals, so rounding never accumulates across vouchers.
    """
    numerator = prompt_tokens * price_input_per_m + completion_tokens * price_output_per_m
    return -(-numerator // MICRO)


def request_hash(encoded_request: bytes) -> bytes:
    """The hash of one request as it went on the wire (the prompt itself is never stored)."""
    return hashlib.sha256(b"darkbloom/request/v1\x00" + encoded_request).digest()


def chain_next(chain: bytes, req_hash: bytes) -> bytes:
    """Extend a lane's request hash chain by one request."""
    return hashlib.sha256(b"darkbloom/chain/v1\x00" + chain + req_hash).digest()


def lane_id(consumer: str, node: str, nonce: bytes) -> str:
    """The lane id the ledger assigns to an OpenLane: the same request always gives the same lane."""
    digest = hashlib.sha256(b"darkbloom/lane/v1\x00" + bytes.fromhex(consumer) + bytes.fromhex(node) + nonce)
    return digest.hexdigest()[:32]


def voucher_hash(voucher: Voucher) -> bytes:
    """sha256 of the full encoding, signatures included: what a settlement row records."""
    return hashlib.sha256(encode_flat(voucher)).digest()


def row_hash(row: SettlementRow) -> bytes:
    return hashlib.sha256(signed_bytes(row)).digest()


def summary_hash(summary: EpochSummary) -> bytes:
    """What the next summary's `prev_summary` holds: the hash of the signed fields and signature."""
    return hashlib.sha256(signed_bytes(summary, "ledger") + summary.signature).digest()


def stats_hash(nodes: Sequence[NodeEpochStats]) -> bytes:
    """The hash an epoch summary's signature covers in place of its per-node stats."""
    rows = [[n.node, n.prompt_tokens, n.completion_tokens, n.paying_consumers, n.paid] for n in nodes]
    return hashlib.sha256(b"darkbloom/epoch-stats/v1\x00" + msgpack.packb(rows, use_bin_type=True)).digest()


# --- signatures ----------------------------------------------------------------------

_ROLE = {
    LaneReservation: "ledger",
    EpochSummary: "ledger",
    OpenLane: CONSUMER,
    TopUp: CONSUMER,
    CloseLane: CONSUMER,
    BalanceQuery: "account",
    SubmitVouchers: NODE,
}


def sign(identity: Identity, msg: M) -> M:
    """Return `msg` with its `signature` field set (reservations, summaries, requests)."""
    return replace(msg, signature=identity.sign(signed_bytes(msg, _ROLE[type(msg)])))  # type: ignore[type-var]


def verify(msg: object, signer: str) -> None:
    """Raise InvalidSignature unless `msg.signature` is `signer`'s (hex key) signature.

    For an epoch summary that carries its node stats, they must match the signed hash; a
    summary without them (as in an inclusion proof) verifies on its other fields.
    """
    if not _verify(signer, signed_bytes(msg, _ROLE[type(msg)]), msg.signature):  # type: ignore[attr-defined]
        raise InvalidSignature(type(msg).TYPE, signer)  # type: ignore[attr-defined]
    if isinstance(msg, EpochSummary) and msg.nodes and stats_hash(msg.nodes) != msg.stats_hash:
        raise InvalidSignature("epoch summary node stats", signer)


def sign_voucher(identity: Identity, voucher: Voucher, role: str) -> Voucher:
    """Sign as "consumer" (sets consumer_sig) or "node" (sets node_sig)."""
    sig = identity.sign(signed_bytes(voucher, role))
    if role == CONSUMER:
        return replace(voucher, consumer_sig=sig)
    if role == NODE:
        return replace(voucher, node_sig=sig)
    raise ValueError(f"unknown role {role!r}")


_CONSUMER_PREFIX = Voucher.DOMAIN + CONSUMER.encode() + b"\x00"  # type: ignore[attr-defined]
_NODE_PREFIX = Voucher.DOMAIN + NODE.encode() + b"\x00"  # type: ignore[attr-defined]


def verify_voucher(voucher: Voucher, consumer: str, node: str | None) -> None:
    """Check the consumer's signature, and the node's unless `node` is None."""
    body = signed_body(voucher)  # == signed_bytes(voucher, role) minus the role prefix
    if not _verify(consumer, _CONSUMER_PREFIX + body, voucher.consumer_sig):
        raise InvalidSignature("voucher (consumer)", consumer)
    if node is not None and not _verify(node, _NODE_PREFIX + body, voucher.node_sig):
        raise InvalidSignature("voucher (node)", node)


@functools.lru_cache(maxsize=65536)
def _key(hex_key: str) -> bytes | None:
    try:
        key = bytes.fromhex(hex_key)
    except ValueError:
        return None
    return key if len(key) == 32 else None


def _verify(hex_key: str, data: bytes, signature: bytes) -> bool:
    key = _key(hex_key)
    if key is None or len(signature) != 64:
        return False
    # libsodium's crypto_sign_open checks the signature (crypto_sign_verify_detached) and, given
    # NULL buffers, copies nothing: what pynacl's wrapper does, minus an allocation and a copy
    # per call (settlement verifies two signatures per voucher).
    signed = signature + data
    return _sodium.lib.crypto_sign_open(_sodium.ffi.NULL, _sodium.ffi.NULL, signed, len(signed), key) == 0


def decode_strict(blob: bytes, cls: type[M]) -> M:
    """Decode a stored or received signed message and insist its encoding is the canonical one.

    A signature covers field values, not bytes; requiring the canonical encoding means two
    different byte strings can never stand for the same signed message.
    """
    msg = decode(blob, cls)
    if encode(msg) != blob:
        raise MalformedMessage(f"{cls.TYPE}: not in canonical encoding")  # type: ignore[attr-defined]
    return msg
