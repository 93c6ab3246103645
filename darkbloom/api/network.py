"""`NetworkBackend`: discovery -> candidates -> ranking -> stream, with failover before the first byte.

For each request: `find_providers(model)` gives peers with verified capability records;
they become router `Candidate`s, `router.rank` orders them (filters, breaker, score), and
peers are tried in order until one gives its first content frame within
`first_token_timeout_s`. A connect error, `NoCapacity`, a timeout or a node error moves on
to the next peer (at most `max_attempts`); a bad request is final. Piggybacked load and
measured latency update `PeerStats`; failures open a peer's circuit breaker.

Churn: when every provider's breaker is open, the one closing first gets one request as a
half-open probe (one at a time per peer), so nodes that came back are used again at once. When
a fresh lookup finds no provider (the DHT servers nearest the model key died),
the last good candidate list of that model is routed by instead (breakers still apply), so a
burst of lookups failing fast does not become a burst of `no_provider`. A peer that cannot be
reached gets its capability record fetched afresh; if it now announces other addresses (it
restarted elsewhere) it is tried once more there.

Lookups stay off the request path: while `run` is running (the shim starts it), a provider
list older than CANDIDATES_TTL_S (but younger than STALE_MAX_S) still routes the request at
once, and a single background lookup refreshes it. A DHT lookup on a loaded machine takes
100-250 ms; it used to land on every tenth second's request. After a failure the list is
dropped, so the next request looks up afresh and waits for it, as before.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from darkbloom.api import errors as api_errors
from darkbloom.api import router
from darkbloom.api.backend import Frame, ModelListing
from darkbloom.api.client import InferCall, is_final
from darkbloom.api.metering import open_metered
from darkbloom.api.router import Candidate, PeerStats, RouteHints
from darkbloom.api.timeline import timeline
from darkbloom.config import ApiConfig
from darkbloom.errors import DarkbloomError, MalformedMessage, ModelNotFound, NoCapacity, P2PError, PeerUnreachable
from darkbloom.wire.caps import CapabilityRecord
from darkbloom.wire.infer import Accepted, Delta, Done, InferRequest, NodeLoad

__all__ = ["NetworkBackend", "NetworkSession", "candidates_from_record", "spot_checkable"]

log = logging.getLogger(__name__)
_tl = timeline("shim")

CANDIDATES_TTL_S = 10.0  # reuse a model's provider list this long; failures force a fresh lookup
STALE_MAX_S = 60.0  # with `run` running: route by an older list this long while a background lookup refreshes it
LAST_GOOD_TTL_S = 600.0  # route by the last non-empty provider list this long when lookups find nothing
RECORD_REFRESH_S = 5.0  # at most this long fetching an unreachable peer's record afresh


def spot_checkable(params: dict[str, Any]) -> bool:
    """Can a second node reproduce the distribution this answer was sampled from? (pure)

    Temperature, top_p, top_k, min_p and logit_bias the verifier rebuilds; not penalties, a
    grammar (JSON mode, tools) or n > 1.
    """
    rf = params.get("response_format")
    return not (
        params.get("presence_penalty") or params.get("frequency_penalty") or params.get("repetition_penalty")
        or (params.get("tools") and params.get("tool_choice") != "none")
        or (isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema"))
        or (params.get("n") or 1) != 1
    )


def candidates_from_record(record: CapabilityRecord, model_id: str, *, relayed: bool = False) -> Candidate | None:
    cap = record.model(model_id)
    if cap is None:
        return None
    return Candidate(
        peer_id=record.peer_id,
        model=model_id,
        digest=cap.digest,
        features=frozenset(cap.features),
        region=record.region,
        node_class=record.node_class,
        price_input_per_m=record.price_input_per_m,
        price_output_per_m=record.price_output_per_m,
        decode_tps=record.decode_tps,
        max_concurrent=max(1, record.max_concurrent),
        context_length=cap.context_length,
        relayed=relayed or record.reachability == "relayed",
        addrs=tuple(record.addrs),
    )


@dataclass
class NetworkSession:
    """A committed request on one node; the first content frame is already buffered."""

    call: InferCall
    backend: NetworkBackend
    first: Frame | None
    started: float = 0.0  # trio time the attempt started
    trust_ttft_s: float | None = None  # set when the trust layer opened it
    tokens: int = 0  # completion tokens received
    _released: bool = field(default=False, repr=False)
    _last_at: float | None = field(default=None, repr=False)  # trio time the previous frame was handed on

    @property
    def node_id(self) -> str:
        return self.call.peer_id

    @property
    def route(self) -> str:
        return self.call.route

    @property
    def accepted(self) -> Accepted:
        return self.call.accepted

    async def receive(self) -> Frame | None:
        if self.first is not None:
            frame, self.first = self.first, None
        else:
            try:
                frame = await self.call.receive()
            except DarkbloomError as exc:
                if not is_final(exc):  # the node broke an answer it had started: count it against it
                    now = trio.current_time()
                    router.record_failure(self.backend._stats(self.node_id), now)
                    if self.backend.trust is not None:
                        self.backend.trust.failed_midstream(self.node_id, now)
                raise
        now = trio.current_time()
        if isinstance(frame, Delta):
            self.tokens += frame.tokens
            metrics = self.backend.metrics
            if metrics is not None and self._last_at is not None and frame.tokens:
                metrics.token_gap(now - self._last_at, frame.tokens)
        elif isinstance(frame, Done):
            self.backend._note_load(self.node_id, frame.load)
            if self.backend.trust is not None:
                self.backend.trust.finished(self.node_id, now, ttft_s=self.trust_ttft_s, tokens=self.tokens,
                                            duration_s=now - self.started)
        self._last_at = now
        return frame

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self.backend._stats(self.node_id).inflight -= 1
        await self.call.aclose()


class NetworkBackend:
    """The real `Backend` over a `PeerNetwork`. `known_models`: ids that exist even with no provider."""

    def __init__(
        self,
        network: Any,
        config: ApiConfig | None = None,
        *,
        known_models: Iterable[str] = (),
        trust: Any | None = None,
        meter: Any | None = None,
    ) -> None:
        """`trust`: an optional `darkbloom.api.trust.routing.TrustedRouting` (reputation mix,
        breaker and quarantine, canary gate, hedging); without it, routing uses `router` alone."""
        self.network = network
        self.trust = trust
        self.meter = meter  # a darkbloom.api.metering.ConsumerMeter: pay nodes through ledger lanes
        self.on_spot_check: Any | None = None  # called (served_by, verdict or None) after each spot check
        self.reporter: Any | None = None  # darkbloom.api.trust.report.Reporter: flagged nodes go to the relay
        self.metrics: Any | None = None  # a darkbloom.metrics.RoleMetrics: lookups, routes, token gaps
        self.config = config or ApiConfig()
        self.known_models = set(known_models)
        self.stats: dict[str, PeerStats] = {}
        self._cache: dict[str, tuple[float, list[Candidate]]] = {}
        self._last_good: dict[str, tuple[float, list[Candidate]]] = {}  # model -> last non-empty list
        self._probing: set[str] = set()  # peers with a half-open probe in flight (every breaker open)
        self._probed = trio.Event()  # set (and replaced) whenever a probe ends
        self._seen_models: set[str] = set()  # every model id in a record this shim has read
        self._nursery: trio.Nursery | None = None  # set while `run` runs: background provider lookups
        self._refreshing: set[str] = set()  # models with a background lookup in flight

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the background provider lookups until cancelled (see the module docstring)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def _refresh(self, model: str) -> None:
        """One background lookup of `model`'s providers; the request that asked for it did not wait."""
        try:
            await self._candidates(model, cached=False)
        except DarkbloomError as exc:  # the stale list stays; a later request asks again
            log.debug("background provider lookup for %s failed: %s", model, type(exc).__name__)
        except Exception as exc:  # a bug must not take the shim's nursery down with it
            log.warning("background provider lookup for %s failed: %s", model, type(exc).__name__)
        finally:
            self._refreshing.discard(model)

    def _stats(self, peer_id: str) -> PeerStats:
        return self.stats.setdefault(peer_id, PeerStats())

    def _note_load(self, peer_id: str, load: NodeLoad) -> None:
        router.record_load(self._stats(peer_id), trio.current_time(), active=load.active, queued=load.queued,
                           max_concurrent=load.max_concurrent, paused=load.paused)

    async def _candidates(self, model: str, *, cached: bool = True, fallback: bool = True) -> list[Candidate]:
        """Providers of `model` as candidates; a DHT lookup at most every CANDIDATES_TTL_S per model.

        With `fallback`, a lookup that finds nothing (or fails) answers the last good list of
        the last LAST_GOOD_TTL_S instead (see the module docstring).
        """
        now = trio.current_time()
        hit = self._cache.get(model)
        if cached and hit is not None and now - hit[0] < CANDIDATES_TTL_S:
            return hit[1]
        if cached and hit is not None and now - hit[0] < STALE_MAX_S and self._nursery is not None:
            if model not in self._refreshing:
                self._refreshing.add(model)
                self._nursery.start_soon(self._refresh, model)
            return hit[1]
        try:
            providers = await self.network.find_providers(model)
            if not providers:
                providers = await self.network.find_providers(model, fresh=True)
            self._count_dht("find_providers", "ok" if providers else "empty")
        except P2PError as exc:
            self._count_dht("find_providers", "error")
            last = self._last_good.get(model)
            if not fallback or last is None or now - last[0] >= LAST_GOOD_TTL_S:
                raise
            log.warning("provider lookup for %s failed (%s)", model, type(exc).__name__)
            providers = []
        out = []
        for p in providers:
            self._seen_models.update(m.id for m in p.record.models)
            c = candidates_from_record(p.record, model, relayed=p.route_hint == "relayed")
            if c is not None:
                out.append(c)
        if out:
            self._cache[model] = (now, out)
            self._last_good[model] = (now, out)
            return out
        self._cache.pop(model, None)
        last = self._last_good.get(model)
        if fallback and last is not None and now - last[0] < LAST_GOOD_TTL_S:
            log.warning("no provider of %s found; routing by the last good list (%d peers, %.0f s old)",
                        model, len(last[1]), now - last[0])
            return last[1]
        return out

    def _count_dht(self, kind: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.dht(kind, outcome)

    def _replace_candidate(self, model: str, fresh: Candidate) -> None:
        """Put `fresh` in place of the same peer's entry in the cached and last good lists."""
        for table in (self._cache, self._last_good):
            hit = table.get(model)
            if hit is not None:
                table[model] = (hit[0], [fresh if c.peer_id == fresh.peer_id else c for c in hit[1]])

    async def _moved(self, cand: Candidate) -> Candidate | None:
        """After `cand` was unreachable: its candidate from a freshly fetched record, if that
        record announces other addresses (the node restarted elsewhere); else None."""
        record = None
        with trio.move_on_after(min(RECORD_REFRESH_S, self.config.first_token_timeout_s)):
            try:
                record = await self.network.get_record(cand.peer_id, fresh=True)
                self._count_dht("get_record", "ok" if record is not None else "empty")
            except DarkbloomError as exc:  # no fresher record to be had: the failure stands
                self._count_dht("get_record", "error")
                log.debug("record refresh for %s failed: %s", cand.peer_id[-8:], type(exc).__name__)
        if record is None:
            return None
        fresh = candidates_from_record(record, cand.model, relayed=cand.relayed)
        if fresh is None or set(fresh.addrs) == set(cand.addrs):
            return None
        log.info("peer %s announces new addresses; redialling there", cand.peer_id[-8:])
        self._replace_candidate(cand.model, fresh)
        return fresh

    async def _attempt_or_redial(self, cand: Candidate, request: InferRequest) -> NetworkSession:
        """`_attempt`; if the peer was unreachable and its record moved, one more attempt at the new addresses."""
        try:
            return await self._attempt(cand, request)
        except PeerUnreachable:
            fresh = await self._moved(cand)
            if fresh is None:
                raise
        return await self._attempt(fresh, request)

    # --- Backend --------------------------------------------------------------------------

    async def list_models(self) -> list[ModelListing]:
        ids = self.known_models | self._seen_models
        for peer in self.network.peers():
            try:
                record = await self.network.get_record(peer)
            except DarkbloomError:
                continue  # a peer without a readable record offers nothing to list
            if record is not None:
                ids.update(m.id for m in record.models)
                self._seen_models.update(m.id for m in record.models)
        listings = []
        for model_id in sorted(ids):
            cands = await self._candidates(model_id, cached=False, fallback=False)
            if not cands:
                continue
            pin = [c.price_input_per_m for c in cands]
            pout = [c.price_output_per_m for c in cands]
            features = sorted({f for c in cands for f in c.features})
            listings.append(ModelListing(
                id=model_id,
                providers=len({c.peer_id for c in cands}),
                digests=tuple(sorted({c.digest for c in cands})),
                features=tuple(features),
                price_input_per_m=(min(pin), max(pin)),
                price_output_per_m=(min(pout), max(pout)),
                context_length=max(c.context_length for c in cands),
                kind="embedding" if "embeddings" in features else "chat",
            ))
        return listings

    async def open_session(
        self, request: InferRequest, hints: RouteHints, *, exclude: frozenset[str] = frozenset()
    ) -> NetworkSession:
        cands = await self._candidates(request.model)
        if not cands:
            if request.model in self.known_models:
                raise api_errors.no_provider(request.model)
            raise ModelNotFound(request.model)
        now = trio.current_time()
        if self.trust is not None:
            cands = self.trust.with_observed_classes(cands)  # the relay's measured class, not the declared one
        stats = self.stats if self.trust is None else self.trust.router_stats({c.peer_id for c in cands}, now, self.stats)
        ranked, reason = router.rank(cands, stats, hints, now)
        ranked = [c for c in ranked if c.peer_id not in exclude]
        probe = None
        if not ranked and self.trust is None:
            probe = await self._half_open(cands, hints, exclude)
            ranked = [probe] if probe is not None else []
        if self.trust is not None and ranked:
            await self._run_canaries(ranked, hints.features, request.model)
            ranked = self.trust.order(ranked, hints.features, trio.current_time())
            reason = reason or "every provider is circuit-broken, quarantined or not yet verified"
        if not ranked:
            raise api_errors.no_provider(request.model, reason.removeprefix(f"no provider for model {request.model}").strip(" ,")
                                         if reason else "every provider was tried")
        if self.trust is not None:
            return await self._open_trusted(request, ranked)
        if probe is not None:
            self._probing.add(probe.peer_id)
            log.info("%s every provider of %s failed recently; probing %s", request.request_id, request.model,
                     probe.peer_id[-8:])
            try:
                return await self._attempt_or_redial(probe, request)
            except (DarkbloomError, trio.TooSlowError) as exc:
                if is_final(exc):
                    raise
                raise self._all_failed(request, [exc]) from None
            finally:
                self._probing.discard(probe.peer_id)
                self._probed.set()  # requests waiting for a verdict look again
                self._probed = trio.Event()
        failures: list[BaseException] = []
        budget = max(1, self.config.max_attempts)
        queue = list(ranked[:budget])
        redialled: set[str] = set()
        while queue and len(failures) < budget:
            cand = queue.pop(0)
            try:
                return await self._attempt_or_redial(cand, request)
            except (DarkbloomError, trio.TooSlowError) as exc:
                if is_final(exc):
                    raise
                failures.append(exc)
                if isinstance(exc, PeerUnreachable) and len(ranked) < budget and cand.peer_id not in redialled:
                    # Too few peers to fail over to: a connection that just broke is worth one redial.
                    redialled.add(cand.peer_id)
                    queue.append(cand)
        raise self._all_failed(request, failures)

    async def _half_open(self, cands: list[Candidate], hints: RouteHints, exclude: frozenset[str]) -> Candidate | None:
        """When every provider that fits is circuit-broken: the one whose breaker closes first, as a
        half-open probe (one probe per peer at a time); its success closes the breaker. Without
        this a storm of failures keeps every node out for up to BREAKER_MAX_S after it came back.
        When every such peer is being probed already, wait (bounded) for one probe's verdict
        instead of answering at once: a burst of instant no_provider answers helps nobody."""
        pool, _ = router.filter_candidates(cands, hints)
        pool = [c for c in pool if c.peer_id not in exclude]
        for waited in (False, True):
            now = trio.current_time()
            closed = [c for c in pool if not router.breaker_open(self.stats.get(c.peer_id), now)]
            if closed:  # a probe succeeded meanwhile
                return min(closed, key=lambda c: c.peer_id)
            free = [c for c in pool if c.peer_id not in self._probing]
            if free:
                return min(free, key=lambda c: (self._stats(c.peer_id).open_until, c.peer_id))
            if waited or not pool:
                break
            probed = self._probed
            with trio.move_on_after(self.config.first_token_timeout_s):
                await probed.wait()
        return None

    async def _open_trusted(self, request: InferRequest, order: list[Candidate]) -> NetworkSession:
        """Attempts through the trust layer: its breaker, canary gate, hedging and bookkeeping."""
        assert self.trust is not None
        opened = await self.trust.open(order, lambda c: self._attempt_or_redial(c, request), discard=_discard,
                                       is_final=is_final, model=request.model)
        session = opened.value
        if session is None:
            raise self._all_failed(request, [exc for _, exc in opened.outcome.failures])
        session.trust_ttft_s = opened.ttft_s
        return session

    async def _run_canaries(self, ranked: list[Candidate], features: frozenset[str], model: str) -> None:
        """Prove the features a request needs on the peers it may go to, before it goes (trust layer)."""
        assert self.trust is not None
        needed = self.trust.canaries_needed(ranked[: max(1, self.config.max_attempts)], features, trio.current_time())
        if not needed:
            return
        by_peer = {c.peer_id: c for c in ranked}
        async with trio.open_nursery() as nursery:
            for peer, feats in needed.items():
                for feature in feats:
                    nursery.start_soon(self._canary, by_peer[peer], feature, model)

    async def _canary(self, cand: Candidate, feature: str, model: str) -> None:
        from darkbloom.api.trust.canary import CanaryResult, make_canary, reply_from_frames

        assert self.trust is not None
        canary = make_canary(feature, self.trust.rng)
        request = InferRequest(request_id=f"canary-{secrets.token_hex(8)}", kind="chat", model=model,
                               params=canary.params)
        frames: list[Any] = []
        try:
            with trio.fail_after(self.config.first_token_timeout_s * 2):
                session = await self._attempt(cand, request)
                try:
                    while (frame := await session.receive()) is not None:
                        frames.append(frame)
                finally:
                    await session.aclose()
            result = canary.check(reply_from_frames(frames))
        except (NoCapacity, trio.TooSlowError, P2PError) as exc:
            log.info("canary %s to %s not run (%s)", feature, cand.peer_id[-8:], type(exc).__name__)
            return  # unknown, not failed: the peer stays unproven and out of such requests for now
        except DarkbloomError as exc:  # the node refused or broke a request it claims to serve
            result = CanaryResult(False, f"{type(exc).__name__}")
        self.trust.canaries.record(cand.peer_id, feature, result, trio.current_time())
        if not result.ok:
            log.warning("peer %s failed the %s canary: %s", cand.peer_id[-8:], feature, result.reason)

    # --- spot checks (with the trust layer) ---------------------------------------------------

    def spot_check_wanted(self, request: InferRequest) -> bool:
        """Draw whether to spot-check this finished request (trust layer, checkable requests only)."""
        if self.trust is None or request.kind not in ("chat", "completion"):
            return False
        return self.trust.want_spot_check(spot_checkable(request.params))

    async def spot_check(self, request: InferRequest, served_by: str, digest: str, output_ids: tuple[int, ...],
                         output_attestation: bytes = b"") -> Any:
        """Ask another node serving the same weights to score `served_by`'s output; judge it.
        `output_attestation`: the node's signed OutputAttestation (from ChoiceEnd); with it a
        flagged node is reported to the relay by `self.reporter` (darkbloom.api.trust.report).

        Returns the Verdict (also recorded in the trust book), or None when no verifier could
        run it. Runs after the answer was delivered; the client never waits for it.
        """
        from darkbloom.api.trust.evidence import scored_from_attestation, token_hash
        from darkbloom.api.trust.verify import spot_check_window
        from darkbloom.identity import verify_signature
        from darkbloom.p2p.keys import public_key_from_peer_id
        from darkbloom.wire.ledger import signed_bytes
        from darkbloom.wire.trust import ScoreAttestation

        assert self.trust is not None
        window = spot_check_window(output_ids, self.trust.verify_policy)  # the nonce salts its commitment
        if len(window) < self.trust.verify_policy.min_tokens:
            return None
        now = trio.current_time()
        cands = [c for c in await self._candidates(request.model) if c.peer_id != served_by and c.digest == digest]
        stats = self.trust.router_stats({c.peer_id for c in cands}, now, self.stats)
        ranked, _ = router.rank(cands, stats, RouteHints(model=request.model, digest=digest), now)
        verifiers = [c for c in ranked if self.trust.book.usable(c.peer_id, now)]
        score_request = InferRequest(
            request_id=f"spot-{secrets.token_hex(8)}", kind="score", model=request.model, digest=digest,
            params={"request": request.params, "request_kind": request.kind, "output_token_ids": list(window)},
            nonce=request.nonce)
        for cand in verifiers[:2]:
            attestation = None
            try:
                with trio.fail_after(self.config.first_token_timeout_s * 2):
                    session = await self._attempt(cand, score_request)
                    try:
                        while (frame := await session.receive()) is not None:
                            if isinstance(frame, ScoreAttestation):
                                attestation = frame
                    finally:
                        await session.aclose()
            except (DarkbloomError, trio.TooSlowError) as exc:
                log.info("spot check of %s on %s not run (%s)", served_by[-8:], cand.peer_id[-8:], type(exc).__name__)
                continue
            key = public_key_from_peer_id(cand.peer_id)
            if (attestation is None or attestation.verifier != key.hex() or attestation.output_hash != token_hash(window, request.nonce)
                    or not verify_signature(key, signed_bytes(attestation, "verifier"), attestation.signature)):
                log.warning("verifier %s sent no valid score attestation", cand.peer_id[-8:])
                self.trust.failed_midstream(cand.peer_id, trio.current_time(), "bad_attestation")
                continue
            try:
                scored = scored_from_attestation(attestation)
            except MalformedMessage:  # signed but inconsistent statistics: a broken verifier
                log.warning("verifier %s sent inconsistent score statistics", cand.peer_id[-8:])
                self.trust.failed_midstream(cand.peer_id, trio.current_time(), "bad_attestation")
                continue
            temperature = request.params.get("temperature")
            verdict = self.trust.judge_spot_check(
                served_by, scored, trio.current_time(),
                temperature=float(temperature) if isinstance(temperature, (int, float)) else 1.0, verifier=cand.peer_id,
                digest=digest,
            )
            log.info("spot check of %s by %s: %s", served_by[-8:], cand.peer_id[-8:],
                     "flagged " + verdict.reason if verdict.flagged else ("inconclusive" if verdict.inconclusive else "ok"))
            if verdict.flagged and self.reporter is not None:
                await self.reporter.report(public_key_from_peer_id(served_by).hex(), output_attestation, attestation,
                                           verdict, self.trust.policy_for(temperature if isinstance(temperature, (int, float)) else 1.0))
            if self.on_spot_check is not None:
                self.on_spot_check(served_by, verdict)
            return verdict
        if self.on_spot_check is not None:
            self.on_spot_check(served_by, None)  # no usable verifier this time
        return None

    def _all_failed(self, request: InferRequest, failures: list[BaseException]) -> DarkbloomError:
        self._cache.pop(request.model, None)  # the next request looks the providers up afresh
        if failures and all(isinstance(f, NoCapacity) for f in failures):
            retry = min(f.retry_after_s for f in failures if isinstance(f, NoCapacity))
            return api_errors.all_busy(request.model, retry)
        last = failures[-1] if failures else None
        what = "no first token in time" if isinstance(last, trio.TooSlowError) else type(last).__name__
        return api_errors.upstream_failed(request.model, len(failures), what)

    async def _attempt(self, cand: Candidate, request: InferRequest) -> NetworkSession:
        """Connect, get Accepted and the first content frame within first_token_timeout_s."""
        stats = self._stats(cand.peer_id)
        started = trio.current_time()
        _tl.mark(request.request_id, "routed", peer=cand.peer_id[-8:])
        stats.inflight += 1
        call: InferCall | None = None
        try:
            with trio.fail_after(self.config.first_token_timeout_s):
                # pays through the meter's lanes (a lane refused as busy: the same node again with another)
                call = await open_metered(self.network, self.meter, cand.peer_id, request, addrs=cand.addrs,
                                          price_input_per_m=cand.price_input_per_m,
                                          price_output_per_m=cand.price_output_per_m)
                self._note_load(cand.peer_id, call.accepted.load)
                first = await call.receive()
                _tl.mark(request.request_id, "first_frame")
        except BaseException as exc:
            stats.inflight -= 1
            if call is not None:
                await call.aclose()
            now = trio.current_time()
            if isinstance(exc, NoCapacity):  # load, not unreliability: rank it last for a while
                router.record_load(stats, now, active=1, queued=0, max_concurrent=1)
                log.warning("%s peer %s busy; trying another", request.request_id, cand.peer_id[-8:])
            elif isinstance(exc, (DarkbloomError, trio.TooSlowError)) and not is_final(exc):
                router.record_failure(stats, now)
                what = "no first token in time" if isinstance(exc, trio.TooSlowError) else type(exc).__name__
                log.warning("%s peer %s failed before the first byte (%s); trying another", request.request_id,
                            cand.peer_id[-8:], what)
            raise
        router.record_success(stats, trio.current_time(), trio.current_time() - started)
        if self.metrics is not None:
            self.metrics.routed(call.route)
        log.info("%s routed to %s via %s", request.request_id, cand.peer_id[-8:], call.route)
        return NetworkSession(call=call, backend=self, first=first, started=started)


async def _discard(session: NetworkSession) -> None:
    await session.aclose()
