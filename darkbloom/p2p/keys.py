"""Pure key naming: libp2p peer ids from Ed25519 keys, DHT keys of models and capability records.

No libp2p import: the memory network and the simulator use these too. A libp2p Ed25519
peer id is the identity multihash of the protobuf-encoded public key, base58btc-encoded;
a model key is the CIDv1 (raw, sha2-256) of `darkbloom-model:<model-id>` in base32.
"""

from __future__ import annotations

import base64
import hashlib

__all__ = [
    "CAPS_PREFIX",
    "b58decode",
    "b58encode",
    "caps_key",
    "model_cid",
    "peer_id_from_public_key",
    "peer_id_of_caps_key",
    "public_key_from_peer_id",
]

CAPS_PREFIX = "/darkbloom/caps/"
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
# identity multihash (0x00), length 36, then protobuf PublicKey{Type: Ed25519(1), Data: 32 bytes}
_ED25519_PEER_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        try:
            n = n * 58 + _B58_INDEX[c]
        except KeyError:
            raise ValueError(f"not base58: {c!r}") from None
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    pad = len(text) - len(text.lstrip("1"))
    return b"\0" * pad + body


def peer_id_from_public_key(public_key: bytes) -> str:
    """The base58 libp2p peer id of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key has 32 bytes")
    return b58encode(_ED25519_PEER_PREFIX + public_key)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The Ed25519 public key inlined in a peer id; ValueError for any other kind of id."""
    raw = b58decode(peer_id)
    if len(raw) != 38 or not raw.startswith(_ED25519_PEER_PREFIX):
        raise ValueError("not an Ed25519 peer id")
    return raw[6:]


def model_cid(model_id: str) -> str:
    """CIDv1 (raw codec, sha2-256) of `darkbloom-model:<model_id>`, base32 text ("b...")."""
    digest = hashlib.sha256(f"darkbloom-model:{model_id}".encode()).digest()
    raw = bytes([0x01, 0x55, 0x12, 0x20]) + digest
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


def caps_key(peer_id: str) -> str:
    return CAPS_PREFIX + peer_id


def peer_id_of_caps_key(key: str) -> str:
    """The peer id a caps key names; ValueError when `key` is not a caps key."""
    if not key.startswith(CAPS_PREFIX) or len(key) <= len(CAPS_PREFIX):
        raise ValueError(f"not a capability record key: {key[:64]!r}")
    return key[len(CAPS_PREFIX) :]
