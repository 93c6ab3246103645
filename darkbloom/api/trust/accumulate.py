"""Per-node spot-check evidence, pure: the final e-values of a node's separate checks combined into one e-detector that flags at 1/alpha.

One check on SmolLM2 at t=1.0 with <= 24 tokens catches another model 82% of the time; the
evidence of several checks of the same node adds up. For each (node, weights digest) the shim
keeps the final log e-values ln E_1, ln E_2, ... of its conclusive checks (verify.Verdict
.final_log_evalue: the e-process at the last scored token, not its running maximum, which is
not an e-value). For an honest node each E_k has conditional mean <= 1 given all earlier checks
(the node samples afresh; the verifier's statistics are those of the claimed distribution).

Which combination, and why (the honest bound must hold over the node's whole lifetime here):

* Plain product P_k = E_1 ... E_k: a test supermartingale, so by Ville P(sup_k P_k >= 1/alpha)
  <= alpha for the lifetime. But an honest stretch drives ln P far below 0 (mean ln E < 0), so a
  node that turns to cheating after 100 good checks has to climb back from that hole first.
* Clipping ln P at 0 (CUSUM-style restart) is NOT valid: every restart is a fresh chance to
  cross the threshold, and the bound degrades with the number of checks.
* Restarting every K checks keeps alpha per block only (union bound over blocks), not per node.
* Chosen: a weighted mixture of products started at every check (an e-detector),
      S_k = sum_{j<=k} w_j E_j ... E_k,  w_j = 1/(j (j+1)),  sum_j w_j = 1,
  computed as S_k = (S_{k-1} + w_k) E_k. With the weights not yet spent held as cash,
  T_k = S_k + sum_{j>k} w_j is a nonnegative supermartingale with T_0 = 1 and T_k >= S_k, so
  P(sup_k S_k >= 1/alpha) <= alpha over the node's lifetime, like the plain product. A node
  cheating from its first check pays at most ln 2 against the plain product (w_1 = 1/2); one
  that turns after j honest checks pays about 2 ln j instead of the whole honest hole.
* After an accumulated flag the detector restarts at S = 0 with fresh weights: the first false
  flag already has probability <= alpha, so restarting does not raise it (a second false flag
  needs another <= alpha event), and later flags rest on new evidence only.

Checks whose verifier is itself flagged are dropped (its scores are not e-values) and the
detector is recomputed over the kept checks. That recomputation starts a second path, so it is
outside the single-path Ville argument; it happens only when a verifier is caught cheating, and
only removes a cheater's scores. The history kept for it is capped (MAX_HISTORY, oldest dropped
from the history only: the running S_k itself is never recomputed because of the cap).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["DEFAULT_ACCUMULATE_LOG_EVALUE", "EvidenceBook", "NodeEvidence", "detector_weight", "log_detector"]

DEFAULT_ACCUMULATE_LOG_EVALUE = math.log(1e3)  # flag when the node's detector reaches 10^3
MAX_HISTORY = 1024  # checks kept per (node, digest)


def detector_weight(k: int) -> float:
    """w_k = 1/(k (k+1)) for the k-th check (1-based) since the last restart; the w_k sum to 1."""
    return 1.0 / (k * (k + 1))


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def log_detector(log_evalues: Iterable[float]) -> list[float]:
    """ln S_k after each check for per-check ln E_k (S_0 = 0; see the module docstring)."""
    s, out = -math.inf, []
    for k, le in enumerate(log_evalues, start=1):
        s = _logaddexp(s, math.log(detector_weight(k))) + le
        out.append(s)
    return out


@dataclass(slots=True)
class NodeEvidence:
    """The checks of one (node, digest) since its detector last restarted."""

    checks: list[tuple[str, float]] = field(default_factory=list)  # (verifier, final ln E)
    log_s: float = -math.inf  # ln S_k
    k: int = 0  # checks since the last restart (the index of the next weight - 1)
    flags: int = 0  # accumulated flags so far (each restarted the detector)
    total_checks: int = 0  # over the lifetime, restarts included

    def add(self, verifier: str, log_e: float) -> float:
        if math.isnan(log_e):
            raise ValueError("a log e-value cannot be NaN")
        self.checks.append((verifier, log_e))
        if len(self.checks) > MAX_HISTORY:
            del self.checks[0]
        self.total_checks += 1
        self.k += 1
        self.log_s = _logaddexp(self.log_s, math.log(detector_weight(self.k))) + log_e
        return self.log_s

    def recompute(self) -> None:
        vals = log_detector(le for _, le in self.checks)
        self.log_s = vals[-1] if vals else -math.inf
        self.k = len(self.checks)

    def restart(self) -> None:
        self.checks.clear()
        self.log_s = -math.inf
        self.k = 0


@dataclass(slots=True)
class EvidenceBook:
    """Per (node, digest) e-detectors. `add` returns the accumulated ln S and whether it reached
    the threshold (the caller then flags the node as for a failed check; the detector restarts)."""

    threshold: float = DEFAULT_ACCUMULATE_LOG_EVALUE  # inf turns accumulation off
    nodes: dict[tuple[str, str], NodeEvidence] = field(default_factory=dict)

    def get(self, node: str, digest: str = "") -> NodeEvidence:
        ev = self.nodes.get((node, digest))
        if ev is None:
            ev = self.nodes[(node, digest)] = NodeEvidence()
        return ev

    def add(self, node: str, digest: str, log_e: float, *, verifier: str = "") -> tuple[float, int, bool]:
        """Record one conclusive check; returns (ln S, checks it rests on, flagged now)."""
        ev = self.get(node, digest)
        log_s = ev.add(verifier, log_e)
        n = ev.k
        if log_s >= self.threshold:
            ev.flags += 1
            ev.restart()
            return log_s, n, True
        return log_s, n, False

    def drop_verifier(self, verifier: str) -> None:
        """`verifier` was flagged: its scores of others no longer count."""
        if not verifier:
            return
        for ev in self.nodes.values():
            if any(v == verifier for v, _ in ev.checks):
                ev.checks = [(v, le) for v, le in ev.checks if v != verifier]
                ev.recompute()

    def log_evalue(self, node: str, digest: str = "") -> float:
        ev = self.nodes.get((node, digest))
        return -math.inf if ev is None else ev.log_s
