"""DHT key space for the simulator: sha256 of peer ids and content keys as ints, XOR distance.

Peer ids are real libp2p Ed25519 peer ids (`darkbloom.p2p.keys`), so simulated and crawled
topologies look alike. As in py-libp2p's kad_dht, a peer's position is sha256 of its peer id
bytes and a content key's (model CID text, record key) is sha256 of its bytes. Keys are Python
ints so XOR is one operation.
"""

from __future__ import annotations

import hashlib

from darkbloom.p2p.keys import b58decode

__all__ = ["KEY_BITS", "KeySpace", "content_key", "key_of_peer"]

KEY_BITS = 256


def key_of_peer(peer_id: str) -> int:
    """sha256 of the peer id's bytes (base58-decoded; an opaque test name hashes as text)."""
    try:
        raw = b58decode(peer_id)
    except ValueError:
        raw = peer_id.encode()
    return int.from_bytes(hashlib.sha256(raw).digest(), "big")


def content_key(name: str | bytes) -> int:
    """Key of a content name (model CID text, record key): sha256 of its bytes."""
    data = name.encode() if isinstance(name, str) else name
    return int.from_bytes(hashlib.sha256(data).digest(), "big")


class KeySpace:
    """A memo of peer id -> key shared by every node of one simulation (each id hashes once)."""

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: dict[str, int] = {}

    def __call__(self, peer_id: str) -> int:
        key = self._keys.get(peer_id)
        if key is None:
            key = self._keys[peer_id] = key_of_peer(peer_id)
        return key

    def __len__(self) -> int:
        return len(self._keys)
