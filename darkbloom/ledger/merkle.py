"""Merkle trees over an epoch's row hashes: root, inclusion proof, proof check (pure).

Leaves are `sha256(0x00 || row_hash)`, inner nodes `sha256(0x01 || left || right)`, so a
leaf can never pass for an inner node. A level with an odd count promotes its last node
unchanged. The root of no rows is 32 zero bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from darkbloom.errors import InvalidSignature
from darkbloom.wire.ledger import ProofReply, ProofStep

__all__ = ["check_proof", "inclusion_proof", "merkle_root", "verify_inclusion"]

_EMPTY = bytes(32)


def _leaf(row_hash: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + row_hash).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _next_level(level: list[bytes]) -> list[bytes]:
    out = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        out.append(level[-1])
    return out


def merkle_root(row_hashes: Sequence[bytes]) -> bytes:
    if not row_hashes:
        return _EMPTY
    level = [_leaf(h) for h in row_hashes]
    while len(level) > 1:
        level = _next_level(level)
    return level[0]


def inclusion_proof(row_hashes: Sequence[bytes], index: int) -> tuple[ProofStep, ...]:
    """The siblings from leaf `index` up to the root."""
    if not 0 <= index < len(row_hashes):
        raise IndexError(f"row {index} not in an epoch of {len(row_hashes)} rows")
    level = [_leaf(h) for h in row_hashes]
    path: list[ProofStep] = []
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(ProofStep(sibling=level[sibling], left=sibling < index))
        level = _next_level(level)
        index //= 2
    return tuple(path)


def verify_inclusion(row_hash: bytes, path: Sequence[ProofStep], root: bytes) -> bool:
    """True when `path` leads from `row_hash` to `root`."""
    current = _leaf(row_hash)
    for step in path:
        if len(step.sibling) != 32:
            return False
        current = _node(step.sibling, current) if step.left else _node(current, step.sibling)
    return current == root


def check_proof(proof: ProofReply, ledger_key: str) -> None:
    """Raise InvalidSignature unless the ledger signed the summary and the row is under its root."""
    from darkbloom.ledger.receipts import row_hash, verify

    verify(proof.summary, ledger_key)
    if proof.row.epoch != proof.summary.epoch or not verify_inclusion(row_hash(proof.row), proof.path, proof.summary.root):
        raise InvalidSignature(f"inclusion proof of epoch {proof.summary.epoch} row {proof.row.index}")
