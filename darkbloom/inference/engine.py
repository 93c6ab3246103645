"""The generation engine: one thread owns MLX and runs continuous batching for every model.

Trio side (`Engine`): admission (`NoCapacity`), request ids, one unbounded memory channel per
request for its events. Engine thread (`Worker`): loads models, templates and tokenizes,
validates against the context, and steps one `mlx_lm.generate.BatchGenerator` per model;
requests join and leave between decode steps. Each step's events go back to trio in one
`run_sync_soon` call, so the thread never waits for the event loop. Closing a request's
iterator (or cancelling its consumer) queues a cancel that the thread applies before its next
decode step.

Seeds: `mx.random.seed` is process-global, so a request with a `seed` gets its own sampler
that draws from its own PRNG key (`mx.random.key(seed + choice index)`), split every token.
The same seed gives the same output when the batch around it is the same; batched matmuls may
differ from unbatched ones in the last bits, so across different batch mixes it is best effort.
Penalties (presence, frequency, repetition) look at the last 20 tokens of the context
(mlx-lm's processors), prompt included. Logprobs are of the processed distribution (after
logit_bias, penalties and grammar masks, before temperature).

Text: deltas come from `detok.IncrementalDecoder` (they always add up to `tokenizer.decode` of
the output, never split a character); stop strings are matched on that text (`stops`), tool
calls are cut out of it (`tools`), JSON and forced tool calls are constrained by llguidance
(`constrained`). Prompt caches of finished requests are kept in an LRU per model, bounded by
`prompt_cache_bytes` (config `inference.prompt_cache_mb`, capped by `node.max_memory_mb`), and
reused by any later request sharing a prefix. OpenBLAS runs with `blas_threads` threads; 0 (the
default) lets the engine measure each decode batch size class under one thread and under all
cores and use the faster (`threads.ThreadTuner`): all cores on an idle machine, one on a busy one. With n > 1, each choice is its own sequence in the batch
(their prompts are prefilled separately, not shared).

Privacy: nothing here logs or stores prompt or output text; logs carry request ids, model ids,
token counts and timings.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from darkbloom.errors import DarkbloomError, EngineFailed, ModelNotFound
from darkbloom.inference import batching
from darkbloom.inference.events import Admitted, ChoiceFinished, EngineLoad, Event, ModelStatus, TextDelta, TokenScore
from darkbloom.inference.params import GenerationRequest
from darkbloom.inference.selfbench import BenchResult
from darkbloom.inference.worker import Job, Stop, Worker

__all__ = [
    "Admitted",
    "TextDelta",
    "ChoiceFinished",
    "EngineLoad",
    "ModelStatus",
    "TokenScore",
    "BenchResult",
    "Engine",
    "engine_options",
    "open_engine",
]

log = logging.getLogger(__name__)


def engine_options(cfg: Any, node_cfg: Any = None) -> dict[str, Any]:
    """open_engine keyword arguments from an `InferenceConfig` (and the `NodeConfig`, whose
    `max_memory_mb` caps the prompt cache)."""
    return {
        "max_concurrent": cfg.max_concurrent,
        "max_queue": cfg.max_queue,
        "default_max_tokens": cfg.default_max_tokens,
        "prefill_step_size": cfg.prefill_step_size,
        "prompt_cache_bytes": batching.prompt_cache_budget_bytes(
            cfg.prompt_cache_mb, getattr(node_cfg, "max_memory_mb", 0) or 0
        ),
        "blas_threads": cfg.blas_threads,
        "self_benchmark": cfg.self_benchmark,
    }


def _spec(item: Any) -> tuple[str, Path, int | None]:
    if isinstance(item, tuple):
        model_id, path = item[0], item[1]
        return str(model_id), Path(path), None
    ctx = getattr(item, "context_length", None)
    return str(item.id), Path(item.path), ctx if isinstance(ctx, int) and ctx > 0 else None


class Engine:
    """Handle to the engine thread; every method is called from trio."""

    def __init__(self, worker: Worker, *, max_concurrent: int, max_queue: int) -> None:
        self._worker = worker
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self._ids = itertools.count(1)
        self._in_flight = 0
        self.closed = False  # set when open_engine exits; the thread is gone then

    @property
    def models(self) -> dict[str, ModelStatus]:
        return {
            m.id: ModelStatus(m.id, m.context_length, m.vocab_size, m.template_has_tools, m.bench)
            for m in self._worker.models.values()
        }

    def _check_model(self, model_id: str) -> None:
        if model_id not in self._worker.models:
            raise ModelNotFound(model_id, tuple(self._worker.models))

    async def generate(self, model_id: str, req: GenerationRequest) -> AsyncIterator[Event]:
        """Events for one request: Admitted, then TextDelta / ChoiceFinished until every choice ends.

        Raises the request's typed error (ModelNotFound, NoCapacity, InvalidRequest, ...) from the
        first iteration. Closing the iterator early cancels the request in the engine.
        """
        self._check_model(model_id)
        if self._worker.dead or self.closed:
            raise EngineFailed("the engine is not running" if self.closed else "the engine thread failed; restart the node")
        batching.check_admission(self._in_flight, req.n, max_concurrent=self.max_concurrent, max_queue=self.max_queue)
        send, recv = trio.open_memory_channel[Any](math.inf)
        rid = next(self._ids)
        self._in_flight += 1
        finished = 0
        failed = False
        try:
            self._worker.commands.put(("submit", Job(rid=rid, model_id=model_id, req=req, send=send)))
            async with recv:
                async for _rid, event in recv:
                    if isinstance(event, Exception):
                        failed = True
                        raise event
                    if isinstance(event, ChoiceFinished):
                        finished += 1
                    yield event
                    if finished >= req.n:
                        return
        finally:
            self._in_flight -= 1
            if finished < req.n and not failed:
                self._worker.commands.put(("cancel", rid))

    async def _call(self, fn: Callable[[Worker], Any]) -> Any:
        if self._worker.dead or self.closed:
            raise EngineFailed("the engine is not running")
        send, recv = trio.open_memory_channel[Any](1)
        self._worker.commands.put(("call", fn, send))
        async with recv:
            status, value = await recv.receive()
        if status == "err":
            raise value
        return value

    async def score(self, model_id: str, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int], top_k: int = 5) -> list[TokenScore]:
        """Teacher-forced logprob of each output token and whether it was among the top_k.

        One forward pass on the engine thread, between decode steps (it pauses decoding for
        that long)."""
        self._check_model(model_id)
        p, o = list(prompt_token_ids), list(output_token_ids)
        return await self._call(lambda w: w.score(model_id, p, o, top_k))

    async def score_sampled(self, model_id: str, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int],
                            spec: Any) -> list[Any]:
        """Teacher-forced scores of the output under the sampling distribution `spec`
        (darkbloom.inference.scoring.SamplingSpec -> SampledToken per token), for spot checks.
        One forward pass on the engine thread, between decode steps."""
        self._check_model(model_id)
        p, o = list(prompt_token_ids), list(output_token_ids)
        return await self._call(lambda w: w.score_sampled(model_id, p, o, spec))

    async def prompt_ids(self, model_id: str, req: GenerationRequest) -> list[int]:
        """The prompt token ids the engine would feed for `req` (chat template applied)."""
        self._check_model(model_id)
        return await self._call(lambda w: w.prompt_ids(model_id, req))

    async def tokenize(self, model_id: str, text: str) -> list[int]:
        self._check_model(model_id)
        return await self._call(lambda w: w.tokenize(model_id, text))

    def load(self) -> EngineLoad:
        return EngineLoad(self._worker.active_requests, self._worker.queued_requests, self.max_concurrent)

    async def benchmark(self, model_id: str | None = None, *, rerun: bool = False) -> BenchResult:
        """Prefill and decode tokens/s of a model (the first one by default), measured at start."""
        model_id = model_id or next(iter(self._worker.models))
        self._check_model(model_id)
        bench = self._worker.models[model_id].bench
        if bench is None or rerun:
            bench = await self._call(lambda w: w.rebench(model_id))
        return bench


def _deliver(items: list[tuple[Any, Any]]) -> None:
    """Runs in the trio thread: hand each event to its request's channel."""
    for send, item in items:
        try:
            send.send_nowait(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the consumer is gone; its iterator's finally already queued the cancel


@asynccontextmanager
async def open_engine(
    models: Iterable[Any],
    *,
    max_concurrent: int = 8,
    max_queue: int = 64,
    default_max_tokens: int = 512,
    prefill_step_size: int = 512,
    prompt_cache_bytes: int = 256 << 20,
    blas_threads: int = 0,
    self_benchmark: bool = True,
) -> AsyncIterator[Engine]:
    """Start the engine thread, load `models` ((id, path) pairs or objects with .id and .path),
    yield the Engine, and stop the thread on exit. A model that fails to load raises here.

    `prompt_cache_bytes` bounds each model's cache of finished requests' KV caches (prefix
    reuse); 0 turns prefix reuse off. `blas_threads` fixes OpenBLAS's (process-wide) thread count
    on Linux; 0 has it chosen per step from measured step times (`threads.ThreadTuner`)."""
    if max_concurrent < 1 or max_queue < 0 or prompt_cache_bytes < 0:
        raise ValueError("max_concurrent must be >= 1, max_queue and prompt_cache_bytes >= 0")
    # Embedding models (catalog kind "embedding") are served elsewhere, not by this engine.
    specs = [_spec(x) for x in models if getattr(x, "kind", "chat") != "embedding"]
    token = trio.lowlevel.current_trio_token()

    def post(items: list[tuple[Any, Any]]) -> None:
        try:
            token.run_sync_soon(_deliver, items)
        except trio.RunFinishedError:
            pass  # trio is gone; nobody is left to read these events

    worker = Worker(
        specs,
        max_concurrent=max_concurrent,
        default_max_tokens=default_max_tokens,
        prefill_step_size=prefill_step_size,
        prompt_cache_bytes=prompt_cache_bytes,
        blas_threads=blas_threads,
        self_benchmark=self_benchmark,
        post=post,
    )
    ready = trio.Event()
    failure: list[BaseException] = []

    def thread_main() -> None:
        try:
            worker.load_all()
        except Exception as exc:  # reported to open_engine's caller below
            failure.append(exc)
            token.run_sync_soon(ready.set)
            return
        token.run_sync_soon(ready.set)
        try:
            worker.run()
        except Exception:  # a bug in the loop: fail every request loudly instead of hanging them
            log.exception("the engine thread failed")
            worker.run_dead()

    # A plain thread joined on exit (not a nursery task), so errors from the body reach the
    # caller as themselves rather than wrapped in an ExceptionGroup.
    thread = threading.Thread(target=thread_main, name="darkbloom-engine", daemon=True)
    thread.start()
    try:
        await ready.wait()
        if failure:
            exc = failure[0]
            if isinstance(exc, DarkbloomError):
                raise exc
            raise EngineFailed(f"loading models failed: {type(exc).__name__}: {exc}") from exc
        engine = Engine(worker, max_concurrent=max_concurrent, max_queue=max_queue)
        try:
            yield engine
        finally:
            engine.closed = True
    finally:
        worker.commands.put(Stop())
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(thread.join)
