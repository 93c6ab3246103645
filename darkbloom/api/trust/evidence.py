"""Spot-check evidence, pure: build and sign output/score attestations and reports, and check a report (the relay's side).

Flow: the serving node signs an `OutputAttestation` over commitments to the prompt and output
token ids (salted with the request's secret nonce, `token_hash`) and the digest of the sampling
parameters it served with (`sampling_digest`, seed included); the verifier signs a
`ScoreAttestation` over the same commitments and the digest of the parameters it scored under,
with its per-token scores (and, for seeded requests, replay gaps); when `verify.judge` flags the
output, the shim signs a `SpotCheckReport` carrying both and submits it to the ledger.
`check_report` is what the relay runs before it counts a failed check against the suspect: all
signatures, matching commitments, weights digests and sampling digests (so a shim cannot have
the verifier score under parameters the node did not serve with), a verifier other than the
suspect, and the verdict re-computed from the signed scores.

What the ledger cannot check: the scores themselves (it has no prompt, by design: only
hashes travel). A shim colluding with a verifier could frame a node; the relay should
count reports from distinct reporters (see ledger.reputation failed_checks input).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from darkbloom.api.trust.verify import ScoredOutput, Verdict, VerifyPolicy, judge
from darkbloom.errors import InvalidSignature, MalformedMessage
from darkbloom.identity import Identity, verify_signature
from darkbloom.wire.codec import decode, encode
from darkbloom.wire.ledger import signed_bytes
from darkbloom.wire.trust import OutputAttestation, ScoreAttestation, SpotCheckReport

__all__ = [
    "ATTESTED_TOKENS",
    "attest_output",
    "attest_scores",
    "check_report",
    "make_report",
    "policy_string",
    "sampling_digest",
    "scored_from_attestation",
    "token_hash",
]

_ROLES = {OutputAttestation: "node", ScoreAttestation: "verifier", SpotCheckReport: "reporter"}
ATTESTED_TOKENS = 32  # a serving node attests its first this many output tokens (VerifyPolicy.max_scored_tokens)


def token_hash(token_ids: Iterable[int], nonce: bytes = b"") -> bytes:
    """Commitment to token ids: sha256 over a domain tag, the request's secret nonce and the ids
    as little-endian uint32s (the same on every platform). The relay compares commitments but,
    without the nonce (which only the shim and the nodes hold), cannot test guesses against them.
    Without a nonce (b""): the plain sha256 of the ids, guessable for short sequences."""
    ids = list(token_ids)
    packed = struct.pack(f"<{len(ids)}I", *ids)
    if not nonce:
        return hashlib.sha256(packed).digest()
    return hashlib.sha256(b"darkbloom-token-commitment-v1\0" + struct.pack("<I", len(nonce)) + nonce + packed).digest()


def sampling_digest(sampling: Any, max_tokens: int | None) -> bytes:
    """sha256 of the canonical sampling parameters (a darkbloom.inference.params.Sampling and the
    request's max_tokens): what the serving node and the verifier each sign, so the relay can see
    that the scores were computed under the parameters the node served with."""
    bias = ";".join(f"{int(t)}:{float(b)!r}" for t, b in sorted(sampling.logit_bias))
    text = (f"temperature={float(sampling.temperature)!r},top_p={float(sampling.top_p)!r},top_k={int(sampling.top_k)},"
            f"min_p={float(sampling.min_p)!r},seed={sampling.seed},presence_penalty={float(sampling.presence_penalty)!r},"
            f"frequency_penalty={float(sampling.frequency_penalty)!r},repetition_penalty={float(sampling.repetition_penalty)!r},"
            f"logit_bias={bias},max_tokens={max_tokens}")
    return hashlib.sha256(b"darkbloom-sampling-v1\0" + text.encode()).digest()


def _sign(identity: Identity, msg):  # type: ignore[no-untyped-def]
    return replace(msg, signature=identity.sign(signed_bytes(msg, _ROLES[type(msg)])))


def _check_sig(msg: object, signer_hex: str) -> None:
    try:
        key = bytes.fromhex(signer_hex)
    except ValueError:
        key = b""
    if len(key) != 32 or not verify_signature(key, signed_bytes(msg, _ROLES[type(msg)]), msg.signature):  # type: ignore[attr-defined]
        raise InvalidSignature(type(msg).TYPE, signer_hex)  # type: ignore[attr-defined]


def attest_output(
    identity: Identity, *, request_id: str, model: str, model_digest: str, prompt_ids: Sequence[int], output_ids: Sequence[int], time_ms: int,
    nonce: bytes = b"", sampling: bytes = b"",
) -> OutputAttestation:
    """Node side: sign what it produced (commitments only). `nonce`: the request's
    (InferRequest.nonce); `sampling`: `sampling_digest` of the parameters it served with."""
    return _sign(
        identity,
        OutputAttestation(
            request_id=request_id, node=identity.public_key.hex(), model=model, model_digest=model_digest,
            prompt_hash=token_hash(prompt_ids, nonce), output_hash=token_hash(output_ids, nonce), output_tokens=len(output_ids),
            time_ms=time_ms, sampling_digest=sampling,
        ),
    )


def attest_scores(
    identity: Identity, *, model_digest: str, prompt_ids: Sequence[int], output_ids: Sequence[int],
    logprobs: Sequence[float], ranks: Sequence[int], time_ms: int,
    sampled: Sequence[Any] = (), sampling: str = "", tilts: Sequence[float] = (),
    nonce: bytes = b"", sampling_digest: bytes = b"",
) -> ScoreAttestation:
    """Verifier side: sign the teacher-forced scores of `output_ids` after `prompt_ids`.
    `sampled`: darkbloom.inference.scoring.SampledToken per output token (computed with tilt
    exponents `tilts` under the distribution `sampling` describes), or () when not computed;
    their replay gaps are signed when every token has one. `nonce`: the scored request's
    (InferRequest.nonce); `sampling_digest`: of the parameters scored under (`sampling_digest`)."""
    if len(logprobs) != len(output_ids) or len(ranks) != len(output_ids):
        raise ValueError("one logprob and one rank per output token")
    if sampled and (len(sampled) != len(output_ids) or not tilts):
        raise ValueError("one sampled score per output token, with the tilt exponents")
    ms = lambda x: round(x * 1000)  # noqa: E731
    return _sign(
        identity,
        ScoreAttestation(
            verifier=identity.public_key.hex(), model_digest=model_digest, prompt_hash=token_hash(prompt_ids, nonce),
            output_hash=token_hash(output_ids, nonce), sampling_digest=sampling_digest, logprobs_mnats=tuple(ms(x) for x in logprobs),
            ranks=tuple(int(r) for r in ranks), time_ms=time_ms,
            sampling=sampling if sampled else "",
            sample_logprobs_mnats=tuple(0 if t.excluded else ms(t.sample_logprob) for t in sampled),
            excluded=tuple(i for i, t in enumerate(sampled) if t.excluded),
            entropies_mnats=tuple(ms(t.entropy) for t in sampled),
            variances_mnats=tuple(ms(t.variance) for t in sampled),
            tilts_milli=tuple(ms(th) for th in tilts) if sampled else (),
            log_tilts_mnats=tuple(ms(x) for t in sampled for x in t.log_tilts),
            replay_gaps_mnats=tuple(_gap_mnats(t.replay_gap) for t in sampled)
            if sampled and all(getattr(t, "replay_gap", None) is not None for t in sampled) else (),
        ),
    )


def _gap_mnats(gap: float) -> int:
    """A replay gap in milli-nats, rounded up (rounding never turns a miss into a pass), capped."""
    return _MAX_GAP_MNATS if not gap < _MAX_GAP_MNATS / 1000 else max(0, math.ceil(gap * 1000))


_MAX_GAP_MNATS = 10**9


def scored_from_attestation(score: ScoreAttestation) -> ScoredOutput:
    """The verifier's signed scores as the verdict reads them. Raises MalformedMessage when the
    sampled statistics do not fit together (a broken or malicious verifier)."""
    raw = (tuple(x / 1000 for x in score.logprobs_mnats), score.ranks)
    if not score.sample_logprobs_mnats:
        return ScoredOutput(*raw)
    n, g = len(score.sample_logprobs_mnats), len(score.tilts_milli)
    if g == 0 or len(score.log_tilts_mnats) != n * g or any(not 0 <= i < n for i in score.excluded):
        raise MalformedMessage("trust.score: sampled statistics do not cover the scored tokens")
    if score.replay_gaps_mnats and (len(score.replay_gaps_mnats) != n or any(x < 0 for x in score.replay_gaps_mnats)):
        raise MalformedMessage("trust.score: replay gaps do not cover the scored tokens")
    ex = set(score.excluded)
    try:
        return ScoredOutput(
            *raw,
            sample_logprobs=tuple(-math.inf if i in ex else x / 1000 for i, x in enumerate(score.sample_logprobs_mnats)),
            entropies=tuple(x / 1000 for x in score.entropies_mnats),
            variances=tuple(x / 1000 for x in score.variances_mnats),
            log_tilts=tuple(tuple(x / 1000 for x in score.log_tilts_mnats[i * g : (i + 1) * g]) for i in range(n)),
            tilts=tuple(x / 1000 for x in score.tilts_milli),
            excluded=tuple(i in ex for i in range(n)),
            replay_gaps=tuple(x / 1000 for x in score.replay_gaps_mnats),
        )
    except ValueError as exc:
        raise MalformedMessage(f"trust.score: {exc}") from exc


def policy_string(policy: VerifyPolicy) -> str:
    return (f"max_log_evalue={policy.max_log_evalue:.4f},max_excluded={policy.max_excluded},min_z={policy.min_z},"
            f"top_k={policy.top_k},max_outside={policy.max_outside},min_mean_logprob={policy.min_mean_logprob},"
            f"min_tokens={policy.min_tokens},max_scored_tokens={policy.max_scored_tokens},"
            f"far_logprob={policy.far_logprob},max_far={policy.max_far}")


def make_report(identity: Identity, output: OutputAttestation, score: ScoreAttestation, verdict: Verdict, policy: VerifyPolicy, *, time_ms: int) -> SpotCheckReport:
    """Shim side: a signed report of a flagged node (call only when `verdict.flagged`)."""
    if not verdict.flagged:
        raise ValueError("only a flagged verdict is reported")
    return _sign(
        identity,
        SpotCheckReport(
            reporter=identity.public_key.hex(), suspect=output.node, output=encode(output), score=encode(score),
            reason=verdict.reason, policy=policy_string(policy), time_ms=time_ms,
        ),
    )


def check_report(report: SpotCheckReport, policy: VerifyPolicy, *, verifier_ok: Iterable[str] | None = None) -> Verdict:
    """Relay side: raise InvalidSignature / MalformedMessage unless the report proves a failed check
    under `policy` (the relay's own, not the one the report names). Returns the re-computed verdict.
    `verifier_ok`: when given, the verifier must be one of these keys (e.g. nodes that serve the digest)."""
    _check_sig(report, report.reporter)
    out = decode(report.output, OutputAttestation)
    score = decode(report.score, ScoreAttestation)
    _check_sig(out, out.node)
    _check_sig(score, score.verifier)
    if out.node != report.suspect:
        raise MalformedMessage("trust.spot_check: suspect is not the node that signed the output")
    if score.verifier == out.node:
        raise MalformedMessage("trust.spot_check: a node cannot verify itself")
    if verifier_ok is not None and score.verifier not in set(verifier_ok):
        raise MalformedMessage("trust.spot_check: the verifier does not serve this model")
    if (out.prompt_hash, out.output_hash, out.model_digest) != (score.prompt_hash, score.output_hash, score.model_digest):
        raise MalformedMessage("trust.spot_check: the attestations are about different work")
    if out.sampling_digest != score.sampling_digest:
        raise MalformedMessage("trust.spot_check: the scores are under other sampling parameters than the node served with")
    if score.sample_logprobs_mnats and not score.sampling_digest:
        raise MalformedMessage("trust.spot_check: scores under a sampling distribution must name its parameters (sampling digest)")
    if len(score.ranks) != out.output_tokens or len(score.logprobs_mnats) != out.output_tokens:
        raise MalformedMessage("trust.spot_check: scores do not cover the attested output")
    verdict = judge(scored_from_attestation(score), policy)
    if not verdict.flagged:
        raise MalformedMessage("trust.spot_check: the signed scores pass the policy; nothing to count")
    return verdict
