"""The node role: load models, join the network, announce, serve, and explain itself to its operator.

`open_node(config)` prepares and loads the configured models (engine thread for chat models,
an embedder thread per embedding model), measures itself, joins the DHT, serves
`/darkbloom/infer/1.0.0` and `/darkbloom/status/1.0.0`, publishes its signed capability record,
provides its model keys, and runs the operator's controls and status page. Leaving the block
shuts down gracefully: stop announcing, refuse new work, let in-flight requests finish within
`node.grace_period_s`, then cancel the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import trio

from darkbloom import __version__
from darkbloom.config import Config
from darkbloom.identity import Identity, load_or_create_identity
from darkbloom.log import short_id
from darkbloom.metrics import RoleMetrics
from darkbloom.node.controls import Controls
from darkbloom.errors import DarkbloomError
from darkbloom.ledger.book import VoucherBook
from darkbloom.node.serve import InferenceService, NodeMeter, ServedRequest, open_embedder, serve_inference
from darkbloom.node.status import ModelStatus, NodeStatus, render_html, to_json
from darkbloom.runner import join_network
from darkbloom.statushttp import serve_status
from darkbloom.wire.caps import CapabilityRecord, ModelCap
from darkbloom.wire.infer import PROTOCOL_VERSION, StatusReply

__all__ = ["BenchmarkFile", "Node", "NodeStats", "ObservedEngine", "RouteCounter", "open_node"]

log = logging.getLogger(__name__)

MARKET_REFRESH_S = 300.0  # how often the node looks at other providers' prices
IDLE_RECHECK_S = 0.1  # while draining, how often the engine's load is looked at again


@dataclass
class ModelCounters:
    requests: int = 0
    completion_tokens: int = 0
    providers_seen: int = 0
    market_price_out: int | None = None


@dataclass
class NodeStats:
    """What the node served since it started (counts only, never text)."""

    served: int = 0
    failed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_request_at: float | None = None
    models: dict[str, ModelCounters] = field(default_factory=dict)

    def record(self, r: ServedRequest, now: float) -> None:
        counters = self.models.setdefault(r.model, ModelCounters())
        self.last_request_at = now
        if r.outcome == "done":
            self.served += 1
            counters.requests += 1
        elif r.outcome == "cancelled":
            self.cancelled += 1
        else:
            self.failed += 1
        self.prompt_tokens += r.prompt_tokens
        self.completion_tokens += r.completion_tokens
        counters.completion_tokens += r.completion_tokens


class ObservedEngine:
    """The engine as the node serves it, timed for the metrics: time from a request reaching the
    engine to its first token (TTFT, queueing included) and the gap before each later token.
    Everything else is the engine's own."""

    def __init__(self, engine: object, metrics: RoleMetrics) -> None:
        self.engine = engine
        self.metrics = metrics

    def __getattr__(self, name: str) -> object:
        return getattr(self.engine, name)

    async def generate(self, model_id: str, req: object) -> AsyncIterator[object]:
        from darkbloom.inference.engine import TextDelta

        started = trio.current_time()
        last: float | None = None
        async with aclosing(self.engine.generate(model_id, req)) as events:  # type: ignore[attr-defined]
            async for event in events:
                if isinstance(event, TextDelta) and event.tokens:
                    now = trio.current_time()
                    if last is None:
                        self.metrics.ttft.observe(now - started)
                    else:
                        self.metrics.token_gap(now - last, event.tokens)
                    last = now
                yield event


@dataclass
class Node:
    config: Config
    identity: Identity
    network: object  # a darkbloom.p2p PeerNetwork
    service: InferenceService
    models: list  # darkbloom.inference.catalog.ModelInfo
    controls: Controls
    metrics: RoleMetrics
    stats: NodeStats
    record: CapabilityRecord | None = None
    status_url: str = ""
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    earnings: list[tuple[int, int]] = field(default_factory=list)
    _final_submit: Callable[[], Awaitable[None]] | None = None
    _ledger: tuple[Callable[[], Awaitable[object]], str] | None = None  # (connect, ledger key)
    _earned: dict[int, int] = field(default_factory=dict)
    _book: VoucherBook | None = None
    reputation: float | None = None
    reputation_entry: object | None = None  # this node's wire.trust.ReputationEntry in the relay's table
    reputation_epoch: int | None = None
    _idle: trio.Event = field(default_factory=trio.Event)

    @property
    def peer_id(self) -> str:
        return self.network.peer_id  # type: ignore[attr-defined]

    def paused(self) -> bool:
        return self.draining or self.controls.decision.paused

    def status(self) -> NodeStatus:
        load = self.service.load()
        net = self.network
        now = time.time()
        last = self.stats.last_request_at
        return NodeStatus(
            peer_id=self.peer_id,
            version=__version__,
            uptime_s=now - self.started_at,
            reachability=reachability_of(net, self.metrics),
            addresses=tuple(getattr(net, "announce_addrs", ()) or ()),
            models=tuple(
                ModelStatus(
                    id=m.id, kind=m.kind, digest=m.digest,
                    requests=self.stats.models.get(m.id, ModelCounters()).requests,
                    completion_tokens=self.stats.models.get(m.id, ModelCounters()).completion_tokens,
                    providers_seen=self.stats.models.get(m.id, ModelCounters()).providers_seen,
                    market_price_out=self.stats.models.get(m.id, ModelCounters()).market_price_out,
                )
                for m in self.models
            ),
            requests_served=self.stats.served,
            requests_failed=self.stats.failed,
            prompt_tokens=self.stats.prompt_tokens,
            completion_tokens=self.stats.completion_tokens,
            active=load.active,
            queued=load.queued,
            max_concurrent=load.max_concurrent,
            paused=self.paused(),
            pause_reason="shutting down" if self.draining else self.controls.decision.reason,
            price_input_per_m=self.config.node.price_input_per_m,
            price_output_per_m=self.config.node.price_output_per_m,
            region=self.config.node.region,
            node_class=self.config.node.node_class,
            earnings=tuple(self.earnings),
            reputation=self.reputation,
            **_reputation_fields(self.reputation_entry, self.reputation_epoch),
            decode_tps=self.record.decode_tps if self.record else 0.0,
            prefill_tps=self.record.prefill_tps if self.record else 0.0,
            last_request_age_s=None if last is None else now - last,
        )

    def _served(self, r: ServedRequest) -> None:
        self.stats.record(r, time.time())
        outcome = "ok" if r.outcome == "done" else ("cancelled" if r.outcome == "cancelled" else "error")
        self.metrics.request(r.kind, outcome)
        self.metrics.tokens(prompt=r.prompt_tokens, completion=r.completion_tokens)
        if outcome == "error":
            self.metrics.error(r.outcome.partition(":")[2] or "unknown")
        self._check_idle()

    def _check_idle(self) -> bool:
        load = self.service.load()
        if load.active == 0 and load.queued == 0:
            self._idle.set()
            return True
        if self._idle.is_set():
            self._idle = trio.Event()
        return False

    async def refresh_earnings(self) -> None:
        """Fetch the ledger's signed epoch summaries not seen yet; keep what this node earned."""
        from darkbloom.ledger.client import LedgerClient

        if self._ledger is None:
            return
        connect, ledger_key = self._ledger
        account = self.identity.public_key.hex()
        try:
            client = LedgerClient(await connect(), self.identity, ledger_key=ledger_key)  # type: ignore[arg-type]
            try:
                latest = await client.epoch(0)
                if latest is not None:
                    for n in range(max(1, latest.epoch - EARNINGS_EPOCHS + 1), latest.epoch + 1):
                        if n not in self._earned:
                            summary = latest if n == latest.epoch else await client.epoch(n)
                            if summary is not None:
                                self._earned[n] = sum(s.paid for s in summary.nodes if s.node == account)
            finally:
                with trio.move_on_after(1, shield=True):
                    await client.close()
        except (DarkbloomError, OSError) as exc:  # the ledger is unreachable: keep the last figures
            log.debug("earnings lookup failed: %s", exc)
        self.earnings = sorted(self._earned.items())[-EARNINGS_EPOCHS:]

    async def refresh_reputation(self) -> None:
        """This node's entry in the relay's signed reputation table (darkbloom.relay.trust)."""
        from darkbloom.ledger.reputation import ReputationPolicy
        from darkbloom.ledger.trustclient import TrustClient

        if self._ledger is None:
            return
        connect, ledger_key = self._ledger
        try:
            client = TrustClient(await connect(), ledger_key=ledger_key)  # type: ignore[arg-type]
            try:
                table, entry = await client.entry(self.identity.public_key.hex())
            finally:
                with trio.move_on_after(1, shield=True):
                    await client.close()
        except (DarkbloomError, OSError) as exc:  # the relay is unreachable or the table is bad: keep the last
            log.debug("reputation lookup failed: %s", exc)
            return
        if table is not None:
            self.reputation_entry, self.reputation_epoch = entry, table.epoch
            self.reputation = ReputationPolicy().prior if entry is None else entry.score_ppm / 1_000_000

    async def refresh_metrics(self) -> None:
        """Scrape-time gauges: peers, requests in flight, settlement lag (relayed share: RouteCounter)."""
        peers = self.network.peers()  # type: ignore[attr-defined]
        self.metrics.peers.set(len(peers))
        load = self.service.load()
        self.metrics.active.set(load.active)
        if self._book is not None:
            book = self._book
            pending = await trio.to_thread.run_sync(book.unsettled, 1000, limiter=book.limiter)
            oldest = min((v.time_ms for v in pending), default=None)
            self.metrics.settlement_lag.set(0.0 if oldest is None else max(0.0, time.time() - oldest / 1000))

    def status_reply(self) -> StatusReply:
        return StatusReply(
            version=__version__, protocol=PROTOCOL_VERSION, load=self.service.load(), models=tuple(m.id for m in self.models)
        )

    async def drain(self, grace_s: float) -> None:
        """Stop announcing and taking work; wait up to `grace_s` for in-flight requests."""
        self.draining = True
        for m in self.models:
            self.network.unprovide(m.id)  # type: ignore[attr-defined]
        with trio.move_on_after(grace_s) as waited:
            while not self._check_idle():
                # The engine frees a slot on its own thread a moment after the handler reported the
                # request served, so an idle engine may not be seen then: look again shortly.
                with trio.move_on_after(IDLE_RECHECK_S):
                    await self._idle.wait()
        if waited.cancelled_caught:
            log.warning("grace period over with requests still running; cancelling them")
        else:
            log.info("no requests in flight; leaving")


def reachability_of(network: object, metrics: RoleMetrics) -> str:
    """public, relayed, or hole-punched: a node behind a NAT (relayed) that was sent requests on
    direct connections has been reached by hole punching (DCUtR)."""
    reachability = getattr(network, "reachability", "unknown")
    direct = metrics.value("darkbloom_routes_total", route="direct") + metrics.value("darkbloom_routes_total",
                                                                                    route="hole-punched")
    return "hole-punched" if reachability == "relayed" and direct else reachability


class RouteCounter:
    """The node's network, except that each inbound stream of a served protocol is counted by its
    route (direct, relayed, hole-punched): the node's `darkbloom_relayed_share` and routes."""

    def __init__(self, network: object, metrics: RoleMetrics) -> None:
        self._network, self._metrics = network, metrics

    def __getattr__(self, name: str) -> object:
        return getattr(self._network, name)

    def serve(self, protocol: str, handler: Callable[[object], Awaitable[None]]) -> None:
        async def counted(stream: object) -> None:
            self._metrics.routed(getattr(stream, "route", "direct"))
            await handler(stream)

        self._network.serve(protocol, counted)  # type: ignore[attr-defined]


def _template(node: Node, bench: tuple[float, float]) -> CapabilityRecord:
    cfg = node.config.node
    return CapabilityRecord(
        peer_id=node.peer_id,
        seq=0,
        issued_at_ms=0,
        expires_at_ms=0,
        models=tuple(
            ModelCap(id=m.id, digest=m.digest, context_length=m.context_length, quantization=m.quantization,
                     features=tuple(m.features))
            for m in node.models
        ),
        prefill_tps=round(bench[0], 1),
        decode_tps=round(bench[1], 2),
        max_concurrent=node.service.load().max_concurrent,
        region=cfg.region,
        node_class=cfg.node_class,
        price_input_per_m=cfg.price_input_per_m,
        price_output_per_m=cfg.price_output_per_m,
        software_version=__version__,
        protocol_version=PROTOCOL_VERSION,
    )


async def _watch_market(node: Node) -> None:
    """Look up other providers of our models now and then, for the 'price above market' note."""
    while True:
        for m in node.models:
            try:
                providers = await node.network.find_providers(m.id)  # type: ignore[attr-defined]
            except Exception as exc:  # any lookup failure only leaves the note stale
                node.metrics.dht("find_providers", "error")
                log.debug("market lookup for %s failed: %s", m.id, type(exc).__name__)
                continue
            node.metrics.dht("find_providers", "ok" if providers else "empty")
            others = [p.record.price_output_per_m for p in providers if p.peer_id != node.peer_id]
            counters = node.stats.models.setdefault(m.id, ModelCounters())
            counters.providers_seen = len(others)
            counters.market_price_out = int(statistics.median(others)) if others else None
        await trio.sleep(MARKET_REFRESH_S)


def _ledger_of(config: Config, bootstrap: tuple[str, ...]) -> tuple[str, str, tuple[str, ...]] | None:
    """(ledger key hex, ledger peer id, addrs): `ledger.ledger_peer`, else the first bootstrap relay."""
    from darkbloom.api.shim import ledger_target
    from darkbloom.p2p.keys import public_key_from_peer_id

    target = ledger_target(dataclasses.replace(config, p2p=dataclasses.replace(
        config.p2p, bootstrap=tuple(config.p2p.bootstrap) + tuple(bootstrap))))
    if target is None:
        return None
    peer_id, addrs = target
    return public_key_from_peer_id(peer_id).hex(), peer_id, addrs


def _node_meter(config: Config, identity: Identity, ledger_key: str, book: VoucherBook) -> NodeMeter:
    async def store(voucher) -> None:
        await trio.to_thread.run_sync(book.put, voucher, limiter=book.limiter)

    return NodeMeter(
        identity, ledger_key=ledger_key,
        price_input_per_m=config.node.price_input_per_m, price_output_per_m=config.node.price_output_per_m,
        voucher_every_tokens=config.ledger.voucher_every_tokens, voucher_timeout_s=config.ledger.voucher_timeout_s,
        require_payment=config.node.require_payment, store=store, latest=book.latest,
    )


async def _connect_ledger(net, ledger: tuple[str, str, tuple[str, ...]]):
    from darkbloom.wire.ledger import LEDGER_PROTOCOL

    return await net.open_stream(ledger[1], LEDGER_PROTOCOL, addrs=ledger[2])


EARNINGS_EPOCHS = 10  # epochs shown on the status page
BENCHMARK_FILE = "self-benchmark.json"
BENCHMARK_KEEP_S = 7 * 86400  # a measured speed is reused this long (start-up in seconds, not tens)


def _benchmark_key(config: Config, model: object) -> str:
    """What a measured speed depends on: the weights, this software and the engine's settings."""
    inf = config.inference
    return (f"{model.digest}|{__version__}|blas={inf.blas_threads}|prefill_step={inf.prefill_step_size}"  # type: ignore[attr-defined]
            f"|native_jit={inf.native_jit}")


class BenchmarkFile:
    """Self-benchmark results kept in the node's data dir, so later starts skip the measurement."""

    def __init__(self, path) -> None:
        self.path = path

    def _read(self) -> dict:
        import json

        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):  # absent or damaged: measure again
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str, now: float):
        from darkbloom.inference.selfbench import BenchResult

        entry = self._read().get(key)
        try:
            if now - float(entry["measured_at"]) > BENCHMARK_KEEP_S:
                return None
            return BenchResult(prefill_tps=float(entry["prefill_tps"]), decode_tps=float(entry["decode_tps"]),
                               prompt_tokens=int(entry["prompt_tokens"]), decode_tokens=int(entry["decode_tokens"]))
        except (TypeError, KeyError, ValueError):  # no entry, or not one we wrote
            return None

    def put(self, key: str, result: object, now: float) -> None:
        import json

        data = self._read()
        data[key] = {**dataclasses.asdict(result), "measured_at": now}  # type: ignore[call-overload]
        try:
            self.path.write_text(json.dumps(data, indent=1))
        except OSError as exc:  # a read-only data dir only costs the next start its measurement
            log.warning("could not keep the self-benchmark in %s: %s", self.path, exc)


def _reputation_fields(entry: object | None, epoch: int | None) -> dict:
    """NodeStatus fields from the relay table's entry for this node (darkbloom.node.status)."""
    if entry is None:
        return {"reputation_epoch": epoch}
    return {"reputation_epoch": epoch, "paying_consumers": entry.consumers,  # type: ignore[attr-defined]
            "failed_spot_checks": entry.failed_checks, "failed_features": tuple(entry.failed_features),  # type: ignore[attr-defined]
            "observed_class": entry.node_class}  # type: ignore[attr-defined]


async def _watch_earnings(node: Node, interval_s: float) -> None:
    """Refresh the earnings figures now and then."""
    while True:
        await node.refresh_earnings()
        await node.refresh_reputation()
        await trio.sleep(interval_s)


async def _final_submit(book, connect, identity, ledger) -> None:
    from darkbloom.ledger.client import LedgerClient, submit_unsettled

    try:
        stream = await connect()
        client = LedgerClient(stream, identity, ledger_key=ledger[0])
        try:
            summary = await submit_unsettled(book, client)
            log.info("final voucher submission: %d queued, %d duplicate, %d rejected",
                     summary.queued, summary.duplicate, summary.rejected)
        finally:
            await client.close()
    except (DarkbloomError, OSError) as exc:  # the ledger is down: vouchers stay in the book for next time
        log.warning("final voucher submission failed (%s); they stay on disk for the next start", exc)


@asynccontextmanager
async def open_node(
    config: Config,
    *,
    bootstrap: tuple[str, ...] = (),
    report: Callable[[str], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> AsyncIterator[Node]:
    """A running node; see the module docstring.

    `report(line)` gets one line per start step; `progress(label, done, total)` follows the
    steps with progress: "preparing <model>" (files or tensors), "loading <models>" and
    "self-benchmark" (models done of total), for a bar such as `models prepare` draws.
    """
    from darkbloom.inference.blas import ensure_blas

    ensure_blas(config.inference.openblas, native_jit=config.inference.native_jit)
    from darkbloom.inference.cpujit import jit_status

    if jit_status().startswith("on "):
        log.info("MLX CPU kernels are built for this CPU (kernel cache %s)", jit_status().removeprefix("on "))
    from darkbloom.inference.catalog import resolve_models
    from darkbloom.inference.engine import engine_options, open_engine
    from darkbloom.p2p.network import open_network
    from darkbloom.p2p.status import serve_status as serve_p2p_status

    identity = load_or_create_identity(config.data_path)
    def prepared(model_id: str, done: int, total: int) -> None:
        if progress is not None:
            progress(f"preparing {model_id}", done, total)

    models = await trio.to_thread.run_sync(partial(resolve_models, config.inference, prepare=True, progress=prepared))
    chat = [m for m in models if m.kind == "chat"]
    embedding = [m for m in models if m.kind == "embedding"]
    metrics = RoleMetrics("node")
    controls = Controls(config.node)
    async with AsyncExitStack() as stack:
        engine = None
        bench = (0.0, 0.0)
        if chat:
            loading = f"loading {', '.join(m.id for m in chat)}"
            if report:
                report(loading)
            if progress is not None:
                progress(loading, 0, len(chat))
            engine = await stack.enter_async_context(
                open_engine(
                    chat, max_concurrent=config.inference.max_concurrent, max_queue=config.inference.max_queue,
                    default_max_tokens=config.inference.default_max_tokens,
                    prefill_step_size=config.inference.prefill_step_size,
                    prompt_cache_bytes=engine_options(config.inference, config.node)["prompt_cache_bytes"],
                    blas_threads=config.inference.blas_threads,
                    self_benchmark=False,  # measured below, one model at a time, with progress
                )
            )
            if progress is not None:
                progress(loading, len(chat), len(chat))
            if config.inference.self_benchmark:
                kept = BenchmarkFile(config.data_path / BENCHMARK_FILE)
                for i, m in enumerate(chat):
                    if progress is not None:
                        progress("self-benchmark", i, len(chat))
                    key = _benchmark_key(config, m)
                    result = kept.get(key, time.time())
                    if result is None:
                        result = await engine.benchmark(m.id, rerun=True)
                        kept.put(key, result, time.time())
                        log.info("self-benchmark of %s: prefill %.0f tok/s, decode %.1f tok/s", m.id,
                                 result.prefill_tps, result.decode_tps)
                    else:
                        log.info("self-benchmark of %s: prefill %.0f tok/s, decode %.1f tok/s (measured at an earlier "
                                 "start, kept %d days; delete %s to measure again)", m.id, result.prefill_tps,
                                 result.decode_tps, BENCHMARK_KEEP_S // 86400, kept.path)
                    if i == 0:  # the capability record carries the first model's figures
                        bench = (result.prefill_tps, result.decode_tps)
                if progress is not None:
                    progress("self-benchmark", len(chat), len(chat))
        embedders = {}
        for m in embedding:
            embedders[m.id] = await stack.enter_async_context(open_embedder(m.path, model_id=m.id))
        net = await stack.enter_async_context(open_network(config.p2p, identity, role="node", bootstrap=bootstrap))
        node = Node(config, identity, net, None, models, controls, metrics, NodeStats())  # type: ignore[arg-type]
        ledger = _ledger_of(config, bootstrap)
        book = None
        meter = None
        if ledger is not None:
            book = VoucherBook(config.data_path / "vouchers.sqlite3")
            stack.callback(book.close)
            meter = _node_meter(config, identity, ledger[0], book)
            node._book = book
        else:
            log.warning("no ledger known (no bootstrap relay or ledger.ledger_peer): serving unpaid")
        node.service = InferenceService(
            ObservedEngine(engine, metrics) if engine is not None else None, digests={m.id: m.digest for m in models}, embedders=embedders,
            paused=node.paused, on_served=node._served, max_frame_bytes=config.p2p.max_frame_bytes,
            meter=meter, identity=identity, max_per_peer=config.node.max_requests_per_peer,
        )
        serve_inference(RouteCounter(net, metrics), node.service)
        serve_p2p_status(net, node.status_reply)
        nursery = await stack.enter_async_context(trio.open_nursery())
        if book is not None and ledger is not None:
            from darkbloom.ledger.client import run_submitter

            connect = partial(_connect_ledger, net, ledger)
            nursery.start_soon(partial(run_submitter, book, connect, identity, interval_s=config.ledger.epoch_s,
                                       ledger_key=ledger[0]))
            node._final_submit = partial(_final_submit, book, connect, identity, ledger)
            node._ledger = (connect, ledger[0])
            nursery.start_soon(_watch_earnings, node, min(60.0, config.ledger.epoch_s))
        await nursery.start(controls.run)
        node.status_url = await nursery.start(
            partial(
                serve_status, "node", config.node.status_host, config.node.status_port,
                status_json=lambda: to_json(node.status()), page=lambda: render_html(node.status()), metrics=(metrics,),
                refresh=node.refresh_metrics,
            )
        )
        await join_network(net)
        node.record = await net.put_record(_template(node, bench))
        metrics.dht("put_record")
        for m in models:
            await net.provide(m.id)
            metrics.dht("provide")
        nursery.start_soon(_watch_market, node)
        log.info("node %s serving %s", short_id(node.peer_id), ", ".join(m.id for m in models))
        try:
            yield node
        finally:
            with trio.CancelScope(shield=True):
                await node.drain(config.node.grace_period_s)
                if node._final_submit is not None:
                    # Hand the ledger what was served before leaving (bounded: it may be down;
                    # whatever is not accepted stays in the voucher book for the next start).
                    with trio.move_on_after(10):
                        await node._final_submit()
            nursery.cancel_scope.cancel()
