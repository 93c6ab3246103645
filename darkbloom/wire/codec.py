"""One codec for every Darkbloom message: uvarint-length-prefixed msgpack maps, strictly decoded.

A message is a frozen dataclass registered with `@message("type-name")`. On the wire it is a
msgpack map holding its fields plus `"type"`. Decoding checks the type name, every field's
presence and type (from the dataclass annotations), and the frame size; any failure is one
`MalformedMessage` with the reason, never another exception.

`canonical_bytes(msg)` is what gets signed: a per-type domain prefix, then the field values
as a msgpack array in declaration order (maps with sorted keys), leaving out the signature
fields the caller names.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import msgpack

from darkbloom.errors import MalformedMessage

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "FrameDecoder",
    "Message",
    "canonical_bytes",
    "decode",
    "decode_frame",
    "decode_uvarint",
    "encode",
    "encode_frame",
    "encode_uvarint",
    "message",
    "message_types",
    "read_frame",
]

DEFAULT_MAX_FRAME_BYTES = 1 << 20  # 1 MiB; configurable per protocol
_MAX_UVARINT_BYTES = 10  # 64-bit values need at most 10 groups of 7 bits
_TYPE_KEY = "type"

T = TypeVar("T")


class Message:
    """Marker base: every registered message class carries these class attributes."""

    TYPE: typing.ClassVar[str]
    DOMAIN: typing.ClassVar[bytes]


_REGISTRY: dict[str, type] = {}
_SCHEMAS: dict[type, tuple[tuple[str, Any, bool], ...]] = {}


def message(type_name: str, *, domain: str | None = None) -> Callable[[type[T]], type[T]]:
    """Register a frozen dataclass as a wire message called `type_name`.

    `domain` separates signatures between message types; it defaults to
    ``darkbloom/<type_name>/v1``.
    """

    def register(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        if type_name in _REGISTRY and _REGISTRY[type_name] is not cls:
            raise TypeError(f"message type {type_name!r} registered twice")
        if any(f.name == _TYPE_KEY for f in dataclasses.fields(cls)):
            raise TypeError(f"{cls.__name__}: a field may not be called {_TYPE_KEY!r}")
        cls.TYPE = type_name  # type: ignore[attr-defined]
        cls.DOMAIN = (domain or f"darkbloom/{type_name}/v1").encode() + b"\x00"  # type: ignore[attr-defined]
        _REGISTRY[type_name] = cls
        return cls

    return register


def message_types() -> dict[str, type]:
    """Every registered message class by type name (for tests and fuzzers)."""
    return dict(_REGISTRY)


def _schema(cls: type) -> tuple[tuple[str, Any, bool], ...]:
    """(name, type hint, required) per field, resolved once per class."""
    schema = _SCHEMAS.get(cls)
    if schema is None:
        hints = typing.get_type_hints(cls)
        schema = tuple(
            (
                f.name,
                hints[f.name],
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in dataclasses.fields(cls)
        )
        _SCHEMAS[cls] = schema
    return schema


# --- values <-> msgpack-able data -----------------------------------------------------


def _to_data(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: _to_data(getattr(value, name)) for name, _, _ in _schema(type(value))}
    if isinstance(value, (list, tuple)):
        return [_to_data(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_data(v) for k, v in value.items()}
    return value


def _check(value: Any, hint: Any, path: str) -> Any:
    """Return `value` converted to `hint`'s shape, or raise MalformedMessage naming `path`."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(value, option, path)
            except MalformedMessage as exc:
                errors.append(exc.reason)
        raise MalformedMessage(errors[0] if len(errors) == 1 else f"{path}: no allowed type matches")
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise MalformedMessage(f"{path}: {value!r} is not one of {typing.get_args(hint)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise MalformedMessage(f"{path}: expected an array, got {type(value).__name__}")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise MalformedMessage(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_check(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return tuple(_check(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise MalformedMessage(f"{path}: expected a map, got {type(value).__name__}")
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {
            _check(k, key_hint, f"{path} key"): _check(v, value_hint, f"{path}[{k!r}]")
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise MalformedMessage(f"{path}: expected a map, got {type(value).__name__}")
        return _from_fields(hint, value, path)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MalformedMessage(f"{path}: expected float, got {type(value).__name__}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MalformedMessage(f"{path}: expected int, got {type(value).__name__}")
        return value
    if hint in (str, bytes, bool):
        if type(value) is not hint:
            raise MalformedMessage(f"{path}: expected {hint.__name__}, got {type(value).__name__}")
        return value
    if hint is type(None):
        if value is not None:
            raise MalformedMessage(f"{path}: expected nil")
        return None
    raise TypeError(f"unsupported field type {hint!r} at {path}")  # a bug in a message definition


def _from_fields(cls: type[T], data: dict, path: str) -> T:
    schema = _schema(cls)
    known = {name for name, _, _ in schema}
    unknown = [k for k in data if k not in known and k != _TYPE_KEY]
    if unknown:
        raise MalformedMessage(f"{path}: unknown field {unknown[0]!r}")
    kwargs = {}
    for name, hint, required in schema:
        if name in data:
            kwargs[name] = _check(data[name], hint, f"{path}.{name}")
        elif required:
            raise MalformedMessage(f"{path}: missing field {name!r}")
    return cls(**kwargs)


# --- message <-> bytes ----------------------------------------------------------------


def encode(msg: Any) -> bytes:
    """The msgpack body of a registered message."""
    cls = type(msg)
    if getattr(cls, "TYPE", None) not in _REGISTRY:
        raise TypeError(f"{cls.__name__} is not a registered message")
    data = _to_data(msg)
    data[_TYPE_KEY] = cls.TYPE
    return msgpack.packb(data, use_bin_type=True)


def decode(body: bytes, expect: type[T] | tuple[type, ...] | None = None) -> T:
    """Strictly decode a msgpack body into a registered message.

    `expect` restricts which message classes are acceptable here.
    """
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many kinds (ExtraData, ValueError, Unicode...)
        raise MalformedMessage(f"not msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedMessage(f"expected a map, got {type(data).__name__}")
    type_name = data.get(_TYPE_KEY)
    if not isinstance(type_name, str):
        raise MalformedMessage("missing or non-string 'type'")
    cls = _REGISTRY.get(type_name)
    if cls is None:
        raise MalformedMessage(f"unknown message type {type_name!r}")
    if expect is not None:
        allowed = expect if isinstance(expect, tuple) else (expect,)
        if cls not in allowed:
            names = ", ".join(c.TYPE for c in allowed)
            raise MalformedMessage(f"unexpected message {type_name!r} (expected {names})")
    try:
        return _from_fields(cls, data, type_name)
    except (TypeError, ValueError) as exc:  # __post_init__ validation in a message class
        raise MalformedMessage(f"{type_name}: {exc}") from None


def canonical_bytes(msg: Any, *, exclude: Iterable[str] = ()) -> bytes:
    """Bytes to sign: domain prefix, then field values in declaration order.

    Fields named in `exclude` (the signatures themselves) are left out.
    """
    skip = set(exclude)
    values = [_canonical(getattr(msg, name)) for name, _, _ in _schema(type(msg)) if name not in skip]
    return type(msg).DOMAIN + msgpack.packb(values, use_bin_type=True)


def _canonical(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [_canonical(getattr(value, name)) for name, _, _ in _schema(type(value))]
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return [[k, _canonical(value[k])] for k in sorted(value)]
    return value


# --- framing --------------------------------------------------------------------------


def encode_uvarint(n: int) -> bytes:
    if n < 0:
        raise ValueError("uvarint must be >= 0")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_uvarint(buf: bytes | bytearray, pos: int = 0) -> tuple[int, int] | None:
    """(value, next position), or None when `buf` ends inside the varint."""
    result = 0
    for i in range(_MAX_UVARINT_BYTES):
        if pos + i >= len(buf):
            return None
        byte = buf[pos + i]
        result |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i > 0 and byte == 0:
                raise MalformedMessage("non-minimal uvarint length prefix")
            return result, pos + i + 1
    raise MalformedMessage("uvarint length prefix longer than 10 bytes")


def encode_frame(msg: Any, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    body = encode(msg)
    if len(body) > max_frame_bytes:
        raise MalformedMessage(f"frame of {len(body)} bytes exceeds the {max_frame_bytes}-byte limit")
    return encode_uvarint(len(body)) + body


def decode_frame(
    data: bytes, expect: type[T] | tuple[type, ...] | None = None, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> T:
    """Decode exactly one whole frame."""
    decoder = FrameDecoder(max_frame_bytes)
    decoder.feed(data)
    body = decoder.next_body()
    if body is None:
        raise MalformedMessage("truncated frame")
    if decoder.buffered:
        raise MalformedMessage(f"{decoder.buffered} bytes after the frame")
    return decode(body, expect)


class FrameDecoder:
    """Sans-I/O frame splitter: feed bytes, take whole bodies. Buffers at most one frame."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data
        head = decode_uvarint(self._buf)
        if head is not None and head[0] > self.max_frame_bytes:
            raise MalformedMessage(f"frame of {head[0]} bytes exceeds the {self.max_frame_bytes}-byte limit")

    def next_body(self) -> bytes | None:
        head = decode_uvarint(self._buf)
        if head is None:
            return None
        length, start = head
        if length > self.max_frame_bytes:
            raise MalformedMessage(f"frame of {length} bytes exceeds the {self.max_frame_bytes}-byte limit")
        if len(self._buf) < start + length:
            return None
        body = bytes(self._buf[start : start + length])
        del self._buf[: start + length]
        return body


async def read_frame(
    receive: Callable[[int], Awaitable[bytes]],
    decoder: FrameDecoder,
    expect: type[T] | tuple[type, ...] | None = None,
    *,
    chunk: int = 65536,
) -> T | None:
    """Read one message through `receive(n)` (returns b"" at EOF); None on a clean EOF.

    EOF inside a frame is a `MalformedMessage("truncated frame")`.
    """
    while True:
        body = decoder.next_body()
        if body is not None:
            return decode(body, expect)
        data = await receive(chunk)
        if not data:
            if decoder.buffered:
                raise MalformedMessage("truncated frame")
            return None
        decoder.feed(data)
