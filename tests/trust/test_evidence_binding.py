"""Spot-check evidence binds the sampling parameters (no framing with other parameters) and commits to token ids with a secret nonce (no dictionary attack by the relay)."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from types import SimpleNamespace

import pytest

from darkbloom.api.trust.evidence import attest_output, attest_scores, check_report, make_report, sampling_digest, token_hash
from darkbloom.api.trust.report import usable_output_attestation
from darkbloom.api.trust.verify import judge
from darkbloom.errors import EvidenceRejected, MalformedMessage
from darkbloom.identity import Identity
from darkbloom.inference.params import parse_chat
from darkbloom.relay.intake import RELAY_POLICY, TrustStore, admit
from darkbloom.api.trust.evidence import scored_from_attestation
from darkbloom.wire.codec import encode

NODE, VERIFIER, SHIM = (Identity.from_seed(bytes([i]) * 32) for i in (81, 82, 83))
NOW_MS = 1_800_000_000_000
PROMPT, OUTPUT = [17, 4242], list(range(300, 316))
NONCE = bytes(range(16))
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1.0, "seed": 12345, "max_tokens": 64}


def _digest(body: dict) -> bytes:
    req = parse_chat(dict(body))
    return sampling_digest(req.sampling, req.max_tokens)


def _tokens(n: int, *, gap: float) -> list[SimpleNamespace]:
    """Verifier statistics of n tokens that look honest to the e-value (log q = -H) but, replayed,
    are beaten by the seed's forced draw by `gap` nats."""
    return [SimpleNamespace(logprob=-1.0, rank=0, sample_logprob=-1.0, entropy=1.0, variance=0.5, log_tilts=(1.0,) * 5,
                            excluded=False, replay_gap=gap) for _ in range(n)]


def _attest(*, served: dict = BODY, scored: dict = BODY, gap: float = 3.0, node_nonce: bytes = NONCE,
            verifier_nonce: bytes = NONCE):
    out = attest_output(NODE, request_id="r", model="m", model_digest="d" * 64, prompt_ids=PROMPT, output_ids=OUTPUT,
                        time_ms=NOW_MS - 2000, nonce=node_nonce, sampling=_digest(served))
    toks = _tokens(len(OUTPUT), gap=gap)
    score = attest_scores(VERIFIER, model_digest="d" * 64, prompt_ids=PROMPT, output_ids=OUTPUT,
                          logprobs=[t.logprob for t in toks], ranks=[t.rank for t in toks], time_ms=NOW_MS - 1000,
                          sampled=toks, sampling="temperature=1", tilts=(0.1, 0.25, 0.5, 0.75, 1.0),
                          nonce=verifier_nonce, sampling_digest=_digest(scored))
    return out, score


def _report(out, score, verdict=None):
    verdict = verdict or judge(scored_from_attestation(score), RELAY_POLICY)
    return make_report(SHIM, out, score, verdict, RELAY_POLICY, time_ms=NOW_MS)


def test_sampling_digest_covers_every_parameter() -> None:
    base = _digest(BODY)
    assert base == _digest(dict(BODY)) and len(base) == 32  # the node and the verifier parse the same body alike
    for change in ({"temperature": 0.7}, {"seed": 12346}, {"top_p": 0.9}, {"top_k": 40}, {"min_p": 0.1},
                   {"presence_penalty": 0.5}, {"frequency_penalty": 0.5}, {"repetition_penalty": 1.1},
                   {"logit_bias": {"5": 2}}, {"max_tokens": 65}):
        assert _digest({**BODY, **change}) != base, change


def test_replayed_misses_are_evidence_the_relay_accepts() -> None:
    out, score = _attest()
    assert len(score.replay_gaps_mnats) == len(OUTPUT) and set(score.replay_gaps_mnats) == {3000}
    report = _report(out, score)
    verdict = check_report(report, RELAY_POLICY)
    assert verdict.flagged and verdict.reason == "replay_mismatch" and verdict.replay_misses == len(OUTPUT)
    accepted, _ = admit(report, now_ms=NOW_MS)
    assert accepted.reason == "replay_mismatch"
    # The same statistics within the numerical slack prove nothing: refused whatever the shim claims.
    out_ok, score_ok = _attest(gap=0.001)
    assert not judge(scored_from_attestation(score_ok), RELAY_POLICY).flagged
    with pytest.raises(EvidenceRejected, match="pass the policy"):
        admit(_report(out_ok, score_ok, verdict), now_ms=NOW_MS)


def test_a_shim_cannot_frame_a_node_with_other_sampling_parameters() -> None:
    # The node served at temperature 1.0 with seed 12345; the shim tells the verifier "temperature 0.2"
    # (or another seed), under which the node's honest tokens look wrong.
    for claim in ({**BODY, "temperature": 0.2}, {**BODY, "seed": 1}):
        out, score = _attest(scored=claim)
        with pytest.raises(MalformedMessage, match="other sampling parameters"):
            check_report(_report(out, score), RELAY_POLICY)
        with pytest.raises(EvidenceRejected, match="other sampling parameters"):
            admit(_report(out, score), now_ms=NOW_MS)
        assert usable_output_attestation(encode(out), NODE.public_key.hex(), score) is None  # the shim does not send it
    # Scores under a sampling distribution that name no parameters are no evidence either.
    out, score = _attest()
    bare_out = attest_output(NODE, request_id="r", model="m", model_digest="d" * 64, prompt_ids=PROMPT, output_ids=OUTPUT,
                             time_ms=NOW_MS - 2000, nonce=NONCE)
    from darkbloom.api.trust.evidence import _sign  # re-sign the verifier's statement without the digest

    bare_score = _sign(VERIFIER, dataclasses.replace(score, sampling_digest=b"", signature=b""))
    with pytest.raises(MalformedMessage, match="must name its parameters"):
        check_report(_report(bare_out, bare_score), RELAY_POLICY)


def test_commitments_are_salted_with_the_request_nonce(tmp_path) -> None:
    out, score = _attest()
    plain = hashlib.sha256(struct.pack("<2I", *PROMPT)).digest()
    assert token_hash(PROMPT) == plain  # without a nonce: the guessable hash
    assert out.prompt_hash == token_hash(PROMPT, NONCE) != plain and out.output_hash != token_hash(OUTPUT)
    assert token_hash(PROMPT, NONCE) != token_hash(PROMPT, bytes(16))
    # The relay's dictionary attack: every prompt of one or two token ids from a 5000-id vocabulary.
    table = {hashlib.sha256(struct.pack("<I", a)).digest() for a in range(5000)}
    table |= {hashlib.sha256(struct.pack("<2I", 17, b)).digest() for b in range(5000)}
    assert plain in table and out.prompt_hash not in table
    # It still compares the two attestations: a verifier given another nonce scored "different work".
    other_out, other_score = _attest(verifier_nonce=bytes(16))
    with pytest.raises(MalformedMessage, match="different work"):
        check_report(_report(other_out, other_score), RELAY_POLICY)
    # What the relay stores holds neither the ids nor their unsalted hashes.
    store = TrustStore(tmp_path / "trust.sqlite3")
    report = _report(out, score)
    accepted, _ = admit(report, now_ms=NOW_MS)
    assert store.add(accepted, report, epoch=1)
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert raw and plain not in raw and token_hash(OUTPUT) not in raw and out.prompt_hash in raw
