"""The OpenAI-compatible HTTP app (quart-trio) and `serve`, which runs it on hypercorn.

Handlers validate with `darkbloom.api.requests`, get a committed `Session` from the
`Backend` (routing and failover happen there), and turn frames into OpenAI JSON or SSE with
`darkbloom.api.format`. Errors go through the one table in `darkbloom.api.errors`. A client
that disconnects cancels the handler, which closes the session, which resets the stream and
stops generation on the node. Logs carry ids, model, token counts and timings, never text.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart import Response, request
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from darkbloom import __version__
from darkbloom.api import errors as api_errors
from darkbloom.api.backend import Backend, Session
from darkbloom.api.format import Completion, embedding_response, fingerprint, model_object
from darkbloom.api.openapi import openapi_document
from darkbloom.api.requests import (
    ShimRequest,
    parse_chat_request,
    parse_completion_request,
    parse_embedding_request,
)
from darkbloom.api.sse import DONE, sse_data, sse_error
from darkbloom.api.trust.seeding import replay_seeded
from darkbloom.api.timeline import timeline
from darkbloom.config import ApiConfig
from darkbloom.errors import ApiError, ConfigError, DarkbloomError, InvalidRequest, ModelNotFound, StreamClosed
from darkbloom.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from darkbloom.metrics import ShimMetrics
from darkbloom.wire.infer import ChoiceEnd, Delta, Done, Embeddings, InferRequest

__all__ = ["Authenticator", "Principal", "create_app", "serve"]

logger = logging.getLogger(__name__)
_tl = timeline("shim")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an API key's id (hosted mode) or the local user."""

    key_id: str = "local"
    account: str = ""


class Authenticator(Protocol):
    """Hosted mode: checks keys and per-key limits; records usage. Raise ApiError 401/429."""

    async def authenticate(self, api_key: str | None) -> Principal: ...

    async def admit(self, principal: Principal, *, estimated_tokens: int) -> None: ...

    async def record(self, principal: Principal, *, model: str, prompt_tokens: int, completion_tokens: int) -> None: ...


class _Connection(TrioASGIHTTPConnection):
    """Closes a streaming session even when the client left before the body was started."""

    async def _send_response(self, send, response) -> None:  # type: ignore[override]
        try:
            await super()._send_response(send, response)
        finally:
            cleanup = getattr(response, "darkbloom_cleanup", None)
            if cleanup is not None:
                with trio.CancelScope(shield=True):
                    await cleanup()


class _App(QuartTrio):
    asgi_http_class = _Connection


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), status=status, headers=headers or {},
                    content_type="application/json")


def _error_response(err: ApiError) -> Response:
    return _json(api_errors.error_body(err), err.status, api_errors.error_headers(err))


def _node_headers(session: Session, request_id: str) -> dict[str, str]:
    return _parts_headers([session], request_id)


def _parts_headers(sessions: list[Session], request_id: str) -> dict[str, str]:
    """An answer's node headers; for a list of prompts, each distinct node and route in order."""
    nodes = list(dict.fromkeys(s.node_id for s in sessions))
    routes = list(dict.fromkeys(s.route for s in sessions))
    return {"x-darkbloom-node": ", ".join(nodes), "x-darkbloom-route": ", ".join(routes), "x-request-id": request_id}


def _usage_sum(usages: list[dict[str, int]]) -> dict[str, int]:
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {k: sum(u.get(k, 0) for u in usages) for k in keys}


def _offset(chunk: dict[str, Any], by: int) -> dict[str, Any]:
    """A chunk whose choices are renumbered `by` on (the answer to a later prompt of a list)."""
    return {**chunk, "choices": [{**c, "index": c["index"] + by} for c in chunk.get("choices", ())]}


def _merged(bodies: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Whole answers to a list of prompts as one: prompt i's choice j is choice i*n+j."""
    out = dict(bodies[0])
    out["choices"] = [{**c, "index": c["index"] + i * n} for i, body in enumerate(bodies) for c in body["choices"]]
    out["usage"] = _usage_sum([body["usage"] for body in bodies])
    return out


async def _all(tasks: list[Callable[[], Awaitable[None]]]) -> None:
    """Run `tasks` together; the first failure cancels the rest and is raised as itself (an API
    error, not a group), so the error handlers see what they would for one request."""
    try:
        async with trio.open_nursery() as nursery:
            for task in tasks:
                nursery.start_soon(task)
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []

        def walk(exc: BaseException) -> None:
            if isinstance(exc, BaseExceptionGroup):
                for inner in exc.exceptions:
                    walk(inner)
            else:
                leaves.append(exc)

        walk(group)
        meaningful = [e for e in leaves if not isinstance(e, trio.Cancelled)]
        if meaningful:
            raise meaningful[0] from None
        raise


def _estimate_tokens(body: dict[str, Any]) -> int:
    """Rough pre-admission estimate for tokens/min limits: bytes/4 plus the output cap."""
    cap = int(body.get("max_completion_tokens") or body.get("max_tokens") or 256)
    prompt = body.get("prompt")
    answers = len(prompt) if isinstance(prompt, list) and prompt else 1  # a list of prompts: an answer each
    return len(json.dumps(body.get("messages") or prompt or body.get("input") or "")) // 4 + cap * answers


def create_app(
    backend: Backend,
    *,
    config: ApiConfig | None = None,
    metrics: ShimMetrics | None = None,
    auth: Authenticator | None = None,
) -> QuartTrio:
    """The quart-trio app over `backend`. `auth` None: local mode, every caller is `local`."""
    cfg = config or ApiConfig()
    stats = metrics or ShimMetrics()
    app = _App(__name__)
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    # Quart would cut a response at RESPONSE_TIMEOUT without a word; our own deadlines below end a
    # stream with an error event instead.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 60
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    app.darkbloom_metrics = stats  # type: ignore[attr-defined]

    async def principal() -> Principal:
        if auth is None:
            return Principal()
        header = request.headers.get("Authorization", "")
        key = header[7:].strip() if header[:7].lower() == "bearer " else None
        return await auth.authenticate(key or None)

    async def read_body() -> Any:
        length = request.content_length
        if length is not None and length > cfg.max_body_bytes:
            raise api_errors.too_large(cfg.max_body_bytes)
        try:
            data = await request.get_data(cache=False)
        except RequestEntityTooLarge:
            raise api_errors.too_large(cfg.max_body_bytes) from None
        if len(data) > cfg.max_body_bytes:
            raise api_errors.too_large(cfg.max_body_bytes)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None

    def endpoint(name: str) -> Callable[[Callable[..., Awaitable[Response]]], Callable[..., Awaitable[Response]]]:
        """OpenAI errors for every failure of a handler; one metrics line per answer."""

        def wrap(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
            async def run(*args: Any, **kwargs: Any) -> Response:
                code = None
                try:
                    response = await handler(*args, **kwargs)
                except DarkbloomError as exc:  # the single table decides status and body
                    err = api_errors.to_api_error(exc)
                    code = err.code
                    if err.status >= 500:
                        logger.warning("%s answered %d: %s", name, err.status, err.code)
                    response = _error_response(err)
                except Exception as exc:  # a bug: answer 500, log where (never the message: it may hold text)
                    tb = exc.__traceback__
                    while tb is not None and tb.tb_next is not None:
                        tb = tb.tb_next
                    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
                    logger.error("%s failed: %s at %s", name, type(exc).__name__, where)
                    response = _error_response(api_errors.to_api_error(exc))
                    code = "internal"
                stats.answered(name, response.status_code, code)
                return response

            run.__name__ = f"endpoint_{name}"
            return run

        return wrap

    # --- plain endpoints ----------------------------------------------------------------

    @app.get("/health")
    @endpoint("health")
    async def health() -> Response:
        return _json({"status": "ok", "version": __version__, "inflight": stats.inflight})

    @app.get("/metrics")
    @endpoint("metrics")
    async def metrics_text() -> Response:
        return Response(stats.render(), content_type=METRICS_CONTENT_TYPE)

    @app.get("/openapi.json")
    @endpoint("openapi")
    async def openapi() -> Response:
        return _json(openapi_document(__version__))

    @app.get("/v1/models")
    @endpoint("models")
    async def list_models() -> Response:
        await principal()
        listings = await backend.list_models()
        data = [_listing_object(m) for m in sorted(listings, key=lambda m: m.id)]
        return _json({"object": "list", "data": data})

    @app.get("/v1/models/<path:model_id>")
    @endpoint("model")
    async def get_model(model_id: str) -> Response:
        await principal()
        for m in await backend.list_models():
            if m.id == model_id:
                return _json(_listing_object(m))
        raise ModelNotFound(model_id)

    # --- generation ---------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    @endpoint("chat")
    async def chat() -> Response:
        t_in = time.monotonic()
        who = await principal()
        body = await read_body()
        parsed = parse_chat_request(body)
        return await generate(who, parsed, body, prefix="chatcmpl", t_in=t_in)

    @app.post("/v1/completions")
    @endpoint("completions")
    async def completions() -> Response:
        t_in = time.monotonic()
        who = await principal()
        body = await read_body()
        parsed = parse_completion_request(body)
        if parsed.prompts:
            return await generate_many(who, parsed, body, t_in=t_in)
        return await generate(who, parsed, body, prefix="cmpl", t_in=t_in)

    @app.post("/v1/embeddings")
    @endpoint("embeddings")
    async def embeddings() -> Response:
        who = await principal()
        body = await read_body()
        parsed = parse_embedding_request(body)
        if auth is not None:
            await auth.admit(who, estimated_tokens=_estimate_tokens(body))
        request_id = f"emb-{secrets.token_hex(12)}"
        infer = InferRequest(request_id=request_id, kind="embedding", model=parsed.model,
                             digest=parsed.hints.digest, params=parsed.params)
        started = trio.current_time()
        session = await backend.open_session(infer, parsed.hints)
        try:
            frame = await next_frame(session, started)
            if not isinstance(frame, Embeddings):
                raise ApiError(502, "the provider answered an embedding request without vectors",
                               type="server_error", code="provider_failed")
            out = embedding_response(model=parsed.model, vectors=frame.vectors, dim=frame.dim, count=frame.count,
                                     prompt_tokens=frame.prompt_tokens, encoding_format=parsed.encoding_format)
            while await next_frame(session, started) is not None:
                pass  # up to Done, so a paid lane settles the request cleanly
        except BaseException:
            with trio.CancelScope(shield=True):
                await session.aclose()
            raise
        close_later(session)
        stats.add_tokens(parsed.model, frame.prompt_tokens, 0)
        if auth is not None:
            await auth.record(who, model=parsed.model, prompt_tokens=frame.prompt_tokens, completion_tokens=0)
        logger.info("%s model=%s node=%s inputs=%d prompt_tokens=%d ms=%.0f", request_id, parsed.model,
                    session.node_id[-8:], frame.count, frame.prompt_tokens, (trio.current_time() - started) * 1000)
        return _json(out, headers=_node_headers(session, request_id))

    def new_infer(parsed: ShimRequest, request_id: str) -> InferRequest:
        # Spot checks: a sampled request gets a seed (replayable draws) and every request a secret nonce
        # that salts the nodes' commitments to its token ids (darkbloom.api.trust.seeding, trust.token_hash).
        return InferRequest(request_id=request_id, kind=parsed.kind, model=parsed.model,  # type: ignore[arg-type]
                            digest=parsed.hints.digest, params=replay_seeded(parsed.params, parsed.kind),
                            nonce=secrets.token_bytes(16))

    def new_completion(parsed: ShimRequest, response_id: str, session: Session) -> Completion:
        return Completion(
            kind=parsed.kind,  # type: ignore[arg-type]
            id=response_id,
            model=parsed.model,
            created=int(time.time()),
            n=parsed.n,
            include_usage=parsed.include_usage,
            want_logprobs=bool(parsed.params.get("logprobs")),
            fingerprint=fingerprint(session.node_id, session.accepted.digest),
            prompt_tokens=session.accepted.prompt_tokens,
        )

    async def generate(who: Principal, parsed: ShimRequest, body: dict[str, Any], *, prefix: str,
                       t_in: float | None = None) -> Response:
        if auth is not None:
            await auth.admit(who, estimated_tokens=_estimate_tokens(body))
        request_id = f"{prefix}-{secrets.token_hex(12)}"
        if _tl.enabled:
            if t_in is not None:
                _tl.mark(request_id, "http_in", at=t_in)
            _tl.mark(request_id, "parsed")
        infer = new_infer(parsed, request_id)
        started = trio.current_time()
        if parsed.stream:
            session = await backend.open_session(infer, parsed.hints)
            stats.first_token(trio.current_time() - started)
            return stream_response(who, request_id, [(parsed, session, new_completion(parsed, request_id, session), infer)],
                                   started)
        session, comp = await answer(who, parsed, request_id, infer, started)
        return _json(comp.response(), headers=_node_headers(session, request_id))

    async def answer(who: Principal, parsed: ShimRequest, response_id: str, infer: InferRequest,
                     started: float, *, record: bool = True) -> tuple[Session, Completion]:
        """A whole (non-streamed) answer: a failure before it is complete starts it over on another node.
        `record` False leaves `finish` (usage per key, metrics, the log line) to the caller."""
        tried: set[str] = set()
        while True:
            session = await backend.open_session(infer, parsed.hints, exclude=frozenset(tried))
            stats.first_token(trio.current_time() - started)
            comp = new_completion(parsed, response_id, session)
            try:
                while (frame := await next_frame(session, started)) is not None:
                    feed(comp, frame)
            except BaseException as exc:
                with trio.CancelScope(shield=True):
                    await session.aclose()
                # Nothing reached the client yet: a non-streamed answer can start over elsewhere.
                if not isinstance(exc, (DarkbloomError, ValueError)) or isinstance(exc, (InvalidRequest, ModelNotFound)):
                    raise
                tried.add(session.node_id)
                stats.failover()
                logger.warning("%s node %s failed mid-answer (%s); retrying elsewhere", infer.request_id,
                               session.node_id[-8:], type(exc).__name__)
                if len(tried) >= cfg.max_attempts:
                    raise api_errors.upstream_failed(parsed.model, len(tried), type(exc).__name__) from None
                continue
            close_later(session)
            if not comp.finished:
                raise ApiError(502, "the provider ended the answer early", type="server_error", code="provider_failed")
            if record:
                await finish(who, parsed, infer.request_id, session, comp, started, infer)
            return session, comp

    async def generate_many(who: Principal, parsed: ShimRequest, body: dict[str, Any], *,
                            t_in: float | None = None) -> Response:
        """/v1/completions with a list of prompts: each prompt is its own request to the network (in
        parallel, possibly on different nodes); the answers come back as one response whose choice
        i*n+j is prompt i's j-th, as OpenAI numbers them, with usage summed."""
        if auth is not None:
            await auth.admit(who, estimated_tokens=_estimate_tokens(body))
        request_id = f"cmpl-{secrets.token_hex(12)}"
        parts = [replace(parsed, params={**parsed.params, "prompt": text}, prompts=()) for text in parsed.prompts]
        infers = [new_infer(part, f"{request_id}-{i}") for i, part in enumerate(parts)]
        started = trio.current_time()
        if _tl.enabled and t_in is not None:
            for infer in infers:
                _tl.mark(infer.request_id, "http_in", at=t_in)
        if parsed.stream:
            opened: list[tuple[ShimRequest, Session, Completion, InferRequest] | None] = [None] * len(parts)

            async def open_one(i: int) -> None:
                session = await backend.open_session(infers[i], parts[i].hints)
                opened[i] = (parts[i], session, new_completion(parts[i], request_id, session), infers[i])

            try:
                await _all([partial(open_one, i) for i in range(len(parts))])
            except BaseException:
                with trio.CancelScope(shield=True):
                    for entry in opened:
                        if entry is not None:
                            await entry[1].aclose()
                raise
            stats.first_token(trio.current_time() - started)
            return stream_response(who, request_id, [e for e in opened if e is not None], started)
        answers: list[tuple[Session, Completion] | None] = [None] * len(parts)

        async def answer_one(i: int) -> None:
            answers[i] = await answer(who, parts[i], request_id, infers[i], started, record=False)

        # Usage is the key's only once the client gets the answers: when one prompt fails, the
        # client gets an error and none of them, so none is counted (the nodes that answered
        # the others were still paid through their lanes: they did the work).
        await _all([partial(answer_one, i) for i in range(len(parts))])
        done = [a for a in answers if a is not None]
        for i, (session, comp) in enumerate(done):
            await finish(who, parts[i], infers[i].request_id, session, comp, started, infers[i], key_usage=False)
        if auth is not None:  # one request for the key, as it was admitted
            with trio.CancelScope(shield=True):
                await auth.record(who, model=parsed.model, prompt_tokens=sum(c.prompt_tokens for _, c in done),
                                  completion_tokens=sum(c.completion_tokens for _, c in done))
        return _json(_merged([comp.response() for _, comp in done], parsed.n),
                     headers=_parts_headers([session for session, _ in done], request_id))

    def close_later(session: Session) -> None:
        """Close after the answer is sent: a paid lane's final countersign needs no client waiting."""
        app.add_background_task(session.aclose)

    async def next_frame(session: Session, started: float) -> Any:
        """The session's next frame, or a typed error when the node stalls or the request overruns."""
        deadline = min(started + cfg.request_timeout_s, trio.current_time() + cfg.first_token_timeout_s)
        with trio.move_on_at(deadline):
            return await session.receive()
        if trio.current_time() >= started + cfg.request_timeout_s:
            raise ApiError(504, f"the request ran longer than {cfg.request_timeout_s:.0f} s", type="server_error",
                           code="timeout")
        raise StreamClosed(session.node_id, f"no frame from the node for {cfg.first_token_timeout_s:.0f} s")

    def feed(comp: Completion, frame: Any) -> list[dict[str, Any]]:
        if isinstance(frame, Delta):
            return comp.on_delta(frame)
        if isinstance(frame, ChoiceEnd):
            if frame.finish_reason == "cancelled":
                raise ApiError(502, "the provider cancelled the generation", type="server_error",
                               code="provider_failed")
            return comp.on_choice_end(frame)
        if isinstance(frame, Done):
            return []
        raise ApiError(502, f"unexpected {type(frame).__name__} frame from the provider", type="server_error",
                       code="provider_failed")

    async def finish(who: Principal, parsed: ShimRequest, request_id: str, session: Session, comp: Completion,
                     started: float, infer: InferRequest | None = None, *, key_usage: bool = True) -> None:
        stats.add_tokens(parsed.model, comp.prompt_tokens, comp.completion_tokens)
        wanted = getattr(backend, "spot_check_wanted", None)
        if infer is not None and comp.finished and wanted is not None and wanted(infer):
            # After the answer: a second node scores these tokens; the client does not wait.
            app.add_background_task(backend.spot_check, infer, session.node_id,  # type: ignore[attr-defined]
                                    session.accepted.digest, comp.choices[0].token_ids, comp.choices[0].attestation)
        if auth is not None and key_usage:
            with trio.CancelScope(shield=True):
                await auth.record(who, model=parsed.model, prompt_tokens=comp.prompt_tokens,
                                  completion_tokens=comp.completion_tokens)
        logger.info("%s model=%s node=%s route=%s prompt_tokens=%d completion_tokens=%d ms=%.0f", request_id,
                    parsed.model, session.node_id[-8:], session.route, comp.prompt_tokens, comp.completion_tokens,
                    (trio.current_time() - started) * 1000)

    def stream_response(who: Principal, request_id: str,
                        parts: list[tuple[ShimRequest, Session, Completion, InferRequest]], started: float) -> Response:
        """The SSE answer: each part's chunks in turn (one part, unless a list of prompts was sent,
        whose choices are numbered on after the previous prompt's), then the usage of all."""

        async def events() -> AsyncIterator[bytes]:
            ended = False
            first = True
            current = parts[0]
            stats.inflight += 1
            try:
                for p, current in enumerate(parts):
                    parsed, session, comp, _ = current
                    while (frame := await next_frame(session, started)) is not None:
                        chunks = feed(comp, frame)
                        if chunks:  # one body write per frame (e.g. the role chunk and the first content together)
                            if first:
                                first = False
                                _tl.mark(request_id, "sse_first")
                            if p:
                                chunks = [_offset(chunk, p * parsed.n) for chunk in chunks]
                            yield b"".join(sse_data(chunk) for chunk in chunks)
                usage = parts[0][2].usage_chunk()
                if usage is not None:
                    usage["usage"] = _usage_sum([comp.usage() for _, _, comp, _ in parts])
                    yield sse_data(usage)
                yield DONE
                ended = True
            except DarkbloomError as exc:
                # After the first byte: end with an error event, never a silent truncation.
                ended = True
                stats.stream_error()
                err = api_errors.to_api_error(exc)
                logger.warning("%s node %s failed mid-stream: %s", request_id, current[1].node_id[-8:],
                               type(exc).__name__)
                yield sse_error(api_errors.error_body(err))
            finally:
                stats.inflight -= 1
                with trio.CancelScope(shield=True):
                    for parsed, session, comp, infer in parts:
                        await session.aclose()
                    if not ended:
                        stats.client_disconnect()
                        logger.info("%s client disconnected after %d tokens", request_id,
                                    sum(comp.completion_tokens for _, _, comp, _ in parts))
                    for parsed, session, comp, infer in parts:
                        await finish(who, parsed, infer.request_id, session, comp, started, infer if ended else None)

        response = Response(events(), content_type="text/event-stream",
                            headers={**_parts_headers([session for _, session, _, _ in parts], request_id),
                                     "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        response.timeout = None

        async def cleanup() -> None:
            for _, session, _, _ in parts:
                await session.aclose()

        response.darkbloom_cleanup = cleanup  # type: ignore[attr-defined]
        return response

    # --- errors outside handlers (routing, body size) -------------------------------------

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        if isinstance(exc, RequestEntityTooLarge):
            err = api_errors.too_large(cfg.max_body_bytes)
        elif exc.code == 404:
            err = ApiError(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")
        else:
            err = ApiError(exc.code or 500, exc.description or exc.name, code=None)
        stats.answered("other", err.status, err.code)
        return _error_response(err)

    return app


def _listing_object(m: Any) -> dict[str, Any]:
    return model_object(
        m.id,
        providers=m.providers,
        digests=list(m.digests),
        features=list(m.features),
        price_input_per_m=m.price_input_per_m,
        price_output_per_m=m.price_output_per_m,
        context_length=m.context_length,
    )


async def serve(
    config: ApiConfig,
    backend: Backend,
    *,
    auth: Authenticator | None = None,
    metrics: ShimMetrics | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the app on hypercorn until cancelled; `task_status.started(base_url)` once listening.

    With `config.hosted`, it serves HTTPS with `tls_cert`/`tls_key`.
    """
    app = create_app(backend, config=config, metrics=metrics, auth=auth)
    hc = HypercornConfig()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hc.bind = [f"{host}:{config.port}"]
    hc.accesslog = None  # no access log: paths are fine, but keep the shim's logs to our lines
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.keep_alive_timeout = 75
    if config.hosted:
        if not config.tls_cert or not config.tls_key:
            raise ConfigError("hosted mode needs a TLS certificate and key", key="api.tls_cert",
                              hint="set api.tls_cert and api.tls_key in darkbloom.toml")
        hc.certfile = config.tls_cert
        hc.keyfile = config.tls_key
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn_serve, app, hc, shutdown_trigger=trio.sleep_forever))
        logger.info("shim listening on %s", binds[0])
        task_status.started(binds[0])
