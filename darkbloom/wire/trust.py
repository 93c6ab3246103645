"""Messages of trust: output and score attestations, spot-check reports, and the relay's signed reputation table.

Privacy: none of these carry prompt or output content, only commitments to token ids:
sha256 over a per-request secret nonce and the ids (`evidence.token_hash`). The shim draws the
nonce (`InferRequest.nonce`) and gives it to the serving node and the verifier, never to the
relay, so the relay can compare two attestations' commitments but cannot test guesses of a
short prompt against them; the ledger that stores reports never holds what was asked or answered. Scores are the
verifier's per-token logprobs (milli-nats, integers) and ranks for the scored window, and the
statistics of the request's sampling distribution the spot-check e-value needs
(darkbloom.api.trust.verify).

Who signs what (signature over `signed_bytes(msg, role)` from darkbloom.wire.ledger):
- `OutputAttestation`: the serving node (role "node"): "I produced these output tokens for
  this prompt with these weights".
- `ScoreAttestation`: the verifier node (role "verifier"): "under these weights, those
  tokens score so".
- `SpotCheckReport`: the shim that ran the check (role "reporter"); it carries both
  attestations as encoded bytes (so their signatures stay checkable).
- `ReputationTable`: the ledger/relay (role "ledger").
"""

from __future__ import annotations

from dataclasses import dataclass

from darkbloom.wire.codec import message

__all__ = [
    "OutputAttestation",
    "ReputationEntry",
    "ReputationTable",
    "ScoreAttestation",
    "SpotCheckReport",
]


@message("trust.output")
@dataclass(frozen=True, slots=True, kw_only=True)
class OutputAttestation:
    """Set and signed by the serving node at the end of a request (e.g. alongside `infer.done`)."""

    request_id: str
    node: str  # hex public key of the serving node
    model: str
    model_digest: str  # weights digest it claims to serve
    prompt_hash: bytes  # commitment to the prompt token ids: sha256(domain, request nonce, ids) (evidence.token_hash)
    output_hash: bytes  # the same over the attested output token ids
    output_tokens: int  # how many output tokens the hash covers
    time_ms: int
    # sha256 of the canonical sampling parameters the node served with (temperature, top_p, top_k,
    # min_p, seed, penalties, logit_bias, max_tokens; evidence.sampling_digest): a shim cannot
    # claim other parameters to a verifier without the relay seeing the digests differ.
    sampling_digest: bytes = b""
    signature: bytes = b""


@message("trust.score")
@dataclass(frozen=True, slots=True, kw_only=True)
class ScoreAttestation:
    """Set and signed by the verifier after a teacher-forced forward pass."""

    verifier: str  # hex public key of the scoring node
    model_digest: str
    prompt_hash: bytes  # as OutputAttestation (the same nonce)
    output_hash: bytes
    sampling_digest: bytes = b""  # evidence.sampling_digest of the parameters the verifier scored under
    logprobs_mnats: tuple[int, ...]  # per token, natural-log probability x 1000, rounded
    ranks: tuple[int, ...]  # per token, 0 = the verifier's argmax
    time_ms: int
    # Under the request's sampling distribution q (all empty when the verifier could not rebuild
    # q, e.g. penalties; then only the raw scores above count). Set by the verifier:
    sampling: str = ""  # scoring.SamplingSpec.describe() of q, e.g. "temperature=0.7,top_p=1,..."
    sample_logprobs_mnats: tuple[int, ...] = ()  # per token, log q(token) x 1000 (0 where excluded)
    excluded: tuple[int, ...] = ()  # positions of tokens q cannot produce (outside top_k/top_p/min_p, not the argmax)
    entropies_mnats: tuple[int, ...] = ()  # per token, H(q) in nats x 1000
    variances_mnats: tuple[int, ...] = ()  # per token, Var[log q(X)] in nats^2 x 1000
    tilts_milli: tuple[int, ...] = ()  # tilt exponents theta x 1000 (scoring.TILTS)
    log_tilts_mnats: tuple[int, ...] = ()  # per token then per theta, log sum_v q(v)^(1-theta) x 1000
    # Seeded sampled requests (darkbloom.inference.replay): per token, the nats by which the draw the
    # seed's noise forces beats it, x 1000 rounded up (0 for the forced draw). Empty when not replayed.
    replay_gaps_mnats: tuple[int, ...] = ()
    signature: bytes = b""


@message("trust.spot_check")
@dataclass(frozen=True, slots=True, kw_only=True)
class SpotCheckReport:
    """Shim -> ledger: a node failed a spot check. Both attestations travel encoded."""

    reporter: str  # hex public key of the shim
    suspect: str  # hex public key of the flagged node (== the output attestation's node)
    output: bytes  # encode(OutputAttestation), signed by the suspect
    score: bytes  # encode(ScoreAttestation), signed by the verifier
    reason: str  # the verdict's reason, e.g. "high_evalue", "excluded_token", "outside_top_k"
    policy: str  # the verdict policy, "max_log_evalue=9.21,max_excluded=0,...,top_k=100,..."
    time_ms: int
    signature: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReputationEntry:
    node: str  # hex public key
    score_ppm: int  # reputation in [0, 1_000_000]
    consumers: int  # distinct paying consumers inside the window
    completion_tokens: int  # settled inside the window
    failed_checks: int  # accepted spot-check reports inside the window
    epochs: int  # epochs inside the window in which the node was paid
    failed_features: tuple[str, ...] = ()  # capability canaries ("json", "tools", "logprobs") it failed lately
    node_class: str = ""  # class the relay derived from its observations ("" when it has none)
    uptime_ppm: int = -1  # share of the relay's probes it answered over the last day; -1 unknown


@message("trust.reputation")
@dataclass(frozen=True, slots=True, kw_only=True)
class ReputationTable:
    """Published by the relay after each epoch; shims verify it with the ledger's key."""

    epoch: int  # last settled epoch included
    window_epochs: int
    computed_ms: int
    entries: tuple[ReputationEntry, ...] = ()
    ledger: str = ""  # hex public key of the signer
    signature: bytes = b""
