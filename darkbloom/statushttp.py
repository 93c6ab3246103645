"""A small local HTTP server for a role's status page, status JSON and Prometheus metrics.

Nodes and relays each run one on their status port (127.0.0.1 by default). Routes are given
as callables that build the response body, so the server holds no state of its own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart import Response
from quart_trio import QuartTrio

from darkbloom.metrics import CONTENT_TYPE, RoleMetrics, render

__all__ = ["serve_status"]

log = logging.getLogger(__name__)


def _app(
    name: str,
    *,
    status_json: Callable[[], dict[str, Any]],
    page: Callable[[], str] | None,
    metrics: tuple[RoleMetrics, ...],
    refresh: Callable[[], Awaitable[None]] | None,
) -> QuartTrio:
    app = QuartTrio(name)

    @app.get("/")
    async def index() -> Response:
        if page is None:
            return Response(json.dumps(status_json(), indent=2), content_type="application/json")
        return Response(page(), content_type="text/html; charset=utf-8")

    @app.get("/status.json")
    async def status() -> Response:
        return Response(json.dumps(status_json(), indent=2), content_type="application/json")

    @app.get("/metrics")
    async def prometheus() -> Response:
        if refresh is not None:
            await refresh()  # gauges that are cheaper to read at scrape time than to keep current
        return Response(render(*metrics), content_type=CONTENT_TYPE)

    @app.get("/health")
    async def health() -> Response:
        return Response('{"status":"ok"}', content_type="application/json")

    return app


async def serve_status(
    name: str,
    host: str,
    port: int,
    *,
    status_json: Callable[[], dict[str, Any]],
    page: Callable[[], str] | None = None,
    metrics: tuple[RoleMetrics, ...] = (),
    refresh: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `task_status.started("http://host:port")` once listening."""
    hc = HypercornConfig()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    app = _app(name, status_json=status_json, page=page, metrics=metrics, refresh=refresh)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn_serve, app, hc, shutdown_trigger=trio.sleep_forever))
        log.info("%s status page on %s", name, binds[0])
        task_status.started(binds[0])
