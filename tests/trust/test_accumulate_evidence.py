"""Per-node accumulated spot-check evidence: the e-detector's lifetime bound for honest nodes, catching weak cheats over several checks, and the TrustBook accounting of an accumulated flag."""

from __future__ import annotations

import math
import random

import pytest

from darkbloom.api.trust.accumulate import EvidenceBook, NodeEvidence, detector_weight, log_detector
from darkbloom.api.trust.evidence import attest_output, attest_scores, check_report, make_report
from darkbloom.api.trust.reputation_mix import TrustBook
from darkbloom.api.trust.routing import TrustedRouting
from darkbloom.api.trust.verify import (
    DEFAULT_POLICY,
    ScoredOutput,
    Verdict,
    final_log_evalue,
    judge,
    log_evalue,
    stopped_log_evalue,
)
from tests.trust.test_verify_scoring import _output
from darkbloom.errors import MalformedMessage
from darkbloom.identity import Identity

ALPHA = 0.05  # a bound visible with a few thousand simulated nodes
LN = math.log(1 / ALPHA)


def _honest_e(rng: random.Random) -> float:
    """ln of an e-value with mean exactly 1 (a likelihood ratio under the null), skewed like
    the measured ones: mostly below 1, sometimes well above."""
    return math.log(0.4) if rng.random() < 0.8 else math.log(3.4)  # 0.8*0.4 + 0.2*3.4 = 1


def _verdict(final: float, *, flagged: bool = False, inconclusive: bool = False, reason: str = "") -> Verdict:
    return Verdict(flagged, inconclusive, reason, 16, 0, -1.0, log_evalue=max(final, 0.0), check_log_evalue=final)


def test_detector_recursion_matches_the_weighted_sum_of_products() -> None:
    les = [0.3, -1.2, 2.0, 0.7, -0.1]
    got = log_detector(les)
    for k in range(1, len(les) + 1):
        direct = sum(detector_weight(j) * math.exp(sum(les[j - 1 : k])) for j in range(1, k + 1))
        assert got[k - 1] == pytest.approx(math.log(direct))
    assert sum(detector_weight(j) for j in range(1, 10_000)) == pytest.approx(1.0, abs=1e-3)


def test_honest_nodes_are_flagged_at_most_alpha_over_their_lifetime_and_clipping_would_break_it() -> None:
    rng = random.Random(3)
    nodes, checks = 1500, 300
    detector_flags = product_flags = clipped_flags = 0
    for _ in range(nodes):
        ev = NodeEvidence()
        prod = clipped = 0.0
        hit_d = hit_p = hit_c = False
        for _ in range(checks):
            le = _honest_e(rng)
            hit_d |= ev.add("", le) >= LN
            prod += le
            hit_p |= prod >= LN
            clipped = max(0.0, clipped + le)  # the invalid "never below 0" restart
            hit_c |= clipped >= LN
        detector_flags += hit_d
        product_flags += hit_p
        clipped_flags += hit_c
    bound = nodes * ALPHA + 3 * math.sqrt(nodes * ALPHA)
    assert detector_flags <= bound and product_flags <= bound
    assert clipped_flags > 2 * bound  # clipping at 0 is not an e-process: it flags honest nodes far above alpha


def test_weak_cheats_are_caught_after_a_few_checks_and_a_late_turn_costs_little() -> None:
    rng = random.Random(5)
    # a cheat whose single check rarely crosses ln 20: ln E ~ N(1.2, 1.5)
    caught_after = []
    for _ in range(300):
        book = EvidenceBook(threshold=LN)
        for k in range(1, 41):
            if book.add("n", "d", rng.gauss(1.2, 1.5))[2]:
                caught_after.append(k)
                break
    single = sum(1 for k in caught_after if k == 1)
    assert single < 100 and len(caught_after) >= 295  # one check catches a minority; accumulation nearly all
    # 200 honest checks, then the same cheat: the detector restarts from its weights, not from the honest hole
    late = []
    for _ in range(100):
        ev, plain = NodeEvidence(), 0.0
        for _ in range(200):
            le = _honest_e(rng)
            ev.add("", le)
            plain += le
        for k in range(1, 61):
            le = rng.gauss(1.2, 1.5)
            plain += le
            if ev.add("", le) >= LN:
                late.append(k)
                break
        assert plain < LN  # the plain product is still in its hole
    assert len(late) >= 95 and sorted(late)[len(late) // 2] <= 15


def test_trustbook_accumulated_flag_has_the_consequences_of_a_failed_check_and_restarts() -> None:
    book = TrustBook()
    book.evidence.threshold = math.log(1000)
    out = [book.record_spot_check("p", float(i), _verdict(2.0), verifier="v", digest="d1") for i in range(5)]
    assert [v.flagged for v in out] == [False, False, False, True, False]  # ln S crosses 6.91 at the 4th check
    hit = out[3]
    assert hit.reason == "accumulated_evalue" and hit.accumulated_checks == 4
    assert hit.accumulated_log_evalue >= math.log(1000)
    p = book.peers["p"]
    assert p.local_flags == 1 and p.flagged_by == ["v"] and not book.usable("p", 4.0)
    assert book.reputation("p", 4.0) < 0.1 * book.reputation("fresh", 4.0)
    assert book.evidence.get("p", "d1").k == 1  # restarted after the flag; the 5th check starts anew
    snap = book.snapshot(["p"], 5.0)["p"]
    assert snap["flags"] == 1 and snap["evidence_log_e"] == pytest.approx(math.log(0.5) + 2.0, abs=1e-3)
    # another digest of the same node has its own detector; inconclusive checks add nothing
    book.record_spot_check("p", 5.0, _verdict(5.0, inconclusive=True), verifier="v", digest="d2")
    assert book.evidence.get("p", "d2").k == 0
    # a per-check flag keeps its own reason and counts once
    v = book.record_spot_check("q", 6.0, _verdict(8.0, flagged=True, reason="high_evalue"), verifier="v", digest="d1")
    assert v.reason == "high_evalue" and book.peers["q"].local_flags == 1


def test_a_flagged_verifier_scores_leave_the_accumulated_evidence() -> None:
    book = TrustBook()
    for i in range(3):
        book.record_spot_check("p", float(i), _verdict(2.0), verifier="bad", digest="d")
    assert book.evidence.log_evalue("p", "d") > 4.0
    book.record_spot_check("bad", 3.0, _verdict(9.0, flagged=True, reason="high_evalue"), verifier="other", digest="d")
    assert book.evidence.log_evalue("p", "d") == -math.inf  # only "bad" had scored p
    before = book.evidence.get("p", "d").k
    book.record_spot_check("p", 4.0, _verdict(3.0), verifier="bad", digest="d")  # a flagged verifier no longer counts
    assert book.evidence.get("p", "d").k == before


def _weak_cheat_output(lq: float = -4.0, n: int = 6) -> ScoredOutput:
    """Tokens somewhat less likely than the claimed distribution's own samples: each check's
    e-process stays under 1000, its final value above 1."""
    h = 2.0
    tilts = (0.5, 1.0)
    log_tilt = (math.log(8.0), math.log(30.0))  # ln sum q^(1-theta): below what -theta*lq pays for
    return ScoredOutput((lq,) * n, (3,) * n, sample_logprobs=(lq,) * n, entropies=(h,) * n, variances=(1.0,) * n,
                        log_tilts=(log_tilt,) * n, tilts=tilts, excluded=(False,) * n)


def test_judge_path_weak_cheat_passes_each_check_but_is_flagged_on_accumulated_evidence_and_reported() -> None:
    x = _weak_cheat_output()
    single = judge(x, DEFAULT_POLICY)
    assert not single.flagged and 0 < single.check_log_evalue <= log_evalue(x) < DEFAULT_POLICY.max_log_evalue
    assert single.check_log_evalue == pytest.approx(stopped_log_evalue(x, stops=DEFAULT_POLICY.accumulate_stops))
    trusted = TrustedRouting()
    verdicts = [trusted.judge_spot_check("node", x, float(i), temperature=1.0, verifier="ver", digest="d") for i in range(12)]
    first = next(i for i, v in enumerate(verdicts) if v.flagged)
    assert 1 <= first < 11 and verdicts[first].reason == "accumulated_evalue"
    # what is sent to the relay: the last check's two attestations with reason "accumulated_evalue"
    node, ver, shim = (Identity.from_seed(bytes([i]) * 32) for i in (51, 52, 53))
    out = attest_output(node, request_id="r", model="m", model_digest="d" * 64, prompt_ids=[1, 2], output_ids=[5] * 6, time_ms=1)
    score = attest_scores(ver, model_digest="d" * 64, prompt_ids=[1, 2], output_ids=[5] * 6, logprobs=x.logprobs, ranks=x.ranks,
                          time_ms=2)
    report = make_report(shim, out, score, verdicts[first], DEFAULT_POLICY, time_ms=3)
    assert report.reason == "accumulated_evalue" and report.suspect == node.public_key.hex()
    # the relay re-judges the single check it is shown, which passes: it cannot count this report
    with pytest.raises(MalformedMessage):
        check_report(report, DEFAULT_POLICY)


def test_stopped_and_final_evalues_have_mean_one_for_honest_outputs_the_running_max_does_not() -> None:
    """Optional stopping: the e-process at a bounded stopping time (the last token, or the first
    crossing of a level) has mean 1 under honest sampling; its running maximum is larger."""
    rng = random.Random(9)
    xs = [_output(rng, 12, 1.0, 1.0, vocab=12) for _ in range(1500)]
    mean = lambda vals: sum(math.exp(v) for v in vals) / len(xs)  # noqa: E731
    finals = mean(final_log_evalue(x) for x in xs)
    stopped = mean(stopped_log_evalue(x, stops=(1.0, 2.0)) for x in xs)
    peaks = mean(log_evalue(x) for x in xs)
    # mean <= 1 (the sample mean of a heavy-tailed e-value tends to fall below 1, never far above)
    assert finals < 1.2 and stopped < 1.2
    assert peaks > 1.5  # the running maximum is not an e-value: its mean is well above 1
    for x in xs[:50]:
        assert final_log_evalue(x) <= log_evalue(x) and stopped_log_evalue(x, stops=(1.0,)) <= log_evalue(x)


def test_config_sets_the_accumulated_threshold_and_stop_levels() -> None:
    import dataclasses

    from darkbloom.api.trust.refresh import routing_from_config
    from darkbloom.config import ApiConfig

    base = ApiConfig()
    assert routing_from_config(base).book.evidence.threshold == pytest.approx(math.log(1000))  # type: ignore[attr-defined]
    t = routing_from_config(dataclasses.replace(base, spot_check_accumulate=20.0, spot_check_policy="accumulate_stops=4"))
    assert t.book.evidence.threshold == pytest.approx(math.log(20))  # type: ignore[attr-defined]
    assert t.policies.high.accumulate_stops == (4.0,)  # type: ignore[attr-defined]
    off = routing_from_config(dataclasses.replace(base, spot_check_accumulate=0.0))
    assert off.book.evidence.threshold == math.inf  # type: ignore[attr-defined]
