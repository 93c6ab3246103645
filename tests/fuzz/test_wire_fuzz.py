"""Hypothesis fuzzing of every wire decoder and the capability-record validator (pure, no sockets).

Properties: any mutation of a valid encoding (msgpack-level or byte-level) decodes to a
registered message or raises `MalformedMessage`, nothing else; what decodes re-encodes to
something that decodes to the same value; the frame splitter never buffers more than one
frame plus one chunk; signed ledger messages and capability records reject every mutation
that changes their meaning with their own typed error.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from darkbloom.errors import LedgerError, MalformedMessage, RecordRejected
from darkbloom.identity import Identity
from darkbloom.ledger.receipts import decode_strict, sign_voucher, verify_voucher
from darkbloom.p2p.keys import caps_key, peer_id_from_public_key
from darkbloom.p2p.records import build_record, verify_record
from darkbloom.wire.caps import CapabilityRecord, ModelCap
from darkbloom.wire.codec import FrameDecoder, decode, encode, encode_frame, encode_uvarint
from darkbloom.wire.ledger import Voucher

from .strategies import ALL_TYPES, instances, message_and_mutant, mutated_bytes

PER_TYPE = settings(max_examples=10, deadline=None,
                    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow, HealthCheck.data_too_large])
IDS = [n for n, _ in ALL_TYPES]
LEDGER_TYPES = [(n, c) for n, c in ALL_TYPES if n.startswith("ledger.")]


@pytest.mark.parametrize("name,cls", ALL_TYPES, ids=IDS)
@PER_TYPE
@given(data=st.data())
def test_mutated_bodies_decode_or_raise_malformed(name, cls, data):
    original, mutant = data.draw(message_and_mutant(cls))
    try:
        msg = decode(mutant)
    except MalformedMessage as exc:
        assert exc.reason  # says why
        return
    assert type(msg).TYPE in dict(ALL_TYPES)
    assert decode(encode(msg)) == msg  # what passed the checks is a well-formed message
    try:
        pinned = decode(mutant, cls)
    except MalformedMessage:
        assert type(msg) is not cls  # `expect` refuses exactly the other types
    else:
        assert isinstance(pinned, cls)


@pytest.mark.parametrize("name,cls", ALL_TYPES, ids=IDS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_frame_streams_split_anywhere_with_garbage_after(name, cls, data):
    """Valid frames then garbage, fed in random chunks: every valid frame comes out in order,
    then either more frames or one MalformedMessage; the buffer stays bounded."""
    limit = 4096
    msgs = data.draw(st.lists(instances(cls), min_size=1, max_size=4))
    frames = [encode_frame(m, 1 << 30) for m in msgs]
    tail = data.draw(st.binary(max_size=64) | st.just(encode_uvarint(limit + 1)))
    stream = b"".join(frames) + tail
    decoder = FrameDecoder(limit)
    out, pos = [], 0
    try:
        while pos < len(stream):
            chunk = data.draw(st.integers(1, 512))
            decoder.feed(stream[pos:pos + chunk])
            pos += chunk
            assert decoder.buffered <= limit + 10 + chunk
            while (body := decoder.next_body()) is not None:
                out.append(decode(body))
    except MalformedMessage:
        pass
    fitting = [m for m, f in zip(msgs, frames) if len(f) <= limit + 1]
    if len(fitting) == len(msgs):  # frames above the limit are refused, as they must be
        assert out[:len(msgs)] == msgs


@pytest.mark.parametrize("name,cls", LEDGER_TYPES, ids=[n for n, _ in LEDGER_TYPES])
@PER_TYPE
@given(data=st.data())
def test_signed_ledger_messages_accept_only_their_canonical_bytes(name, cls, data):
    original, mutant = data.draw(message_and_mutant(cls))
    try:
        msg = decode_strict(mutant, cls)
    except MalformedMessage:
        return
    assert encode(msg) == mutant  # one byte string per signed message, never two


CONSUMER, NODE = Identity.generate(), Identity.generate()


@FUZZ
@given(data=st.data())
def test_any_change_to_a_countersigned_voucher_fails_verification(data):
    v = Voucher(lane="ab" * 16, seq=data.draw(st.integers(1, 1000)), cum_prompt_tokens=data.draw(st.integers(0, 10**6)),
                cum_completion_tokens=data.draw(st.integers(0, 10**6)), cum_cost=data.draw(st.integers(0, 10**9)),
                chain=bytes(32), model_digest="sha256:" + "0" * 64, time_ms=1_700_000_000_000)
    signed = sign_voucher(NODE, sign_voucher(CONSUMER, v, "consumer"), "node")
    verify_voucher(signed, CONSUMER.public_key.hex(), NODE.public_key.hex())
    blob = encode(signed)
    mutant = data.draw(mutated_bytes(blob))
    try:
        changed = decode_strict(mutant, Voucher)
        verify_voucher(changed, CONSUMER.public_key.hex(), NODE.public_key.hex())
    except (MalformedMessage, LedgerError):
        return
    assert changed == signed and mutant == blob  # only the unchanged voucher verifies


SIGNER = Identity.generate()
SIGNER_ID = peer_id_from_public_key(SIGNER.public_key)
NOW_MS = 1_700_000_000_000


def _record(**changes: object) -> CapabilityRecord:
    fields: dict = {"region": "eu-west", "max_concurrent": 4, **changes}
    template = CapabilityRecord(
        peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0,
        models=(ModelCap(id="tiny-chat", digest="ab" * 32, context_length=2048, features=("json",)),), **fields)
    return build_record(SIGNER, template, seq=NOW_MS, now_ms=NOW_MS, ttl_ms=600_000,
                        addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{SIGNER_ID}",), reachability="public")


@FUZZ
@given(data=st.data())
def test_record_validator_rejects_every_meaningful_mutation(data):
    record = _record(price_output_per_m=data.draw(st.integers(0, 10**9)), region=data.draw(st.text(max_size=16)))
    value = encode(record)
    key = caps_key(SIGNER_ID)
    assert verify_record(key, value, now_ms=NOW_MS, max_bytes=16384) == record
    mutant = data.draw(mutated_bytes(value))
    try:
        accepted = verify_record(key, mutant, now_ms=NOW_MS, max_bytes=16384)
    except RecordRejected as exc:
        assert exc.reason
        return
    assert accepted == record  # a re-encoding of the same signed values, nothing else


@FUZZ
@given(key=st.text(max_size=120) | st.just(caps_key(SIGNER_ID)), value=st.binary(max_size=300),
       now_ms=st.integers(0, 2**62))
def test_record_validator_on_arbitrary_keys_values_and_times(key, value, now_ms):
    try:
        verify_record(key, value, now_ms=now_ms, max_bytes=256)
    except RecordRejected:
        pass


@FUZZ
@given(data=st.data())
def test_re_signed_records_with_hostile_fields_are_judged_by_the_rules(data):
    """A peer signs whatever it likes: the validator still enforces times, size and key."""
    fields = {
        "issued_at_ms": data.draw(st.integers(0, 2**62)),
        "expires_at_ms": data.draw(st.integers(0, 2**62)),
        "seq": data.draw(st.integers(0, 2**62)),
        "addrs": tuple(data.draw(st.lists(st.text(max_size=40), max_size=5))),
        "region": data.draw(st.text(max_size=2000)),
    }
    record = dataclasses.replace(_record(), **fields, signature=b"")
    from darkbloom.p2p.records import sign_record

    value = encode(sign_record(SIGNER, record))
    now = NOW_MS
    try:
        got = verify_record(caps_key(SIGNER_ID), value, now_ms=now, max_bytes=1024)
    except RecordRejected:
        return
    assert len(value) <= 1024
    assert got.issued_at_ms <= now + 60_000 < got.expires_at_ms + 60_000 and now < got.expires_at_ms
    assert got.expires_at_ms - got.issued_at_ms <= 24 * 3600 * 1000
