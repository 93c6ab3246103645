"""Trust in the shim: live peer statistics, circuit breaker, reputation mix, spot checks (with replayed seeded draws), canaries, hedging, node classes.

Pure modules (no I/O, no clock: `now` is passed in) except `hedge.race`, a small trio helper.
"""

from darkbloom.api.trust.breaker import BreakerPolicy, CircuitBreaker
from darkbloom.api.trust.canary import CanaryBook, CanaryReply, CanaryResult, features_of, make_canary, reply_from_frames
from darkbloom.api.trust.classes import UptimeTracker, class_satisfies, classify, region_verdict, within_price
from darkbloom.api.trust.evidence import attest_output, attest_scores, check_report, make_report, sampling_digest, token_hash
from darkbloom.api.trust.hedge import HedgeOutcome, HedgePolicy, hedge_delay, race
from darkbloom.api.trust.reputation_mix import MixPolicy, PeerTrust, TrustBook
from darkbloom.api.trust.routing import BreakerRefused, Opened, TrustedRouting, failure_kind
from darkbloom.api.trust.seeding import replay_seeded
from darkbloom.api.trust.stats import LatencyWindow, PeerLiveStats, StatsPolicy
from darkbloom.api.trust.verify import DEFAULT_POLICY, ScoredOutput, Verdict, VerifyPolicy, judge, should_spot_check

__all__ = [
    "DEFAULT_POLICY",
    "BreakerPolicy",
    "BreakerRefused",
    "CanaryBook",
    "CanaryReply",
    "CanaryResult",
    "CircuitBreaker",
    "HedgeOutcome",
    "HedgePolicy",
    "LatencyWindow",
    "MixPolicy",
    "Opened",
    "PeerLiveStats",
    "PeerTrust",
    "ScoredOutput",
    "StatsPolicy",
    "TrustBook",
    "TrustedRouting",
    "UptimeTracker",
    "Verdict",
    "VerifyPolicy",
    "attest_output",
    "attest_scores",
    "check_report",
    "class_satisfies",
    "classify",
    "failure_kind",
    "features_of",
    "hedge_delay",
    "judge",
    "make_canary",
    "make_report",
    "race",
    "region_verdict",
    "reply_from_frames",
    "should_spot_check",
    "replay_seeded",
    "sampling_digest",
    "token_hash",
    "within_price",
]
