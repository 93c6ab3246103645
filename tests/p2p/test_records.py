"""Pure capability-record rules: build, sign, verify, select, replay protection, key naming."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from darkbloom.errors import RecordRejected
from darkbloom.identity import Identity
from darkbloom.p2p import keys, records
from darkbloom.wire.caps import CapabilityRecord, ModelCap
from darkbloom.wire.codec import encode

NOW = 1_800_000_000_000
TTL = 60_000
MAX = 16384

ALICE = Identity.from_seed(bytes(range(32)))
MALLORY = Identity.from_seed(bytes(range(1, 33)))

TEMPLATE = CapabilityRecord(
    peer_id="",
    seq=0,
    issued_at_ms=0,
    expires_at_ms=0,
    models=(ModelCap(id="smollm2-135m-instruct", digest="ab" * 32, context_length=8192, quantization="bf16",
                     features=("tools", "json", "logprobs")),),
    prefill_tps=900.5,
    decode_tps=61.0,
    max_concurrent=8,
    region="eu-west",
    node_class="m2",
    price_input_per_m=100_000,
    price_output_per_m=400_000,
    software_version="0.1.0",
    protocol_version="1.0.0",
)


def build(identity: Identity = ALICE, *, seq: int = 1, now: int = NOW, ttl: int = TTL) -> CapabilityRecord:
    return records.build_record(identity, TEMPLATE, seq=seq, now_ms=now, ttl_ms=ttl,
                                addrs=("/ip4/127.0.0.1/tcp/1",), reachability="public")


def key_of(identity: Identity) -> str:
    return keys.caps_key(keys.peer_id_from_public_key(identity.public_key))


def verify(key: str, value: bytes, now: int = NOW) -> CapabilityRecord:
    return records.verify_record(key, value, now_ms=now, max_bytes=MAX)


def test_round_trip_keeps_every_field():
    rec = build()
    got = verify(key_of(ALICE), encode(rec))
    assert got == rec
    assert got.model("smollm2-135m-instruct").features == ("tools", "json", "logprobs")
    assert got.model("other") is None
    assert got.expires_at_ms == NOW + TTL


def test_peer_id_matches_libp2p():
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    kp = create_new_key_pair(ALICE.seed)
    assert keys.peer_id_from_public_key(ALICE.public_key) == ID.from_pubkey(kp.public_key).to_base58()
    assert keys.public_key_from_peer_id(keys.peer_id_from_public_key(ALICE.public_key)) == ALICE.public_key


def test_model_cid_matches_libp2p():
    from libp2p.bitswap.cid import cid_to_text, compute_cid_v1

    assert keys.model_cid("m") == cid_to_text(compute_cid_v1(b"darkbloom-model:m"))
    assert keys.model_cid("a") != keys.model_cid("b")


def test_unsigned_rejected():
    rec = dataclasses.replace(build(), signature=b"")
    with pytest.raises(RecordRejected, match="unsigned"):
        verify(key_of(ALICE), encode(rec))


def test_foreign_signed_rejected():
    # Mallory signs a record that names Alice: the signature does not verify under Alice's key.
    forged = dataclasses.replace(build(MALLORY), peer_id=keys.peer_id_from_public_key(ALICE.public_key))
    with pytest.raises(RecordRejected, match="bad signature"):
        verify(key_of(ALICE), encode(forged))


def test_record_under_another_peers_key_rejected():
    with pytest.raises(RecordRejected, match="another peer"):
        verify(key_of(MALLORY), encode(build(ALICE)))


def test_cannot_sign_for_someone_else():
    with pytest.raises(ValueError):
        records.sign_record(MALLORY, build(ALICE))


def test_expired_rejected_at_the_expiry_instant():
    value = encode(build())
    verify(key_of(ALICE), value, now=NOW + TTL - 1)
    with pytest.raises(RecordRejected, match="expired"):
        verify(key_of(ALICE), value, now=NOW + TTL)


def test_future_and_overlong_rejected():
    with pytest.raises(RecordRejected, match="future"):
        verify(key_of(ALICE), encode(build(now=NOW + records.CLOCK_SKEW_MS + 1000)))
    with pytest.raises(RecordRejected, match="lifetime"):
        verify(key_of(ALICE), encode(build(ttl=records.DEFAULT_MAX_TTL_MS + 1)))


def test_oversize_rejected_before_decoding():
    big = dataclasses.replace(TEMPLATE, region="x" * MAX)
    rec = records.build_record(ALICE, big, seq=1, now_ms=NOW, ttl_ms=TTL, addrs=(), reachability="public")
    with pytest.raises(RecordRejected, match="oversize"):
        verify(key_of(ALICE), encode(rec))


@pytest.mark.parametrize("value", [b"", b"\xc1", b"\x93\x01\x02\x03", b"\x80", b"\x81\xa4type\xa3xyz"])
def test_malformed_rejected(value):
    with pytest.raises(RecordRejected, match="malformed"):
        verify(key_of(ALICE), value)


def test_bad_keys_rejected():
    value = encode(build())
    for key in ("/darkbloom/caps/", "/other/" + keys.peer_id_from_public_key(ALICE.public_key), "caps"):
        with pytest.raises(RecordRejected):
            verify(key, value)


def test_select_prefers_higher_seq():
    a, b, c = build(seq=1), build(seq=3), build(seq=2)
    assert records.select_best([a, b, c]) == 1
    assert records.select_best([a]) == 0
    with pytest.raises(ValueError):
        records.select_best([])


def test_cache_refuses_replayed_older_record():
    cache = records.RecordCache()
    new, old = build(seq=5), build(seq=4)
    assert cache.offer(new, NOW) == new
    with pytest.raises(RecordRejected, match="older"):
        cache.offer(old, NOW)
    assert cache.get(new.peer_id, NOW) == new
    assert cache.get(new.peer_id, NOW + TTL) is None  # expired entries vanish
    assert cache.forget_expired(NOW + TTL) == 0


def test_next_seq_grows_across_restarts():
    assert records.next_seq(0, NOW) == NOW
    assert records.next_seq(NOW, NOW) == NOW + 1
    assert records.next_seq(NOW + 10, NOW) == NOW + 11


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_flipped_bit_fails_verification(data):
    value = bytearray(encode(build()))
    bit = data.draw(st.integers(min_value=0, max_value=len(value) * 8 - 1))
    value[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(RecordRejected):
        verify(key_of(ALICE), bytes(value))


@settings(max_examples=50, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32))
def test_peer_id_round_trip(seed):
    ident = Identity.from_seed(seed)
    pid = keys.peer_id_from_public_key(ident.public_key)
    assert pid.startswith("12D3KooW")
    assert keys.public_key_from_peer_id(pid) == ident.public_key
    assert keys.b58decode(keys.b58encode(b"\0\0" + seed)) == b"\0\0" + seed
