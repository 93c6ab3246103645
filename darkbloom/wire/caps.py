"""The capability record a node stores in the DHT under `/darkbloom/caps/<peer-id>`.

Set by the node (its p2p layer fills peer id, seq, times, reachability and addresses; the
node supplies the rest), signed with the node's Ed25519 key over
`canonical_bytes(record, exclude=("signature",))`. Verified by `darkbloom.p2p.records`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from darkbloom.wire.codec import message

__all__ = ["CAPS_NAMESPACE", "CapabilityRecord", "DialBackReply", "DialBackRequest", "ModelCap", "Reachability"]

CAPS_NAMESPACE = "darkbloom"  # DHT key namespace: /darkbloom/caps/<peer-id>

Reachability = Literal["public", "relayed"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelCap:
    """One model a node serves."""

    id: str  # catalog id, e.g. "smollm2-135m-instruct"
    digest: str  # weights digest (hex), what a client may pin
    context_length: int  # tokens
    quantization: str = ""  # e.g. "bf16", "q4"; empty when unquantized/unknown
    features: tuple[str, ...] = ()  # "tools", "json", "logprobs", "embeddings", ...


@message("caps.record")
@dataclass(frozen=True, slots=True, kw_only=True)
class CapabilityRecord:
    """What a node offers; valid until `expires_at_ms`, newer `seq` replaces older."""

    peer_id: str  # base58 libp2p peer id of the signer (Ed25519 key inlined in the id)
    seq: int  # strictly increasing per peer; higher wins
    issued_at_ms: int  # unix time in milliseconds when signed
    expires_at_ms: int  # unix time in milliseconds; rejected at or after this
    models: tuple[ModelCap, ...] = ()
    prefill_tps: float = 0.0  # measured prompt tokens per second
    decode_tps: float = 0.0  # measured generated tokens per second (one stream)
    max_concurrent: int = 0  # requests served at once
    region: str = ""  # operator-declared, e.g. "eu-west"
    node_class: str = ""  # e.g. "m2-max"; empty when not classified
    price_input_per_m: int = 0  # micro-credits per 1M prompt tokens
    price_output_per_m: int = 0  # micro-credits per 1M completion tokens
    software_version: str = ""  # darkbloom version of the node
    protocol_version: str = ""  # PROTOCOL_VERSION of darkbloom.wire.infer
    reachability: Reachability = "public"
    addrs: tuple[str, ...] = ()  # multiaddrs to dial (direct or /p2p-circuit), with /p2p/<id>
    signature: bytes = b""  # Ed25519 over canonical_bytes(exclude=("signature",))

    def model(self, model_id: str) -> ModelCap | None:
        for m in self.models:
            if m.id == model_id:
                return m
        return None


@message("dialback.request")
@dataclass(frozen=True, slots=True, kw_only=True)
class DialBackRequest:
    """Node -> relay on `/darkbloom/dialback/1.0.0`: can you reach me at these addresses?"""

    addrs: tuple[str, ...]  # the node's listen multiaddrs (/ip4/.../tcp/...), at most 8 are tried


@message("dialback.reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class DialBackReply:
    """Relay -> node: the addresses (listen or observed IP + listen port) that accepted TCP."""

    reachable: tuple[str, ...]  # /ip4/<ip>/tcp/<port>, empty when the node is behind a NAT
    observed_ip: str = ""  # the node's IP as the relay sees it
