"""multistream-select messages, pure: encode, and take complete messages from a byte buffer.

A message is an unsigned-varint length, then that many bytes ending in "\\n". Used by the
pipelined stream open in darkbloom.p2p.network (header and protocol sent in one write).
"""

from __future__ import annotations

from darkbloom.errors import MalformedMessage

__all__ = ["HELLO", "MAX_MESSAGE", "encode", "take"]

HELLO = "/multistream/1.0.0"
MAX_MESSAGE = 1024  # protocol ids are short; anything longer is not multistream-select


def encode(text: str) -> bytes:
    body = text.encode() + b"\n"
    n = len(body)
    prefix = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            prefix.append(byte | 0x80)
        else:
            prefix.append(byte)
            return bytes(prefix) + body


def take(buf: bytes, limit: int) -> tuple[list[str], bytes]:
    """Up to `limit` complete messages from the front of `buf`, and the bytes after them.

    Bytes after the last taken message are returned untouched (they may be stream data).
    Raises MalformedMessage on an overlong length, a length over MAX_MESSAGE or a message
    that does not end in a newline.
    """
    out: list[str] = []
    pos = 0
    while len(out) < limit:
        n = shift = 0
        i = pos
        while True:
            if i >= len(buf):
                return out, buf[pos:]  # incomplete length prefix
            byte = buf[i]
            i += 1
            n |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 14:
                raise MalformedMessage("multistream: length prefix too long")
        if n == 0 or n > MAX_MESSAGE:
            raise MalformedMessage(f"multistream: message length {n} out of range 1..{MAX_MESSAGE}")
        if len(buf) - i < n:
            return out, buf[pos:]  # incomplete body
        body = buf[i : i + n]
        if body[-1:] != b"\n":
            raise MalformedMessage("multistream: message does not end in a newline")
        try:
            out.append(body[:-1].decode())
        except UnicodeDecodeError:
            raise MalformedMessage("multistream: message is not UTF-8") from None
        pos = i + n
    return out, buf[pos:]
