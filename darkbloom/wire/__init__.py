"""Every Darkbloom wire message and its codec: uvarint-framed, strictly decoded msgpack."""

from darkbloom.wire.codec import (
    DEFAULT_MAX_FRAME_BYTES,
    FrameDecoder,
    canonical_bytes,
    decode,
    decode_frame,
    encode,
    encode_frame,
    message,
    message_types,
    read_frame,
)
from darkbloom.wire import caps, infer, ledger, reputation, trust

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "FrameDecoder",
    "canonical_bytes",
    "caps",
    "decode",
    "decode_frame",
    "encode",
    "encode_frame",
    "infer",
    "ledger",
    "message",
    "message_types",
    "read_frame",
    "reputation",
    "trust",
]
