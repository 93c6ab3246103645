"""Assembles the shim: `NetworkBackend` over a PeerNetwork, optional key store, the HTTP app.

Daemons call `open_shim(config, network)` (an async context manager that owns its nursery
and yields a `Shim` once the HTTP listener is up) or `run_shim(config, network,
task_status=...)`. The network is the caller's: a libp2p `open_network(..., role="shim")`
(a DHT client with the shim's own identity) or a memory network in tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from darkbloom.api.app import serve
from darkbloom.api.keys import KeyAuthenticator, KeyStore
from darkbloom.api.metrics import Metrics
from darkbloom.api.network import NetworkBackend
from darkbloom.config import Config

__all__ = ["Shim", "default_known_models", "open_shim", "run_shim", "shim_dir"]


@dataclass
class Shim:
    url: str  # e.g. http://127.0.0.1:8080 (append /v1 for the OpenAI SDK)
    backend: NetworkBackend
    metrics: Metrics
    keys: KeyStore | None


def shim_dir(config: Config) -> Path:
    """The shim's own state: identity and key store, apart from a node's in the same data dir."""
    return config.data_path / "shim"


def default_known_models(config: Config) -> set[str]:
    """Model ids that exist even when nobody serves them now (503, not 404)."""
    from darkbloom.inference.catalog import BUNDLED

    return set(BUNDLED) | {m.id for m in config.inference.models}


@asynccontextmanager
async def open_shim(
    config: Config,
    network: Any,
    *,
    known_models: Iterable[str] | None = None,
    metrics: Metrics | None = None,
) -> AsyncIterator[Shim]:
    api = config.api
    keys = KeyStore(shim_dir(config)) if (api.hosted or api.require_api_key) else None
    auth = KeyAuthenticator(keys) if keys is not None else None
    backend = NetworkBackend(network, api, known_models=default_known_models(config) if known_models is None else known_models)
    metrics = metrics or Metrics()
    try:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(partial(serve, api, backend, auth=auth, metrics=metrics))
            yield Shim(url=url, backend=backend, metrics=metrics, keys=keys)
            nursery.cancel_scope.cancel()
    finally:
        if keys is not None:
            keys.close()


async def run_shim(
    config: Config,
    network: Any,
    *,
    known_models: Iterable[str] | None = None,
    task_status: trio.TaskStatus[Shim] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `task_status.started(shim)` once listening."""
    async with open_shim(config, network, known_models=known_models) as shim:
        task_status.started(shim)
        await trio.sleep_forever()
