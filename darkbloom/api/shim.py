"""Assembles the shim: `NetworkBackend` over a PeerNetwork, payment lanes, key store, the HTTP app.

Daemons call `open_shim(config, network)` (an async context manager that owns its nursery
and yields a `Shim` once the HTTP listener is up) or `run_shim(config, network,
task_status=...)`. The network is the caller's: a libp2p `open_network(..., role="shim")`
(a DHT client with the shim's own identity) or a memory network in tests.

Paying nodes: when a ledger is known (`ledger.ledger_peer`, else the first bootstrap relay),
the shim opens lanes there with its own key (<data dir>/shim/identity.key, the account
`darkbloom up` funds) and signs vouchers for what it receives; with no ledger it asks for
free serving (nodes that require payment refuse, and the router tries others).
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
from darkbloom.api.network import NetworkBackend
from darkbloom.api.metering import ConsumerMeter
from darkbloom.config import Config, bundled_bootstrap_file, load_bootstrap_file
from darkbloom.identity import Identity, load_or_create_identity
from darkbloom.metrics import ShimMetrics

__all__ = ["Shim", "default_known_models", "ledger_target", "open_shim", "run_shim", "shim_dir"]


@dataclass
class Shim:
    url: str  # e.g. http://127.0.0.1:8080 (append /v1 for the OpenAI SDK)
    backend: NetworkBackend
    metrics: ShimMetrics
    keys: KeyStore | None
    meter: ConsumerMeter | None  # None: no ledger known, requests ask for free serving


def shim_dir(config: Config) -> Path:
    """The shim's own state: identity and key store, apart from a node's in the same data dir."""
    return config.data_path / "shim"


def default_known_models(config: Config) -> set[str]:
    """Model ids that exist even when nobody serves them now (503, not 404)."""
    from darkbloom.inference.catalog import BUNDLED

    return set(BUNDLED) | {m.id for m in config.inference.models}


def ledger_target(config: Config) -> tuple[str, tuple[str, ...]] | None:
    """(peer id, addrs) of the ledger: `ledger.ledger_peer`, else the first bootstrap relay."""
    addrs: list[str] = []
    if config.ledger.ledger_peer:
        addrs.append(config.ledger.ledger_peer)
    addrs += config.p2p.bootstrap
    if config.p2p.bootstrap_file:
        addrs += load_bootstrap_file(config.p2p.bootstrap_file)
    elif config.p2p.use_bundled_bootstrap and bundled_bootstrap_file().exists():
        addrs += load_bootstrap_file(bundled_bootstrap_file())
    for addr in addrs:
        if "/p2p/" in addr and "/p2p-circuit" not in addr:
            return addr.rsplit("/p2p/", 1)[1], (addr,)
    return None


@asynccontextmanager
async def open_shim(
    config: Config,
    network: Any,
    *,
    identity: Identity | None = None,
    known_models: Iterable[str] | None = None,
    metrics: ShimMetrics | None = None,
    pay: bool = True,
    trust: Any | None = None,
) -> AsyncIterator[Shim]:
    """The running shim. `identity` signs vouchers (default: the shim's key in its data dir);
    `pay=False` never opens lanes; `trust` is a `darkbloom.api.trust.routing.TrustedRouting`
    (reputation mix, breaker, canaries before feature requests, hedging, spot checks), made
    here when `api.hedge` or `api.spot_check_probability` is set; without it routing uses the
    plain router and breaker."""
    api = config.api
    keys = KeyStore(shim_dir(config)) if (api.hosted or api.require_api_key) else None
    auth = KeyAuthenticator(keys) if keys is not None else None
    meter = None
    target = ledger_target(config) if pay else None
    if target is not None:
        identity = identity or load_or_create_identity(shim_dir(config))
        meter = ConsumerMeter(network, identity, config.ledger, ledger_peer=target[0], ledger_addrs=target[1])
    if trust is None and (api.hedge or api.spot_check_probability > 0):
        from darkbloom.api.trust.refresh import routing_from_config

        trust = routing_from_config(api)  # breaker and spot-check policy from [api]
    backend = NetworkBackend(network, api, meter=meter, trust=trust,
                             known_models=default_known_models(config) if known_models is None else known_models)
    metrics = metrics or ShimMetrics()
    backend.metrics = metrics
    metrics.refresh = lambda: metrics.peers.set(len(network.peers()))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)  # provider lookups in the background, off the request path
            url = await nursery.start(partial(serve, api, backend, auth=auth, metrics=metrics))
            reputation_from = target if target is not None else ledger_target(config)
            if trust is not None and api.spot_check_report and reputation_from is not None:
                from darkbloom.api.trust.report import Reporter

                backend.reporter = Reporter(network, identity or load_or_create_identity(shim_dir(config)), reputation_from)
            if reputation_from is not None and api.reputation_refresh_s > 0:  # the relay's signed reputation table
                from darkbloom.api.trust.refresh import run_shim_reputation

                await nursery.start(partial(run_shim_reputation, backend, network, reputation_from,
                                            interval_s=api.reputation_refresh_s))
            yield Shim(url=url, backend=backend, metrics=metrics, keys=keys, meter=meter)
            nursery.cancel_scope.cancel()
    finally:
        if meter is not None:
            await meter.aclose()
        if keys is not None:
            keys.close()


async def run_shim(
    config: Config,
    network: Any,
    *,
    identity: Identity | None = None,
    known_models: Iterable[str] | None = None,
    task_status: trio.TaskStatus[Shim] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `task_status.started(shim)` once listening."""
    async with open_shim(config, network, identity=identity, known_models=known_models) as shim:
        task_status.started(shim)
        await trio.sleep_forever()
