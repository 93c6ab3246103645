"""Run the real shim app on hypercorn (127.0.0.1, port 0) inside the test's trio.run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio

from darkbloom.api.app import serve
from darkbloom.metrics import ShimMetrics as Metrics
from darkbloom.config import ApiConfig


@asynccontextmanager
async def running_shim(backend, *, metrics: Metrics | None = None, auth=None, **config) -> AsyncIterator[str]:
    """Yields the base URL for the openai SDK (`http://127.0.0.1:<port>/v1`)."""
    cfg = ApiConfig(host="127.0.0.1", port=0, **config)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve, cfg, backend, metrics=metrics, auth=auth))
        yield url + "/v1"
        nursery.cancel_scope.cancel()
