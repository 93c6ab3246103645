"""The node side of `/darkbloom/infer/1.0.0`: read one `InferRequest`, run it, stream frames back.

Per stream: read the request (bounded wait), check the digest pin and the pause state, parse
the OpenAI parameters with the engine's own parser, then answer `Accepted` (or `ErrorFrame`),
`Delta` frames, one `ChoiceEnd` per choice and `Done`; embedding requests get one
`Embeddings` frame. Live load rides on `Accepted` and `Done`. While it generates, a watcher
reads the stream: EOF or reset from the client cancels the generation at once (the engine
drops the request before its next decode step) and frees the slot.

Mount it with `serve_inference(network, service)`. Logs: request id, model, token counts and
timings only; never prompt or output text.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import trio

from darkbloom import __version__
from darkbloom.errors import (
    ContextLengthExceeded,
    DarkbloomError,
    InvalidRequest,
    LaneBusy,
    LedgerError,
    MalformedMessage,
    ModelNotFound,
    NoCapacity,
    StreamClosed,
    VoucherRejected,
)
from darkbloom.api.timeline import timeline
from darkbloom.ledger.lanes import NodeLane
from darkbloom.wire.codec import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode, encode_frame, read_frame
from darkbloom.wire.ledger import LaneReservation, Voucher
from darkbloom.wire.infer import (
    INFER_PROTOCOL,
    Accepted,
    ChoiceEnd,
    Delta,
    Done,
    Embeddings,
    ErrorFrame,
    InferRequest,
    NodeLoad,
    Usage,
)

__all__ = ["EmbedFn", "InferenceService", "NodeMeter", "ServedRequest", "open_embedder", "serve_inference"]

log = logging.getLogger(__name__)
_tl = timeline("node")

REQUEST_READ_TIMEOUT_S = 30.0  # a client that opens a stream and sends nothing is dropped
LANE_BUSY_WAIT_S = 2.0  # a request on a lane still finishing another one waits this long for it
SCORE_TOP_K = 100  # spot checks: "inside" means among the verifier's top 100 (trust.verify.DEFAULT_POLICY)
MAX_SCORED_TOKENS = 256  # a score request scores at most this many output tokens
DEFAULT_EMBED_PER_PEER = 4  # an embeddings-only node (no engine to size the share by)
EmbedFn = Callable[[Sequence[str]], Awaitable[tuple[np.ndarray, int]]]  # texts -> (float32 [n, dim], tokens)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServedRequest:
    """What the node served, for the ledger and metrics (no text)."""

    request_id: str
    peer_id: str
    model: str
    kind: str
    prompt_tokens: int
    completion_tokens: int
    outcome: str  # "done" | "cancelled" | "error:<code>"
    seconds: float


def _error_code(exc: BaseException) -> tuple[str, str | None, float | None]:
    """ErrorFrame code, param and retry_after for an exception raised while serving."""
    if isinstance(exc, ContextLengthExceeded):
        return "context_length_exceeded", exc.param, None
    if isinstance(exc, InvalidRequest):
        return "bad_request", exc.param, None
    if isinstance(exc, ModelNotFound):
        return "model_not_found", "model", None
    if isinstance(exc, NoCapacity):
        return "no_capacity", None, exc.retry_after_s
    if isinstance(exc, LaneBusy):  # the shim reads this param as "use another lane", not "cannot pay"
        return "payment_required", "darkbloom.session", None
    if isinstance(exc, LedgerError):
        return "payment_required", None, None
    return "internal", None, None


@dataclass(slots=True)
class _Progress:
    prompt_tokens: int = 0
    completion_tokens: int = 0  # sent in Delta frames
    ended_tokens: int = 0  # reported by ChoiceEnd frames
    answered: bool = False  # Done was sent: whatever happens after, the request was served in full


class _StreamIO:
    """Frames over one PeerNetwork stream; writes from the answer and the voucher watcher don't interleave."""

    def __init__(self, stream: Any, max_frame_bytes: int) -> None:
        self.stream = stream
        self.max_frame_bytes = max_frame_bytes
        self.decoder = FrameDecoder(max_frame_bytes)
        self._lock = trio.Lock()

    async def send(self, msg: Any) -> None:
        frame = encode_frame(msg, self.max_frame_bytes)
        async with self._lock:
            await self.stream.write(frame)

    async def recv(self, expect: Any = None) -> Any:
        return await read_frame(self.stream.read, self.decoder, expect)


class NodeMeter:
    """Paid serving on the node: lanes from `InferRequest.session`, voucher checks, the gate.

    `ledger_key` is the ledger's public key (hex) that signs reservations; prices are the
    node's own (a lane at lower prices is refused); `store(voucher)` keeps each
    countersigned voucher for settlement (e.g. a VoucherBook on a worker thread);
    `latest(lane)` returns the last stored voucher of a lane after a restart. With
    `require_payment` False, a request without a session is served free.
    """

    def __init__(
        self,
        identity: Any,
        *,
        ledger_key: str,
        price_input_per_m: int,
        price_output_per_m: int,
        voucher_every_tokens: int = 32,
        voucher_timeout_s: float = 10.0,
        require_payment: bool = True,
        store: Callable[[Voucher], Awaitable[None]] | None = None,
        latest: Callable[[str], Voucher | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.ledger_key = ledger_key
        self.price_input_per_m = price_input_per_m
        self.price_output_per_m = price_output_per_m
        self.every = voucher_every_tokens
        self.timeout_s = voucher_timeout_s
        self.require_payment = require_payment
        self.store = store
        self.latest = latest
        self.clock = clock
        self.lanes: dict[str, NodeLane] = {}
        self.busy: set[str] = set()  # lanes with a request on them now (a lane is sequential)
        self._freed: dict[str, trio.Event] = {}  # lane -> set when its busy mark clears (requests waiting for it)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def lane_for(self, session: bytes) -> NodeLane:
        """The lane a request pays on; VoucherRejected / InvalidSignature when it cannot."""
        from darkbloom.ledger.receipts import decode_strict

        try:
            reservation = decode_strict(session, LaneReservation)
        except MalformedMessage as exc:
            raise VoucherRejected("-" * 32, f"unreadable lane reservation ({exc.reason})") from None
        if reservation.price_input_per_m < self.price_input_per_m or reservation.price_output_per_m < self.price_output_per_m:
            raise VoucherRejected(reservation.lane, "the lane's prices are below this node's prices")
        lane = self.lanes.get(reservation.lane)
        if lane is None:
            latest = self.latest(reservation.lane) if self.latest is not None else None
            lane = NodeLane.open(self.identity, reservation, ledger_key=self.ledger_key, now_ms=self.now_ms(),
                                 voucher_every_tokens=self.every, voucher_timeout_ms=int(self.timeout_s * 1000),
                                 latest=latest)
            self.lanes[reservation.lane] = lane
        else:
            lane.update_reservation(reservation, now_ms=self.now_ms())
        if reservation.lane in self.busy:
            raise LaneBusy(reservation.lane)
        return lane

    async def claim(self, session: bytes) -> NodeLane:
        """The lane a request pays on, marked busy until `free`; waits (bounded) while it finishes another request.

        Raises LaneBusy when the other request still holds it after LANE_BUSY_WAIT_S, or what
        `lane_for` raises.
        """
        try:
            return self._mark(self.lane_for(session))
        except LaneBusy as exc:
            lane = exc.lane
        with trio.move_on_after(LANE_BUSY_WAIT_S):
            while lane in self.busy:
                await self._freed.setdefault(lane, trio.Event()).wait()
        return self._mark(self.lane_for(session))

    def _mark(self, lane: NodeLane) -> NodeLane:
        self.busy.add(lane.lane)
        return lane

    def free(self, lane: str) -> None:
        """Clear a lane's busy mark (idempotent) and wake requests waiting for it."""
        self.busy.discard(lane)
        event = self._freed.pop(lane, None)
        if event is not None:
            event.set()


class _Metered:
    """One request's lane while it is served: the gate, incoming vouchers, the final settle-up."""

    def __init__(self, meter: NodeMeter, lane: NodeLane, io: _StreamIO) -> None:
        self.meter = meter
        self.lane = lane
        self.io = io
        self.arrived = trio.Event()
        self.failure: DarkbloomError | None = None
        self.finished = False  # the whole answer was sent
        self.released = False  # the lane's busy mark was cleared: this request is paid up, the lane may serve the next
        # Until the first voucher of this request arrives: its prompt tokens, which the gate does not hold the
        # first completion tokens for (that voucher is one round trip away; the prefill is paid for already).
        self.prompt_grace = 0

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.meter.free(self.lane.lane)

    def answered(self) -> None:
        """The whole answer was sent; the lane frees as soon as a voucher covers all of it."""
        self.finished = True
        if self.lane.lag_tokens == 0:
            self.release()

    def begin(self, req: InferRequest, digest: str, prompt_tokens: int) -> None:
        """Right before `Accepted` (the client begins the request on its side when it reads it)."""
        self.lane.begin_request(encode(req), digest)
        self.lane.served(prompt_tokens=prompt_tokens)

    async def gate(self) -> None:
        """Before sending more: pause while vouchers lag, fail when they stopped.

        Generation only (`prompt_grace` set by `_generate`): while the voucher for the prompt
        is on its way (the client signs it when it reads `Accepted`), up to the lane's usual
        allowance of completion tokens goes out without it: holding the first token for that
        round trip cost a whole RTT of time to first token (108 ms through a relay on a loaded
        machine, 150-token prompt). An embedding's or a score's whole answer still waits for
        the prompt's voucher.
        """
        while True:
            if self.failure is not None:
                raise self.failure
            if self.prompt_grace and self.lane.lag_tokens - self.prompt_grace <= self.lane.max_unvouched:
                return
            verdict = self.lane.gate(self.meter.now_ms())
            if verdict == "serve":
                return
            if verdict == "end":
                raise VoucherRejected(self.lane.lane, "vouchers stopped arriving")
            with trio.move_on_after(self.meter.timeout_s):
                await self.arrived.wait()
            self.arrived = trio.Event()

    async def on_voucher(self, voucher: Voucher) -> None:
        if self.released:  # the request is paid up and the lane may be serving the next one: not ours any more
            log.debug("lane %s: voucher after the request was paid up ignored", self.lane.lane[:8])
            return
        try:
            signed = self.lane.accept(voucher, now_ms=self.meter.now_ms())
        except DarkbloomError as exc:  # a bad voucher stops serving at the next gate
            self.failure = exc if isinstance(exc, LedgerError) else VoucherRejected(self.lane.lane, str(exc))
            log.warning("lane %s: voucher refused: %s", self.lane.lane[:8], type(exc).__name__)
        else:
            self.prompt_grace = 0
            # Free the lane before the client can read the countersigned copy (it lends the lane
            # again once it has it), not after the store's write: that may take a while.
            if self.finished and self.lane.lag_tokens == 0:
                self.release()
            if not self.finished:  # wake a paused gate now, not after the store's write (settling still waits for it)
                self.arrived.set()
            await self.io.send(signed)
            if self.meter.store is not None:
                await self.meter.store(signed)
        self.arrived.set()

    def on_reservation(self, reservation: LaneReservation) -> None:
        """The consumer topped the lane up mid-request: take the raised cap (checked like the first)."""
        try:
            if reservation.lane != self.lane.lane:
                raise VoucherRejected(reservation.lane, "a reservation for another lane")
            self.lane.update_reservation(reservation, now_ms=self.meter.now_ms())
        except DarkbloomError as exc:  # a bad reservation stops serving at the next gate
            self.failure = exc if isinstance(exc, LedgerError) else VoucherRejected(self.lane.lane, str(exc))
            log.warning("lane %s: reservation refused: %s", self.lane.lane[:8], type(exc).__name__)

    async def settle(self) -> None:
        """After the answer: wait (bounded) for the voucher that covers all of it."""
        with trio.move_on_after(self.meter.timeout_s):
            while not self.released and self.lane.lag_tokens > 0 and self.failure is None:
                await self.arrived.wait()
                self.arrived = trio.Event()
        if not self.released and self.lane.lag_tokens > 0:
            log.warning("lane %s: %d tokens served without a voucher", self.lane.lane[:8], self.lane.lag_tokens)


class InferenceService:
    """Serves infer streams from an engine (chat/completion) and embedders (embedding models).

    `engine` is a `darkbloom.inference.engine.Engine` (or None on an embeddings-only node);
    `digests` maps model id -> weights digest advertised in the capability record;
    `embedders` maps model id -> an async embed function (see `EmbedFn`);
    `paused()` says whether operator controls pause serving; `on_served` observes outcomes;
    `meter` (a `NodeMeter`) makes serving paid through ledger lanes; None serves free;
    `identity` (the node's key) lets it answer `score` requests: teacher-forced logprobs of
    another node's output, signed (`ScoreAttestation`), for the shim's spot checks.
    `max_per_peer` caps the requests one peer has in progress here (running or queued; the
    excess is refused `no_capacity`); 0 means half the engine's slots + queue, at least 1.
    """

    def __init__(
        self,
        engine: Any | None,
        *,
        digests: Mapping[str, str],
        embedders: Mapping[str, EmbedFn] | None = None,
        paused: Callable[[], bool] | None = None,
        on_served: Callable[[ServedRequest], None] | None = None,
        meter: NodeMeter | None = None,
        identity: Any | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        node_version: str = __version__,
        max_per_peer: int = 0,
    ) -> None:
        self.engine = engine
        self.identity = identity  # signs score attestations (spot checks); None: this node does not verify
        self.digests = dict(digests)
        self.embedders = dict(embedders or {})
        self.paused = paused or (lambda: False)
        self.on_served = on_served
        self.meter = meter
        self.max_frame_bytes = max_frame_bytes
        self.node_version = node_version
        self.active_embeddings = 0
        self.max_per_peer = max_per_peer
        self.per_peer: dict[str, int] = {}  # peer id -> its requests in progress here

    def per_peer_cap(self) -> int:
        """How many requests one peer may have in progress (running or queued) on this node."""
        if self.max_per_peer > 0:
            return self.max_per_peer
        if self.engine is None:
            return DEFAULT_EMBED_PER_PEER
        total = getattr(self.engine, "max_concurrent", 1) + getattr(self.engine, "max_queue", 0)
        return max(1, total // 2)

    def load(self) -> NodeLoad:
        if self.engine is not None:
            load = self.engine.load()
            return NodeLoad(active=load.active + self.active_embeddings, queued=load.queued,
                            max_concurrent=load.max_concurrent, paused=self.paused())
        return NodeLoad(active=self.active_embeddings, queued=0, max_concurrent=1, paused=self.paused())

    async def handle(self, stream: Any) -> None:
        """One inbound stream. Never raises for a client's fault; resets on a broken stream."""
        t_in = time.monotonic()
        io = _StreamIO(stream, self.max_frame_bytes)
        peer = getattr(stream, "peer_id", "")
        try:
            with trio.move_on_after(REQUEST_READ_TIMEOUT_S) as waited:
                req = await io.recv(InferRequest)
            if waited.cancelled_caught or req is None:
                return
            if _tl.enabled:
                _tl.mark(req.request_id, "stream_in", at=t_in)
                _tl.mark(req.request_id, "request_read")
        except MalformedMessage as exc:
            await self._refuse(io, ErrorFrame(request_id="", code="bad_request", message=f"bad request frame: {exc.reason}"))
            return
        except StreamClosed:
            return
        try:
            await self._serve(io, req, peer)
        except StreamClosed:
            log.info("%s stream to %s closed early", req.request_id, peer[-8:])
        finally:
            with trio.move_on_after(2, shield=True):
                try:
                    await stream.close()
                except StreamClosed:
                    pass  # the client already reset it: nothing left to close

    async def _refuse(self, io: _StreamIO, frame: ErrorFrame) -> None:
        try:
            await io.send(frame)
        except StreamClosed:
            pass  # the client left first; the refusal has no reader
        with trio.move_on_after(2, shield=True):
            try:
                await io.stream.close()
            except StreamClosed:
                pass

    async def _metered(self, io: _StreamIO, req: InferRequest, digest: str) -> _Metered | None:
        """The request's lane (begun), or None when it is served free. LedgerError: refuse it."""
        if self.meter is None:
            return None
        if not req.session:
            if self.meter.require_payment:
                raise VoucherRejected("-" * 32, "this node serves paid requests only: open a lane at the ledger")
            return None
        lane = await self.meter.claim(req.session)
        return _Metered(self.meter, lane, io)

    async def _serve(self, io: _StreamIO, req: InferRequest, peer: str) -> None:
        started = trio.current_time()
        rid = req.request_id
        digest = self.digests.get(req.model)
        known = digest is not None and (req.model in self.embedders if req.kind == "embedding" else self.engine is not None)
        if not known:
            await io.send(ErrorFrame(request_id=rid, code="model_not_found", message=f"model {req.model!r} is not served here",
                                     param="model"))
            return
        if req.kind == "score" and self.identity is None:
            await io.send(ErrorFrame(request_id=rid, code="bad_request", param="kind",
                                     message="this node does not verify other nodes' output (no identity)"))
            return
        if req.digest and req.digest != digest:
            await io.send(ErrorFrame(request_id=rid, code="model_not_found", param="darkbloom.digest",
                                     message=f"weights digest {req.digest[:16]} is not served here (have {digest[:16]})"))
            return
        if self.paused():
            await io.send(ErrorFrame(request_id=rid, code="no_capacity", message="node paused by its operator",
                                     retry_after_s=30.0))
            return
        cap = self.per_peer_cap()
        if self.per_peer.get(peer, 0) >= cap:
            log.info("%s peer=%s refused: it already has %d requests here (per-peer cap)", rid, peer[-8:], cap)
            await io.send(ErrorFrame(request_id=rid, code="no_capacity", retry_after_s=1.0,
                                     message=f"this node serves at most {cap} requests at once per client"))
            if self.on_served is not None:  # counted with the other refusals (errors by kind)
                self.on_served(ServedRequest(request_id=rid, peer_id=peer, model=req.model, kind=req.kind,
                                             prompt_tokens=0, completion_tokens=0, outcome="error:no_capacity",
                                             seconds=trio.current_time() - started))
            return
        self.per_peer[peer] = self.per_peer.get(peer, 0) + 1
        progress = _Progress()
        outcome = "cancelled"
        metered: _Metered | None = None
        try:
            metered = await self._metered(io, req, digest)
            if req.kind not in ("chat", "completion", "embedding", "score"):
                raise InvalidRequest(f"request kind {req.kind!r} is not served", param="kind")
            await self._answer(io, req, digest, progress, metered)
            outcome = "done"
        except DarkbloomError as exc:
            if isinstance(exc, StreamClosed):
                raise
            code, param, retry = _error_code(exc)
            outcome = f"error:{code}"
            if code == "internal":
                log.error("%s model=%s failed: %s", rid, req.model, type(exc).__name__)
            await io.send(ErrorFrame(request_id=rid, code=code, message=str(exc), param=param, retry_after_s=retry))
        finally:
            if outcome == "cancelled" and progress.answered:
                outcome = "done"  # the client closed (or we were stopped) while the final voucher was settling
            if metered is not None:
                metered.release()
            left = self.per_peer.pop(peer) - 1
            if left:
                self.per_peer[peer] = left
            seconds = trio.current_time() - started
            log.info("%s peer=%s model=%s kind=%s outcome=%s prompt_tokens=%d completion_tokens=%d ms=%.0f", rid,
                     peer[-8:], req.model, req.kind, outcome, progress.prompt_tokens, progress.completion_tokens,
                     seconds * 1000)
            if self.on_served is not None:
                self.on_served(ServedRequest(request_id=rid, peer_id=peer, model=req.model, kind=req.kind,
                                             prompt_tokens=progress.prompt_tokens,
                                             completion_tokens=progress.completion_tokens,
                                             outcome=outcome, seconds=seconds))

    async def _answer(self, io: _StreamIO, req: InferRequest, digest: str, progress: _Progress,
                      metered: _Metered | None) -> None:
        """The answer, with a watcher on the client's side of the stream (cancel, vouchers)."""
        error: DarkbloomError | None = None
        finished = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, io, nursery.cancel_scope, req.request_id, metered)
            try:
                if req.kind == "embedding":
                    await self._embed(io, req, digest, progress, metered)
                elif req.kind == "score":
                    await self._score(io, req, digest, progress, metered)
                else:
                    await self._generate(io, req, digest, progress, metered)
                finished = progress.answered = True
                if metered is not None:
                    metered.answered()
                    await metered.settle()
            except DarkbloomError as exc:  # re-raised below, outside the nursery (no exception group)
                error = exc
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        if not finished:
            raise StreamClosed("", "client closed the stream during the answer")

    async def _embed(self, io: _StreamIO, req: InferRequest, digest: str, progress: _Progress,
                     metered: _Metered | None) -> None:
        texts = req.params.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidRequest("input must be a string or a non-empty list of strings", param="input")
        self.active_embeddings += 1
        try:
            vectors, tokens = await self.embedders[req.model](texts)
        finally:
            self.active_embeddings -= 1
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        count, dim = vectors.shape
        progress.prompt_tokens = tokens
        if metered is not None:
            metered.begin(req, digest, tokens)
        await io.send(Accepted(request_id=req.request_id, node_version=self.node_version, digest=digest,
                               prompt_tokens=tokens, load=self.load()))
        if metered is not None:
            await metered.gate()
        await io.send(Embeddings(request_id=req.request_id, dim=dim, count=count, vectors=vectors.tobytes(),
                                 prompt_tokens=tokens))
        await io.send(Done(request_id=req.request_id, usage=Usage(prompt_tokens=tokens, completion_tokens=0),
                           load=self.load()))

    async def _score(self, io: _StreamIO, req: InferRequest, digest: str, progress: _Progress,
                     metered: _Metered | None) -> None:
        """Spot check: score another node's output tokens for the same request, and sign the result.

        params: {"request": <OpenAI body>, "request_kind": "chat"|"completion", "output_token_ids": [...]}.
        """
        from darkbloom.api.trust.evidence import attest_scores, sampling_digest
        from darkbloom.inference.params import parse_chat, parse_completion
        from darkbloom.inference.scoring import TILTS, SamplingSpec

        body, kind, output = req.params.get("request"), req.params.get("request_kind"), req.params.get("output_token_ids")
        if not isinstance(body, dict) or kind not in ("chat", "completion"):
            raise InvalidRequest("score needs the original request body and its kind", param="request")
        if not isinstance(output, list) or not output or not all(isinstance(t, int) and t >= 0 for t in output):
            raise InvalidRequest("output_token_ids must be a non-empty list of token ids", param="output_token_ids")
        if len(output) > MAX_SCORED_TOKENS:
            raise InvalidRequest(f"at most {MAX_SCORED_TOKENS} tokens are scored", param="output_token_ids")
        gen_req = (parse_chat if kind == "chat" else parse_completion)(dict(body))
        prompt_ids = await self.engine.prompt_ids(req.model, gen_req)
        progress.prompt_tokens = len(prompt_ids) + len(output)
        if metered is not None:
            metered.begin(req, digest, progress.prompt_tokens)
        await io.send(Accepted(request_id=req.request_id, node_version=self.node_version, digest=digest,
                               prompt_tokens=progress.prompt_tokens, load=self.load()))
        if metered is not None:
            await metered.gate()
        spec = SamplingSpec.from_sampling(gen_req.sampling)  # None: penalties, not reproducible (with a seed: replayed)
        bound = {"nonce": req.nonce, "sampling_digest": sampling_digest(gen_req.sampling, gen_req.max_tokens)}
        if spec is not None and not gen_req.uses_tools and gen_req.response_format.type == "text":
            sampled = await self.engine.score_sampled(req.model, prompt_ids, output, spec)
            attestation = attest_scores(
                self.identity, model_digest=digest, prompt_ids=prompt_ids, output_ids=output,
                logprobs=[s.logprob for s in sampled], ranks=[s.rank for s in sampled], time_ms=int(time.time() * 1000),
                sampled=sampled, sampling=spec.describe(), tilts=TILTS, **bound,
            )
        else:  # a grammar or penalties shaped the distribution: raw scores only
            scores = await self.engine.score(req.model, prompt_ids, output, top_k=SCORE_TOP_K)
            attestation = attest_scores(
                self.identity, model_digest=digest, prompt_ids=prompt_ids, output_ids=output,
                logprobs=[s.logprob for s in scores], ranks=[0 if s.in_top_k else SCORE_TOP_K for s in scores],
                time_ms=int(time.time() * 1000), **bound,
            )
        await io.send(attestation)
        await io.send(Done(request_id=req.request_id, usage=Usage(prompt_tokens=progress.prompt_tokens,
                                                                  completion_tokens=0), load=self.load()))

    async def _generate(self, io: _StreamIO, req: InferRequest, digest: str, progress: _Progress,
                        metered: _Metered | None) -> None:
        from darkbloom.inference.engine import Admitted, ChoiceFinished, TextDelta
        from darkbloom.inference.params import parse_chat, parse_completion

        parse = parse_chat if req.kind == "chat" else parse_completion
        gen_req = parse(dict(req.params))
        rid = req.request_id
        tool_index: dict[int, int] = {}  # choice -> tool calls sent so far (their OpenAI `index`)
        first = _tl.enabled
        _tl.mark(rid, "submit")
        async with aclosing(self.engine.generate(req.model, gen_req)) as events:
            async for event in events:
                if isinstance(event, Admitted):
                    _tl.mark(rid, "admitted")
                    progress.prompt_tokens = event.prompt_tokens
                    if metered is not None:
                        metered.begin(req, digest, event.prompt_tokens)
                        metered.prompt_grace = event.prompt_tokens  # the first tokens need not wait for its voucher
                    await io.send(Accepted(request_id=rid, node_version=self.node_version, digest=digest,
                                           prompt_tokens=event.prompt_tokens, load=self.load()))
                elif isinstance(event, TextDelta):
                    if first:
                        _tl.mark(rid, "first_token")
                    if metered is not None:
                        await metered.gate()
                    calls = []
                    for call in event.tool_calls:
                        k = tool_index.get(event.index, 0)
                        tool_index[event.index] = k + 1
                        calls.append({**call, "index": k})
                    await io.send(Delta(request_id=rid, index=event.index, text=event.text,
                                        tokens=event.tokens, logprobs=tuple(event.logprobs),
                                        tool_calls=tuple(calls)))
                    if first:
                        first = False
                        _tl.mark(rid, "first_write")
                    progress.completion_tokens += event.tokens
                    if metered is not None:
                        metered.lane.served(completion_tokens=event.tokens)
                elif isinstance(event, ChoiceFinished):
                    progress.ended_tokens += event.completion_tokens
                    attestation = await self._attest(req, gen_req, digest, event.token_ids) if event.index == 0 else b""
                    await io.send(ChoiceEnd(request_id=rid, index=event.index,
                                            finish_reason=event.finish_reason,  # type: ignore[arg-type]
                                            completion_tokens=event.completion_tokens,
                                            token_ids=tuple(event.token_ids), attestation=attestation))
        extra = max(0, progress.ended_tokens - progress.completion_tokens)  # tokens folded into ChoiceEnd
        progress.completion_tokens += extra
        if metered is not None and extra:
            metered.lane.served(completion_tokens=extra)
        await io.send(Done(request_id=rid, usage=Usage(prompt_tokens=progress.prompt_tokens,
                                                       completion_tokens=progress.completion_tokens),
                           load=self.load()))

    async def _attest(self, req: InferRequest, gen_req: Any, digest: str, token_ids: Sequence[int]) -> bytes:
        """Spot-check evidence: this node's signature over the prompt ids and its first output ids
        (commitments salted with the request's nonce) and its sampling parameters (a digest), so a
        shim can prove to the relay what this node answered and how."""
        if self.identity is None or not token_ids:
            return b""
        from darkbloom.api.trust.evidence import ATTESTED_TOKENS, attest_output, sampling_digest
        from darkbloom.wire.codec import encode

        prompt_ids = await self.engine.prompt_ids(req.model, gen_req)
        return encode(attest_output(self.identity, request_id=req.request_id, model=req.model, model_digest=digest,
                                    prompt_ids=prompt_ids, output_ids=tuple(token_ids)[:ATTESTED_TOKENS],
                                    time_ms=int(time.time() * 1000), nonce=req.nonce,
                                    sampling=sampling_digest(gen_req.sampling, gen_req.max_tokens)))

    async def _watch(self, io: _StreamIO, scope: trio.CancelScope, rid: str, metered: _Metered | None) -> None:
        """The client's side of the stream: vouchers; EOF or reset means stop generating now."""
        try:
            while True:
                frame = await io.recv()
                if frame is None:
                    break
                if isinstance(frame, Voucher) and metered is not None:
                    await metered.on_voucher(frame)
                elif isinstance(frame, LaneReservation) and metered is not None:
                    metered.on_reservation(frame)
                else:
                    log.debug("%s ignoring %s frame from the client", rid, type(frame).__name__)
        except (StreamClosed, MalformedMessage):
            pass  # a reset or garbage from the client: either way it is gone
        log.info("%s client closed the stream", rid)
        scope.cancel()


def serve_inference(network: Any, service: InferenceService) -> None:
    """Mount `service` on `network` for `/darkbloom/infer/1.0.0`."""
    network.serve(INFER_PROTOCOL, service.handle)


def _deliver(send: trio.MemorySendChannel, result: tuple[str, Any]) -> None:
    try:
        send.send_nowait(result)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
        pass  # the caller was cancelled and left; the result has no reader


@asynccontextmanager
async def open_embedder(model_dir: str | Path, *, model_id: str = "") -> AsyncIterator[EmbedFn]:
    """A BERT `Embedder` on its own thread (MLX streams are per thread), as an async `EmbedFn`."""
    jobs: queue.Queue[tuple[list[str], trio.MemorySendChannel] | None] = queue.Queue()
    token = trio.lowlevel.current_trio_token()
    ready = trio.Event()
    failure: list[BaseException] = []

    def thread_main() -> None:
        try:
            from darkbloom.inference.bert import Embedder

            embedder = Embedder(model_dir, model_id=model_id)
        except Exception as exc:  # reported to the opener below
            failure.append(exc)
            token.run_sync_soon(ready.set)
            return
        token.run_sync_soon(ready.set)
        while (job := jobs.get()) is not None:
            texts, send = job
            try:
                result: tuple[str, Any] = ("ok", embedder.embed(texts))
            except Exception as exc:  # InvalidRequest and friends go back to the caller
                result = ("err", exc)
            try:
                token.run_sync_soon(_deliver, send, result)
            except trio.RunFinishedError:
                return

    async def embed(texts: Sequence[str]) -> tuple[np.ndarray, int]:
        send, recv = trio.open_memory_channel[tuple[str, Any]](1)
        jobs.put((list(texts), send))
        async with recv:
            status, value = await recv.receive()
        if status == "err":
            raise value
        return value

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.to_thread.run_sync, thread_main, abandon_on_cancel=False))
        try:
            await ready.wait()
            if failure:
                raise failure[0]
            yield embed
        finally:
            jobs.put(None)
