"""The engine thread: owns MLX, loads models and steps one mlx-lm BatchGenerator per model.

Only `darkbloom.inference.engine` drives it: commands arrive on `commands` (submit, cancel,
call, stop), events leave through `post` once per loop iteration. Nothing here logs or keeps
prompt or output text.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from darkbloom.errors import (
    ContextLengthExceeded,
    DarkbloomError,
    EngineFailed,
    InferenceError,
    InvalidRequest,
    ModelNotFound,
)
from darkbloom.inference import batching
from darkbloom.inference.detok import IncrementalDecoder
from darkbloom.inference.generator import prompts_to_prefill
from darkbloom.inference.events import Admitted, ChoiceFinished, TextDelta, TokenScore
from darkbloom.inference.params import GenerationRequest, Sampling
from darkbloom.inference.selfbench import BenchResult
from darkbloom.inference.stops import StopMatcher
from darkbloom.inference.threads import ThreadTuner
from darkbloom.inference.tools import HERMES, ToolCallScanner, ToolFormat, messages_for_template, parse_tool_calls
from darkbloom.wire.infer import TokenLogprob

__all__ = ["Worker", "Job", "Stop", "DEFAULT_CONTEXT"]

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048

@dataclass(eq=False)
class _Choice:
    index: int
    detok: IncrementalDecoder
    stops: StopMatcher
    scanner: ToolCallScanner | None
    grammar: Any  # GrammarProcessor | None
    uid: int = -1
    token_ids: list[int] = field(default_factory=list)
    pending_tokens: int = 0
    done: bool = False


@dataclass(eq=False)
class Job:
    rid: int
    model_id: str
    req: GenerationRequest
    send: trio.MemorySendChannel[Any]
    prompt: list[int] = field(default_factory=list)
    max_tokens: int = 0
    grammar: str | None = None
    choices: list[_Choice] = field(default_factory=list)
    started: float = 0.0

    @property
    def n(self) -> int:
        return self.req.n


@dataclass(eq=False)
class _Model:
    id: str
    path: Path
    model: Any
    tokenizer: Any
    context_length: int
    vocab_size: int
    eos_ids: tuple[int, ...]
    tool_format: ToolFormat
    template_has_tools: bool
    generator: Any = None
    prompt_cache: Any = None
    llg_tokenizer: Any = None
    waiting: deque[Job] = field(default_factory=deque)
    running: dict[int, tuple[Job, _Choice]] = field(default_factory=dict)  # uid -> (job, choice)
    bench: BenchResult | None = None


class Stop:
    pass


class Worker:
    """Everything that touches MLX; runs on the engine thread only."""

    def __init__(
        self,
        specs: list[tuple[str, Path, int | None]],
        *,
        max_concurrent: int,
        default_max_tokens: int,
        prefill_step_size: int,
        prompt_cache_bytes: int,
        blas_threads: int = 0,
        self_benchmark: bool,
        post: Callable[[list[tuple[Any, Any]]], None],
    ) -> None:
        self.specs = specs
        self.max_concurrent = max_concurrent
        self.default_max_tokens = default_max_tokens
        self.prefill_step_size = prefill_step_size
        self.prompt_cache_bytes = prompt_cache_bytes
        self.blas_threads = blas_threads
        # blas_threads 0: measured per step between 1 and the core count (inference/threads.py).
        self.tuner = ThreadTuner(os.cpu_count() or 1) if blas_threads == 0 else None
        self.threads_now = 0
        self.self_benchmark = self_benchmark
        self.post = post  # deliver [(send_channel, event)] on the trio side, without waiting
        self.commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.models: dict[str, _Model] = {}
        self.jobs: dict[int, Job] = {}
        self.outbox: list[tuple[Any, Any]] = []
        self.samplers: dict[tuple[float, float, float, int], Any] = {}
        # Read by the trio side (plain ints; a stale read only skews load reports).
        self.active_requests = 0
        self.queued_requests = 0
        self.dead = False

    # -- lifecycle ------------------------------------------------------------

    def load_all(self) -> None:
        from darkbloom.inference.blas import ensure_blas, set_blas_threads

        ensure_blas()
        self.threads_now = set_blas_threads(self.blas_threads if self.tuner is None else self.tuner.choices[-1])
        import mlx_lm
        from mlx_lm.models.cache import LRUPromptCache

        for model_id, path, ctx in self.specs:
            if not path.is_dir():
                raise ModelNotFound(model_id)
            t0 = time.monotonic()
            model, tokenizer = mlx_lm.load(str(path))
            cfg_ctx = _context_length(model)
            vocab = _vocab_size(model, tokenizer)
            template = getattr(tokenizer, "chat_template", None) or ""
            fmt = HERMES
            if tokenizer.has_tool_calling and tokenizer.tool_parser is not None:
                fmt = ToolFormat(
                    tokenizer.tool_call_start,
                    tokenizer.tool_call_end,
                    tokenizer.tool_parser,
                    json_body=tokenizer.tool_call_start == "<tool_call>" and "tool_call.name" in template,
                )
            m = _Model(
                id=model_id,
                path=path,
                model=model,
                tokenizer=tokenizer,
                context_length=ctx or cfg_ctx,
                vocab_size=vocab,
                eos_ids=tuple(sorted(tokenizer.eos_token_ids)),
                tool_format=fmt,
                template_has_tools=isinstance(template, str) and "tools" in template,
                prompt_cache=LRUPromptCache(max_size=32, max_bytes=self.prompt_cache_bytes),
            )
            m.generator = self._new_generator(m)
            if self.self_benchmark:
                from darkbloom.inference.selfbench import measure

                m.bench = measure(model, vocab)
            self.models[model_id] = m
            log.info(
                "model %s loaded in %.1fs (context %d%s)",
                model_id,
                time.monotonic() - t0,
                m.context_length,
                f", prefill {m.bench.prefill_tps:.0f} tok/s, decode {m.bench.decode_tps:.1f} tok/s" if m.bench else "",
            )

    def _new_generator(self, m: _Model) -> Any:
        from darkbloom.inference.generator import new_generator

        return new_generator(
            m.model,
            max_tokens=self.default_max_tokens,
            stop_tokens=[[e] for e in m.eos_ids],
            completion_batch_size=self.max_concurrent,
            # Prefill everything that arrived together in one batch (measured: clearly faster than
            # mlx-lm's default of 8 when 16 arrive at once), capped so decode is not starved.
            prefill_batch_size=min(16, self.max_concurrent),
            prefill_step_size=self.prefill_step_size,
        )

    def run(self) -> None:
        """The engine loop: apply commands, schedule, step every model with work, post events."""
        while True:
            busy = any(m.running or m.waiting for m in self.models.values())
            if not self._apply_commands(block=not busy):
                break
            self._flush()  # admissions and refusals go out now, not after the next (prefill) step
            for m in self.models.values():
                self._schedule(m)
                if m.running:
                    self._step(m)
            self._count()
            self._flush()
        # Shutdown: whoever still waits learns the engine is gone.
        for job in list(self.jobs.values()):
            self._fail(job, EngineFailed("the engine stopped"))
        self._flush()
        for m in self.models.values():
            m.generator.close()
        # Let background evaluations (async_eval of kept prompt caches) finish on MLX's own
        # threads before this thread ends: the process may exit right after, and C++ work still
        # running through interpreter shutdown can end it with std::terminate (SIGABRT).
        import mlx.core as mx

        mx.synchronize()

    def run_dead(self) -> None:
        """After a crash: fail every request, present and future, until asked to stop."""
        self.dead = True
        for job in list(self.jobs.values()):
            self._emit(job, EngineFailed("the engine thread failed"))
        self.jobs.clear()
        self._flush()
        while True:
            cmd = self.commands.get()
            if isinstance(cmd, Stop):
                return
            if cmd[0] == "submit":
                self._emit(cmd[1], EngineFailed("the engine thread failed"))
            elif cmd[0] == "call":
                self.outbox.append((cmd[2], ("err", EngineFailed("the engine thread failed"))))
            self._flush()

    def _apply_commands(self, *, block: bool) -> bool:
        """Apply queued commands; False when asked to stop."""
        try:
            cmd = self.commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if isinstance(cmd, Stop):
                return False
            kind = cmd[0]
            if kind == "submit":
                self._submit(cmd[1])
            elif kind == "cancel":
                self._cancel(cmd[1])
            elif kind == "call":
                fn, reply = cmd[1], cmd[2]
                try:
                    self.outbox.append((reply, ("ok", fn(self))))
                except DarkbloomError as exc:  # typed errors go back to the caller
                    self.outbox.append((reply, ("err", exc)))
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return True

    def _count(self) -> None:
        self.queued_requests = sum(len(m.waiting) for m in self.models.values())
        self.active_requests = len(self.jobs) - self.queued_requests

    def _flush(self) -> None:
        if self.outbox:
            items, self.outbox = self.outbox, []
            self.post(items)

    def _emit(self, job: Job, event: Any) -> None:
        self.outbox.append((job.send, (job.rid, event)))

    def _fail(self, job: Job, exc: Exception) -> None:
        self._drop(job)
        self._emit(job, exc)

    def _drop(self, job: Job) -> None:
        self.jobs.pop(job.rid, None)
        m = self.models.get(job.model_id)
        if m is None:
            return
        uids = [c.uid for c in job.choices if c.uid >= 0 and c.uid in m.running]
        for uid in uids:
            m.running.pop(uid, None)
        if uids:
            m.generator.remove(uids)
        try:
            m.waiting.remove(job)
        except ValueError:
            pass

    # -- admission --------------------------------------------------------------

    def _submit(self, job: Job) -> None:
        m = self.models.get(job.model_id)
        if m is None:
            self._emit(job, ModelNotFound(job.model_id, tuple(self.models)))
            return
        try:
            self._prepare(m, job)
        except InferenceError as exc:
            log.info("request %d refused: %s", job.rid, type(exc).__name__)
            self._emit(job, exc)
            return
        self.jobs[job.rid] = job
        m.waiting.append(job)
        job.started = time.monotonic()
        self._emit(job, Admitted(prompt_tokens=len(job.prompt)))
        log.debug("request %d admitted: model %s, %d prompt tokens", job.rid, m.id, len(job.prompt))

    def _prepare(self, m: _Model, job: Job) -> None:
        req = job.req
        tok = m.tokenizer
        if req.kind == "chat":
            msgs = messages_for_template(req.messages, req.tools if req.uses_tools else (), m.template_has_tools)
            kwargs: dict[str, Any] = {}
            if req.uses_tools and m.template_has_tools:
                kwargs["tools"] = [t.as_openai() for t in req.tools]
            try:
                text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **kwargs)
            except Exception as exc:  # jinja raises anything; the template rejected these messages
                raise InvalidRequest(
                    f"the model's chat template cannot render these messages ({type(exc).__name__}); "
                    "check roles and their order",
                    param="messages",
                ) from None
            prompt = list(tok.encode(text, add_special_tokens=False))
        elif isinstance(req.prompt, str):
            prompt = list(tok.encode(req.prompt))
        else:
            prompt = list(req.prompt)
            bad = [t for t in prompt if t >= m.vocab_size]
            if bad:
                raise InvalidRequest(f"prompt token id {bad[0]} is outside the vocabulary (size {m.vocab_size})", param="prompt")
        if not prompt:
            raise InvalidRequest("the prompt is empty after tokenization", param="prompt" if req.kind == "completion" else "messages")
        for t, _ in req.sampling.logit_bias:
            if t >= m.vocab_size:
                raise InvalidRequest(f"logit_bias token id {t} is outside the vocabulary (size {m.vocab_size})", param="logit_bias")
        max_tokens = batching.clamp_max_tokens(
            len(prompt), req.max_tokens, default=self.default_max_tokens, context_length=m.context_length
        )
        if max_tokens is None:
            raise ContextLengthExceeded(len(prompt), req.max_tokens or 1, m.context_length)
        job.prompt = prompt
        job.max_tokens = max_tokens
        job.grammar = self._grammar(m, req)

    def _grammar(self, m: _Model, req: GenerationRequest) -> str | None:
        from darkbloom.inference import constrained

        if req.forces_tool and not m.tool_format.json_body:
            return None  # this model's call format is not JSON; rely on the prompt
        fmt = m.tool_format
        self._llg(m)
        start_tok = _single_special(m, fmt.start)
        end_tok = _single_special(m, fmt.end)
        grammar = constrained.request_grammar(req, fmt.start, fmt.end, start_token=start_tok, end_token=end_tok)
        if grammar is None:
            return None
        from llguidance import LLMatcher

        err = LLMatcher.validate_grammar(grammar, self._llg(m))
        if err:
            param = "tools" if req.forces_tool else "response_format"
            raise InvalidRequest(f"cannot enforce this {param}: {err}", param=param)
        return grammar

    def _llg(self, m: _Model) -> Any:
        if m.llg_tokenizer is None:
            from darkbloom.inference.constrained import make_llg_tokenizer

            m.llg_tokenizer = make_llg_tokenizer(m.tokenizer._tokenizer, m.vocab_size, m.eos_ids)
        return m.llg_tokenizer

    # -- scheduling -------------------------------------------------------------

    def _schedule(self, m: _Model) -> None:
        if not m.waiting:
            return
        count = batching.startable([j.n for j in m.waiting], len(m.running), self.max_concurrent)
        for _ in range(count):
            job = m.waiting.popleft()
            try:
                self._start(m, job)
            except InferenceError as exc:
                self._fail(job, exc)

    def _start(self, m: _Model, job: Job) -> None:
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        req = job.req
        if req.n > 1:
            self._prefill_shared(m, job.prompt)
        prompts, caches, all_tokens, samplers, processors = [], [], [], [], []
        for i in range(req.n):
            cache, rest = m.prompt_cache.fetch_nearest_cache(m.id, job.prompt)
            if cache is not None and not rest:
                # An exact hit: give the last prompt token back to the model to get logits.
                if can_trim_prompt_cache(cache):
                    trim_prompt_cache(cache, 1)
                    rest = job.prompt[-1:]
                else:
                    cache, rest = None, job.prompt
            cached = len(job.prompt) - len(rest)
            prompts.append(list(rest))
            caches.append(cache)
            all_tokens.append(list(job.prompt[:cached]))
            samplers.append(self._sampler(req.sampling, i))
            grammar_proc = None
            if job.grammar is not None:
                from llguidance import LLMatcher

                from darkbloom.inference.constrained import GrammarProcessor

                matcher = LLMatcher(self._llg(m), job.grammar, log_level=0)
                if matcher.is_error():
                    raise InvalidRequest(f"cannot enforce this grammar: {matcher.get_error()}", param="response_format")
                grammar_proc = GrammarProcessor(matcher, m.vocab_size, m.eos_ids)
            processors.append(self._processors(req.sampling, grammar_proc))
            job.choices.append(
                _Choice(
                    index=i,
                    detok=IncrementalDecoder(m.tokenizer),
                    stops=StopMatcher(req.stop),
                    scanner=ToolCallScanner(m.tool_format) if req.uses_tools else None,
                    grammar=grammar_proc,
                )
            )
        if any(c is not None for c in caches):
            log.debug("request %d: %d prompt tokens from cache", job.rid, len(job.prompt) - len(prompts[0]))
        uids = m.generator.insert(
            prompts,
            max_tokens=[job.max_tokens] * req.n,
            caches=caches if any(c is not None for c in caches) else None,
            all_tokens=all_tokens,
            samplers=samplers,
            logits_processors=processors,
        )
        for uid, choice in zip(uids, job.choices):
            choice.uid = uid
            m.running[uid] = (job, choice)

    def _prefill_shared(self, m: _Model, prompt: list[int]) -> None:
        """For n > 1: prefill the prompt once and leave it in the prompt cache, so every choice
        starts from a copy instead of prefilling the same tokens n times."""
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache, rest = m.prompt_cache.fetch_nearest_cache(m.id, prompt)
        if len(rest) <= 1:
            return
        if cache is None:
            cache = make_prompt_cache(m.model)
        todo = rest[:-1]
        with mx.stream(m.generator.stream):
            for i in range(0, len(todo), self.prefill_step_size):
                m.model(mx.array(todo[i : i + self.prefill_step_size])[None], cache=cache)
                mx.eval([c.state for c in cache])
        self._keep_cache(m, prompt[:-1], cache)

    def _keep_cache(self, m: _Model, tokens: Sequence[int], cache: list[Any]) -> None:
        """Keep a finished sequence's KV cache for prefix reuse, within the byte budget.

        The extracted cache is a lazy slice of the batch's arrays: have it evaluated (in the
        background, so the decode pipeline does not stall), after which the entry holds only its
        own bytes (the budget counts those) and no longer the whole batch's buffers."""
        import mlx.core as mx

        if self.prompt_cache_bytes <= 0:
            return
        mx.async_eval([c.state for c in cache])
        m.prompt_cache.insert_cache(m.id, list(tokens), cache)

    def _sampler(self, s: Sampling, index: int) -> Any:
        from mlx_lm.sample_utils import make_sampler

        if s.temperature == 0:
            return make_sampler(0.0)  # the shared greedy sampler: one batched argmax
        if s.seed is not None:
            return _seeded_sampler(s, (s.seed + index) % (1 << 63))
        key = (s.temperature, s.top_p, s.min_p, s.top_k)
        sampler = self.samplers.get(key)
        if sampler is None:
            # Shared by every request with these settings, so mlx-lm samples them in one call.
            sampler = self.samplers[key] = make_sampler(s.temperature, top_p=s.top_p, min_p=s.min_p, top_k=s.top_k)
        return sampler

    def _processors(self, s: Sampling, grammar: Any) -> list[Any]:
        from mlx_lm.sample_utils import make_logits_processors

        procs = make_logits_processors(
            dict(s.logit_bias) or None,
            repetition_penalty=s.repetition_penalty or None,
            presence_penalty=s.presence_penalty or None,
            frequency_penalty=s.frequency_penalty or None,
        )
        if grammar is not None:
            procs.append(grammar)
        return procs

    def _cancel(self, rid: int) -> None:
        job = self.jobs.get(rid)
        if job is not None:
            self._drop(job)
            log.debug("request %d cancelled", rid)

    # -- decoding ---------------------------------------------------------------

    def _step(self, m: _Model) -> None:
        tuning = self.tuner is not None and self.threads_now > 0  # 0: OpenBLAS is not loaded
        if tuning:
            gen = m.generator
            prompts = prompts_to_prefill(gen)
            prefill = prompts > 0
            batch = len(m.running)
            want = self.tuner.choose(batch, prefill, prompts=prompts)
            settled = want == self.threads_now
            if not settled:
                self._set_threads(want)
            elif prefill:
                # Start a prefill step with nothing queued ahead, as after a thread change, so its
                # time is its own work under either choice (it costs one step's pipelining).
                import mlx.core as mx

                mx.synchronize()
            counters = getattr(gen, "_counters", None)
            prompt_tokens0 = getattr(counters, "prompt_tokens", 0)
            t0 = time.perf_counter()
        try:
            _, responses = m.generator.next()
        except Exception:  # a failed step must not take the other models or requests down silently
            log.exception("decode step failed for model %s; failing its %d requests", m.id, len(m.running))
            jobs = {id(j): j for j, _ in m.running.values()}
            m.running.clear()
            m.generator.close()
            m.generator = self._new_generator(m)
            for job in jobs.values():
                self._fail(job, EngineFailed(f"the engine failed while generating with {m.id}"))
            return
        if tuning:
            elapsed = time.perf_counter() - t0
            if prefill:  # the prompt tokens this step processed (mlx-lm's private counters; 0: unknown)
                processed = getattr(counters, "prompt_tokens", 0) - prompt_tokens0
                self.tuner.record(batch, True, want, elapsed, prompts=prompts, prompt_tokens=processed)
            else:
                self.tuner.record(batch, False, want, elapsed, settled=settled)
        finished: list[int] = []
        for r in responses:
            entry = m.running.get(r.uid)
            if entry is None:
                continue
            job, choice = entry
            done = self._on_token(m, job, choice, r)
            if done:
                m.running.pop(r.uid, None)
                if r.finish_reason is None:
                    finished.append(r.uid)
                elif r.prompt_cache is not None and r.all_tokens:
                    self._keep_cache(m, r.all_tokens, r.prompt_cache)
        if finished:
            caches = m.generator.remove(finished, return_prompt_caches=True)
            for cache, tokens in caches.values():
                if tokens:
                    self._keep_cache(m, tokens, cache)

    def _set_threads(self, n: int) -> None:
        """Change OpenBLAS's thread count between steps. MLX may still be computing the step it
        queued ahead (mlx-lm pipelines one step); OpenBLAS must not be reconfigured under a
        running multiplication, so wait for it first."""
        import mlx.core as mx

        from darkbloom.inference.blas import set_blas_threads

        mx.synchronize()
        self.threads_now = set_blas_threads(n)

    def _on_token(self, m: _Model, job: Job, c: _Choice, r: Any) -> bool:
        """Handle one generated token; True when the choice is finished."""
        req = job.req
        token = int(r.token)
        c.token_ids.append(token)
        c.pending_tokens += 1
        is_eos = r.finish_reason == "stop"
        reason: str | None = None
        lps: tuple[TokenLogprob, ...] = ()
        if req.logprobs:
            lps = (_token_logprob(m.tokenizer, self._llg(m), token, r.logprobs, req.top_logprobs),)
        text = "" if is_eos else c.detok.add(token)  # the EOS token itself is not text
        grammar_done = c.grammar is not None and c.grammar.done
        if is_eos or r.finish_reason == "length" or grammar_done:
            text += c.detok.finish()  # release what was held back (a partial character)
            reason = "length" if r.finish_reason == "length" else "stop"
            if c.grammar is not None and c.grammar.matcher.is_error():
                log.warning("request %d: grammar matcher failed; the output may not follow it", job.rid)
        out, hit = c.stops.feed(text)
        if hit:
            reason = "stop"
        elif reason is not None:
            out += c.stops.flush()
        calls: tuple[dict[str, Any], ...] = ()
        if c.scanner is not None:
            content = c.scanner.feed(out)
            if reason is not None:
                content += c.scanner.flush()
                if c.scanner.in_call:
                    parsed = parse_tool_calls(c.scanner.captured, m.tool_format, req.tools)
                    if parsed is not None:
                        calls = tuple(parsed)
                        reason = "tool_calls"
                    else:
                        content += c.scanner.captured  # not a valid call: the user sees what was written
            out = content
        if out or lps or calls:
            self._emit(job, TextDelta(c.index, out, c.pending_tokens, lps, calls))
            c.pending_tokens = 0
        if reason is None:
            return False
        c.done = True
        self._emit(job, ChoiceFinished(c.index, reason, len(c.token_ids), tuple(c.token_ids)))
        if all(ch.done for ch in job.choices):
            self.jobs.pop(job.rid, None)
            log.info(
                "request %d done: model %s, %d prompt + %d completion tokens in %.2fs",
                job.rid,
                m.id,
                len(job.prompt),
                sum(len(ch.token_ids) for ch in job.choices),
                time.monotonic() - job.started,
            )
        return True

    # -- other work on the engine thread -----------------------------------------

    def score(self, model_id: str, prompt: Sequence[int], output: Sequence[int], top_k: int) -> list[TokenScore]:
        import mlx.core as mx

        m = self._model(model_id)
        if not prompt or not output:
            raise InvalidRequest("score needs at least one prompt and one output token", param="prompt")
        tokens = list(prompt) + list(output)
        if len(tokens) > m.context_length:
            raise ContextLengthExceeded(len(prompt), len(output), m.context_length)
        if any(t < 0 or t >= m.vocab_size for t in tokens):
            raise InvalidRequest("a token id is outside the vocabulary", param="prompt")
        logits = m.model(mx.array(tokens[:-1])[None])[0, len(prompt) - 1 :, :].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        target = mx.array(list(output))[:, None]
        chosen = mx.take_along_axis(logprobs, target, axis=-1)[:, 0]
        rank = (logprobs > chosen[:, None]).sum(axis=-1)
        mx.eval(chosen, rank)
        return [
            TokenScore(token_id=t, logprob=float(lp), in_top_k=int(rk) < top_k)
            for t, lp, rk in zip(output, chosen.tolist(), rank.tolist())
        ]

    def score_sampled(self, model_id: str, prompt: Sequence[int], output: Sequence[int], spec: Any) -> list[Any]:
        """Spot checks: scores under the request's sampling distribution (darkbloom.inference.scoring)."""
        from darkbloom.inference.scoring import score_sampled

        m = self._model(model_id)
        return score_sampled(m.model, prompt, output, spec, vocab_size=m.vocab_size, context_length=m.context_length)

    def rebench(self, model_id: str) -> BenchResult:
        from darkbloom.inference.selfbench import measure

        m = self._model(model_id)
        m.bench = measure(m.model, m.vocab_size)
        return m.bench

    def prompt_ids(self, model_id: str, req: GenerationRequest) -> list[int]:
        """The prompt tokens `req` would be served with (templated, validated), for verification."""
        job = Job(rid=0, model_id=model_id, req=req, send=None)  # type: ignore[arg-type]
        self._prepare(self._model(model_id), job)
        return job.prompt

    def tokenize(self, model_id: str, text: str) -> list[int]:
        return list(self._model(model_id).tokenizer.encode(text, add_special_tokens=False))

    def _model(self, model_id: str) -> _Model:
        m = self.models.get(model_id)
        if m is None:
            raise ModelNotFound(model_id, tuple(self.models))
        return m


# --- helpers (engine thread) ----------------------------------------------------


def _context_length(model: Any) -> int:
    args = getattr(model, "args", None)
    for name in ("max_position_embeddings", "max_seq_len", "context_length"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_CONTEXT


def _vocab_size(model: Any, tokenizer: Any) -> int:
    args = getattr(model, "args", None)
    value = getattr(args, "vocab_size", None)
    return int(value) if isinstance(value, int) and value > 0 else len(tokenizer)


def _single_special(m: _Model, text: str) -> int | None:
    """The id of `text` when the tokenizer has it as one special token, else None."""
    ids = m.tokenizer.encode(text, add_special_tokens=False)
    # llguidance treats every added token as special: grammars must name it by id.
    if len(ids) == 1 and (ids[0] in set(getattr(m.tokenizer, "all_special_ids", ()) or ()) or m.llg_tokenizer.is_special_token(ids[0])):
        return int(ids[0])
    return None


def _seeded_sampler(s: Sampling, seed: int) -> Callable[[Any], Any]:
    """A request with a seed draws with replayable noise (darkbloom.inference.replay): a spot
    check's verifier rebuilds it from the seed, so the shim seeds every sampled request."""
    from darkbloom.inference.replay import ReplayableSampler

    return ReplayableSampler(temperature=s.temperature, seed=seed, top_p=s.top_p, min_p=s.min_p, top_k=s.top_k)


def _token_text(tokenizer: Any, llg: Any, token: int) -> tuple[str, bytes]:
    """A token's own text and exact bytes (a byte-level token may be part of a character)."""
    raw = llg.decode_bytes([token])
    if raw.startswith(b"\xff"):  # llguidance's marker for special tokens: use their name
        text = tokenizer.decode([token])
        return text, text.encode("utf-8")
    return raw.decode("utf-8", errors="replace"), raw


def _token_logprob(tokenizer: Any, llg: Any, token: int, logprobs: Any, top: int) -> TokenLogprob:
    import numpy as np

    lp = np.asarray(logprobs, dtype=np.float32).reshape(-1)
    alts: tuple[tuple[str, float], ...] = ()
    if top > 0:
        idx = np.argpartition(-lp, top)[:top] if top < lp.shape[0] else np.arange(lp.shape[0])
        idx = idx[np.argsort(-lp[idx])]
        alts = tuple((_token_text(tokenizer, llg, int(i))[0], float(lp[i])) for i in idx)
    text, raw = _token_text(tokenizer, llg, token)
    return TokenLogprob(token=text, logprob=float(lp[token]), bytes_=raw, top=alts)
