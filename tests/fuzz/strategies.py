"""Hypothesis strategies for fuzzing: valid instances of every registered wire message, and
mutations of their encodings (msgpack-level and byte-level)."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import types
import typing

import msgpack
from hypothesis import strategies as st

import darkbloom.wire
from darkbloom.wire.codec import encode, message_types
from darkbloom.wire.infer import Embeddings

for _mod in pkgutil.iter_modules(darkbloom.wire.__path__):  # every wire module registers its messages
    importlib.import_module(f"darkbloom.wire.{_mod.name}")

ALL_TYPES = sorted(message_types().items())

text = st.text(max_size=24)
scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False), text, st.binary(max_size=24))
anything = st.recursive(scalar, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(text, c, max_size=4)),
                        max_leaves=10)

_hex = lambda n: st.text("0123456789abcdef", min_size=n, max_size=n)  # noqa: E731
_sig = st.binary(min_size=64, max_size=64) | st.just(b"")
# Fields whose classes check their shape in __post_init__, so generated instances are valid often.
BY_NAME = {
    "lane": _hex(32), "consumer": _hex(64), "node": _hex(64), "ledger": _hex(64), "account": _hex(64),
    "signature": _sig, "consumer_sig": _sig, "node_sig": _sig,
    "chain": st.binary(min_size=32, max_size=32), "nonce": st.binary(min_size=16, max_size=16),
}


def for_hint(hint: typing.Any) -> st.SearchStrategy:
    if hint is typing.Any:
        return anything
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[for_hint(a) for a in args])
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is tuple:
        if args and args[-1] is not Ellipsis:
            return st.tuples(*[for_hint(a) for a in args])
        return st.lists(for_hint(args[0]), max_size=3).map(tuple)
    if origin is dict:
        return st.dictionaries(for_hint(args[0]), for_hint(args[1]), max_size=3)
    if dataclasses.is_dataclass(hint):
        return instances(hint)
    return {
        int: st.integers(0, 2**63 - 1), float: st.floats(allow_nan=False), str: text,
        bytes: st.binary(max_size=48), bool: st.booleans(), type(None): st.none(),
    }[hint]


def instances(cls: type) -> st.SearchStrategy:
    """Valid instances of a message (or nested dataclass) class."""
    if cls is Embeddings:
        return st.tuples(st.integers(0, 4), st.integers(0, 3)).flatmap(lambda dc: st.builds(
            Embeddings, request_id=text, dim=st.just(dc[0]), count=st.just(dc[1]),
            vectors=st.binary(min_size=dc[0] * dc[1] * 4, max_size=dc[0] * dc[1] * 4), prompt_tokens=st.integers(0, 9)))
    hints = typing.get_type_hints(cls)
    fields = {f.name: BY_NAME[f.name] if f.name in BY_NAME else for_hint(hints[f.name]) for f in dataclasses.fields(cls)}

    def build(values: dict) -> object | None:
        try:
            return cls(**values)
        except (TypeError, ValueError):  # an invariant of __post_init__ (tested with each message)
            return None

    return st.fixed_dictionaries(fields).map(build).filter(lambda m: m is not None)


@st.composite
def mutated_map(draw: st.DrawFn, body: bytes) -> bytes:
    """A msgpack-level mutation of a valid body: drop, add, retype a field, or swap the type name."""
    data = msgpack.unpackb(body, raw=False)
    keys = sorted(data)
    op = draw(st.sampled_from(["drop", "add", "retype", "rename", "nest"]))
    if op == "drop":
        data.pop(draw(st.sampled_from(keys)))
    elif op == "add":
        data[draw(text)] = draw(anything)
    elif op == "retype":
        data[draw(st.sampled_from(keys))] = draw(anything)
    elif op == "rename":
        data["type"] = draw(st.sampled_from([n for n, _ in ALL_TYPES]) | text)
    else:
        key = draw(st.sampled_from(keys))
        data[key] = [data[key]] if draw(st.booleans()) else {"x": data[key]}
    return msgpack.packb(data, use_bin_type=True)


@st.composite
def mutated_bytes(draw: st.DrawFn, blob: bytes) -> bytes:
    """A byte-level mutation: flipped bits, a cut, inserted or overwritten bytes."""
    out = bytearray(blob)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "overwrite"]))
        if not out:
            out += draw(st.binary(min_size=1, max_size=8))
            continue
        i = draw(st.integers(0, len(out) - 1))
        if op == "flip":
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del out[i:]
        elif op == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            out[i] = draw(st.integers(0, 255))
    return bytes(out)


@st.composite
def message_and_mutant(draw: st.DrawFn, cls: type) -> tuple[object, bytes]:
    msg = draw(instances(cls))
    body = encode(msg)
    mutant = draw(st.one_of(mutated_map(body), mutated_bytes(body)))
    return msg, mutant
