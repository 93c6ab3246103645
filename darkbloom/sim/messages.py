"""Messages of the simulator's own Kademlia, `/darkbloom/sim/kad/1.0.0` (never on the real network).

The real network speaks libp2p's `/ipfs/kad/1.0.0` protobufs inside py-libp2p; the simulator
runs its own small Kademlia (darkbloom.sim.dht) with the same operations, framed by the one
Darkbloom codec so that simulated RPCs cost real encode/decode work. One request and one
reply per stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from darkbloom.wire.codec import message

__all__ = ["KAD_PROTOCOL", "KadReply", "KadRequest", "PeerEntry"]

KAD_PROTOCOL = "/darkbloom/sim/kad/1.0.0"

KadOp = Literal["ping", "find_node", "get_providers", "add_provider", "get_value", "put_value"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerEntry:
    """A peer and the addresses to dial it by (empty when the asker knows them)."""

    peer_id: str
    addrs: tuple[str, ...] = ()


@message("sim.kad.request")
@dataclass(frozen=True, slots=True, kw_only=True)
class KadRequest:
    """Asker -> DHT server."""

    op: KadOp
    key: bytes = b""  # 32-byte target key (sha256 space); empty for ping
    record_key: str = ""  # get_value/put_value: the record's name, e.g. /darkbloom/caps/<id>
    value: bytes = b""  # put_value: the record bytes
    provider: PeerEntry | None = None  # add_provider: who provides (the asker)


@message("sim.kad.reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class KadReply:
    """DHT server -> asker."""

    closer: tuple[str, ...] = ()  # up to k server-mode peers nearest to `key`, nearest first
    providers: tuple[PeerEntry, ...] = ()  # get_providers: unexpired providers of `key`
    value: bytes | None = None  # get_value: the stored record, if any
    ok: bool = True  # put_value/add_provider: stored
