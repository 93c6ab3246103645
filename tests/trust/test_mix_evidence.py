"""TrustBook (ledger reputation x live stats x spot-check flags) and spot-check evidence signed end to end."""

from __future__ import annotations

import dataclasses

import pytest

from darkbloom.api.trust.breaker import BreakerPolicy
from darkbloom.api.trust.evidence import attest_output, attest_scores, check_report, make_report, token_hash
from darkbloom.api.trust.reputation_mix import TrustBook
from darkbloom.api.trust.verify import ScoredOutput, VerifyPolicy, judge
from darkbloom.errors import InvalidSignature, MalformedMessage
from darkbloom.identity import Identity
from darkbloom.ledger.reputation import compute_reputation, reputation_table, sign_table, verify_table
from darkbloom.wire.codec import decode, encode
from darkbloom.wire.trust import SpotCheckReport

POLICY = VerifyPolicy(top_k=50, max_outside=1, min_mean_logprob=-4.0, min_tokens=4)
NODE, VERIFIER, SHIM, RELAY = (Identity.from_seed(bytes([i]) * 32) for i in (41, 42, 43, 44))
PROMPT = [1, 2, 3, 4, 5]
OUTPUT = [7, 8, 9, 10, 11, 12]


def test_flaky_peer_loses_to_reliable_one_and_breaker_opens() -> None:
    book = TrustBook(breaker_policy=BreakerPolicy(failures=3, window_s=5.0, base_cooldown_s=5.0))
    for i in range(10):
        book.record_success("good", float(i), model="m", ttft_s=0.2, tokens=10, duration_s=1.0)
        if i % 3 == 0:
            book.record_failure("flaky", float(i), "stream_closed")
        else:
            book.record_success("flaky", float(i), model="m", ttft_s=0.2)
    assert book.reputation("good", 10.0) > book.reputation("flaky", 10.0)
    assert book.usable("flaky", 10.0)  # failures were spread out: breaker still closed
    for t in (11.0, 11.5, 12.0):
        book.record_failure("flaky", t, "unreachable")
    assert not book.usable("flaky", 12.0) and not book.allow("flaky", 12.0)
    assert book.allow("flaky", 17.0)  # the half-open probe
    assert not book.allow("flaky", 17.0)
    book.record_cancelled("flaky")  # a hedge loser frees the probe slot
    assert book.allow("flaky", 17.5)
    assert len(book.ttft_window("m")) == 10 + 6
    assert book.snapshot(["good", "flaky", "nobody"], 17.5)["flaky"]["breaker"] == "half_open"


def test_spot_check_flag_cuts_reputation_and_quarantines() -> None:
    book = TrustBook()
    book.record_success("cheat", 0.0)
    before = book.reputation("cheat", 0.0)
    bad = judge(ScoredOutput((-12.0,) * 8, (5000,) * 8), POLICY)
    book.record_spot_check("cheat", 1.0, bad)
    assert book.reputation("cheat", 1.0) < before / 10
    assert not book.usable("cheat", 1.0) and book.usable("cheat", 1.0 + 600.0)
    book.record_spot_check("cheat", 700.0, bad)
    assert not book.usable("cheat", 700.0 + 1199.0)  # the second quarantine is twice as long
    good = judge(ScoredOutput((-1.0,) * 8, (0,) * 8), POLICY)
    book.record_spot_check("honest", 1.0, good)
    assert book.peers["honest"].checks_passed == 1 and book.usable("honest", 1.0)


def test_relay_table_feeds_the_mix() -> None:
    book = TrustBook()
    rep = compute_reputation([], {NODE.public_key.hex(): [1]})
    table = sign_table(RELAY, reputation_table(rep, epoch=1, now_ms=0))
    verify_table(table, RELAY.public_key.hex())
    assert book.apply_table(table, {NODE.public_key.hex(): "peerN"})
    assert book.reputation("peerN", 0.0) == pytest.approx(0.25)
    assert book.reputation("unknown", 0.0) == 0.5
    assert not book.apply_table(table)  # same epoch again: ignored


def _attested(logprobs, ranks, *, verifier=VERIFIER, output=OUTPUT):
    out = attest_output(NODE, request_id="r1", model="m", model_digest="d" * 64, prompt_ids=PROMPT, output_ids=output, time_ms=1)
    score = attest_scores(verifier, model_digest="d" * 64, prompt_ids=PROMPT, output_ids=output, logprobs=logprobs,
                          ranks=ranks, time_ms=2)
    return out, score


def test_report_round_trip_is_accepted_by_the_relay() -> None:
    out, score = _attested([-11.0] * 6, [3000] * 6)
    verdict = judge(ScoredOutput((-11.0,) * 6, (3000,) * 6), POLICY)
    report = decode(encode(make_report(SHIM, out, score, verdict, POLICY, time_ms=3)), SpotCheckReport)
    again = check_report(report, POLICY, verifier_ok=[VERIFIER.public_key.hex()])
    assert again.flagged and again.reason == "outside_top_k"
    assert token_hash(OUTPUT) == out.output_hash != token_hash(OUTPUT[::-1])


def test_relay_rejects_bad_reports() -> None:
    out, score = _attested([-11.0] * 6, [3000] * 6)
    flagged = judge(ScoredOutput((-11.0,) * 6, (3000,) * 6), POLICY)
    report = make_report(SHIM, out, score, flagged, POLICY, time_ms=3)
    with pytest.raises(InvalidSignature):  # tampered after signing
        check_report(dataclasses.replace(report, reason="x"), POLICY)
    with pytest.raises(MalformedMessage):  # verifier not among the nodes serving the digest
        check_report(report, POLICY, verifier_ok=[])
    # scores that pass the relay's policy prove nothing
    ok_out, ok_score = _attested([-0.5] * 6, [0] * 6)
    fake = make_report(SHIM, ok_out, ok_score, flagged, POLICY, time_ms=3)
    with pytest.raises(MalformedMessage):
        check_report(fake, POLICY)
    # the node cannot be its own verifier
    self_out, self_score = _attested([-11.0] * 6, [3000] * 6, verifier=NODE)
    with pytest.raises(MalformedMessage):
        check_report(make_report(SHIM, self_out, self_score, flagged, POLICY, time_ms=3), POLICY)
    # scores about other tokens than the node attested
    other_out, _ = _attested([-11.0] * 6, [3000] * 6)
    _, other_score = _attested([-11.0] * 6, [3000] * 6, output=[1, 1, 1, 1, 1, 1])
    with pytest.raises(MalformedMessage):
        check_report(make_report(SHIM, other_out, other_score, flagged, POLICY, time_ms=3), POLICY)
    with pytest.raises(ValueError):
        make_report(SHIM, out, score, judge(ScoredOutput((-0.5,) * 6, (0,) * 6), POLICY), POLICY, time_ms=3)


def test_a_cheating_verifier_cannot_keep_an_honest_node_out() -> None:
    book = TrustBook()
    bad = judge(ScoredOutput((-12.0,) * 8, (5000,) * 8), POLICY)
    book.record_spot_check("honest", 1.0, bad, verifier="cheat")  # the cheat verified the honest node
    assert not book.usable("honest", 2.0)
    book.record_spot_check("cheat", 3.0, bad, verifier="honest2")  # then the cheat is caught
    assert book.usable("honest", 3.0) and book.peers["honest"].local_flags == 0
    assert not book.usable("cheat", 3.0)
    book.record_spot_check("honest", 4.0, bad, verifier="cheat")  # a flagged verifier is not heard
    assert book.usable("honest", 4.0)
    # flags from two verifiers: withdrawing one leaves the other standing
    book.record_spot_check("x", 5.0, bad, verifier="v1")
    book.record_spot_check("x", 5.0, bad, verifier="v2")
    book.record_spot_check("v1", 6.0, bad, verifier="v3")
    assert book.peers["x"].local_flags == 1 and not book.usable("x", 6.0)
