"""The relay role: DHT bootstrap server + circuit relay hop + ledger service + status page.

`open_relay(config)` starts everything and yields a `Relay` once it listens; leaving the block
stops it. Its listen multiaddrs are what operators put in `bootstrap-nodes.toml`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import trio

from darkbloom import __version__
from darkbloom.config import Config
from darkbloom.identity import Identity, load_or_create_identity
from darkbloom.ledger.service import LedgerService
from darkbloom.ledger.store import LedgerStore, open_store
from darkbloom.log import short_id
from darkbloom.metrics import RoleMetrics
from darkbloom.relay.intake import TrustStore
from darkbloom.relay.probe import CanaryPurse, RelayProber, SelfLedgerNetwork
from darkbloom.relay.trust import RelayTrust
from darkbloom.statushttp import serve_status
from darkbloom.wire.ledger import LEDGER_PROTOCOL

__all__ = ["CountedLookups", "MeteredLedgerService", "Relay", "open_relay", "relay_p2p_config"]

log = logging.getLogger(__name__)


@dataclass
class Relay:
    identity: Identity
    network: object  # darkbloom.p2p PeerNetwork (relay role)
    ledger: LedgerService
    store: LedgerStore
    metrics: RoleMetrics
    status_url: str
    started_at: float
    trust: RelayTrust | None = None
    settlement: "SettlementGauges | None" = None
    prober: RelayProber | None = None

    @property
    def peer_id(self) -> str:
        return self.network.peer_id  # type: ignore[attr-defined]

    @property
    def addrs(self) -> tuple[str, ...]:
        """Full multiaddrs (with /p2p/<id>) to bootstrap from."""
        return tuple(self.network.listen_addrs)  # type: ignore[attr-defined]

    @property
    def ledger_key(self) -> str:
        return self.identity.public_key.hex()

    def status(self) -> dict:
        net = self.network
        return {
            "role": "relay",
            "peer_id": self.peer_id,
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "addrs": list(self.addrs),
            "peers": len(net.peers()),  # type: ignore[attr-defined]
            "ledger_key": self.ledger_key,
            "epochs_closed": self.ledger.epochs_closed,
            **(self.trust.status() if self.trust is not None else {}),
        }

    async def refresh_metrics(self) -> None:
        from darkbloom.p2p.relay import DarkbloomHop

        self.metrics.peers.set(len(self.network.peers()))  # type: ignore[attr-defined]
        if self.settlement is not None:
            # Each circuit is forwarded as two directions; the hop counts directions.
            self.settlement.circuits_open.set(DarkbloomHop.circuits_open // 2)
            self.settlement.circuits_started.set(DarkbloomHop.circuits_total // 2)
        if self.settlement is not None:
            await self.settlement.refresh(self.ledger, self.started_at)

    def bootstrap_entry(self, name: str = "relay") -> str:
        """The TOML line for bootstrap-nodes.toml."""
        addrs = ", ".join(f'"{a}"' for a in self.addrs)
        return f'{{ name = "{name}", addrs = [{addrs}] }},'


def relay_p2p_config(config: Config):
    """The p2p settings of a relay: its own listen addresses, always publicly reachable."""
    return dataclasses.replace(config.p2p, listen_addrs=config.relay.listen_addrs, reachability="public")


@asynccontextmanager
async def open_relay(config: Config, *, bootstrap: tuple[str, ...] = ()) -> AsyncIterator[Relay]:
    from darkbloom.p2p.network import open_relay_service  # only p2p imports libp2p; load it lazily

    data_dir = config.data_path
    identity = load_or_create_identity(data_dir)
    store = await trio.to_thread.run_sync(open_store, config.ledger.url, data_dir)
    metrics = RoleMetrics("relay")
    trust_store: TrustStore | None = None
    try:
        ledger = MeteredLedgerService(store, identity, config.ledger, metrics=metrics)
        trust_store = await trio.to_thread.run_sync(TrustStore, data_dir / "trust.sqlite3")
        trust = RelayTrust(ledger.ledger, identity, trust_store)
        trust.attach(ledger)
        async with open_relay_service(relay_p2p_config(config), identity, config.relay, bootstrap=bootstrap) as net:
            net.serve(LEDGER_PROTOCOL, ledger.handle)
            async with trio.open_nursery() as nursery:
                await nursery.start(ledger.run)
                relay = Relay(identity, net, ledger, store, metrics, "", time.time(), trust, SettlementGauges(metrics))
                await trust.publish()
                selfnet = SelfLedgerNetwork(CountedLookups(net, metrics), ledger, nursery)
                purse = CanaryPurse(selfnet, identity, ledger, config.ledger, budget=config.relay.canary_budget)
                relay.prober = RelayProber(selfnet, trust, probe_interval_s=config.relay.probe_interval_s,
                                           canary_interval_s=config.relay.canary_interval_s, meter=purse)
                await nursery.start(relay.prober.run)
                relay.status_url = await nursery.start(
                    partial(
                        serve_status, "relay", config.relay.status_host, config.relay.status_port,
                        status_json=relay.status, metrics=(metrics,), refresh=relay.refresh_metrics,
                    )
                )
                log.info("relay %s up: %s", short_id(relay.peer_id), ", ".join(relay.addrs))
                try:
                    yield relay
                finally:
                    nursery.cancel_scope.cancel()
                    with trio.move_on_after(2, shield=True):
                        await purse.aclose()
    finally:
        await trio.to_thread.run_sync(store.close)
        if trust_store is not None:
            await trio.to_thread.run_sync(trust_store.close)


class MeteredLedgerService(LedgerService):
    """The ledger service with each request counted in the relay's metrics: requests by kind
    (open_lane, submit_vouchers, ...) and outcome, refusals as errors by their exception's name."""

    def __init__(self, *args, metrics: RoleMetrics, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics

    async def _dispatch(self, request):
        from darkbloom.errors import LedgerError

        kind = _snake(type(request).__name__)
        try:
            reply = await super()._dispatch(request)
        except LedgerError as exc:
            self.metrics.request(kind, "error")
            self.metrics.error(type(exc).__name__)
            raise
        self.metrics.request(kind, "ok")
        return reply


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


class CountedLookups:
    """The relay's network with its own DHT lookups (the prober's) counted in the metrics."""

    def __init__(self, network: object, metrics: RoleMetrics) -> None:
        self._network, self._metrics = network, metrics

    def __getattr__(self, name: str) -> object:
        return getattr(self._network, name)

    async def find_providers(self, *args, **kwargs):
        return await self._counted("find_providers", self._network.find_providers(*args, **kwargs))  # type: ignore[attr-defined]

    async def get_record(self, *args, **kwargs):
        return await self._counted("get_record", self._network.get_record(*args, **kwargs))  # type: ignore[attr-defined]

    async def _counted(self, kind: str, lookup):
        from darkbloom.errors import P2PError

        try:
            found = await lookup
        except P2PError:
            self._metrics.dht(kind, "error")
            raise
        self._metrics.dht(kind, "ok" if found else "empty")
        return found


class SettlementGauges:
    """Settlement lag in the relay's Prometheus text: seconds since the last epoch closed
    (`darkbloom_settlement_lag_seconds`, since the relay started when none has), vouchers
    waiting for the next epoch, and the last settled epoch; and the circuits it forwards."""

    def __init__(self, metrics: RoleMetrics) -> None:
        from prometheus_client import Gauge

        self.lag = metrics.settlement_lag
        r = ("role",)
        self.pending = Gauge("darkbloom_ledger_pending_vouchers", "Vouchers waiting for the next settlement", r,
                             registry=metrics.registry).labels(metrics.role)
        self.epoch = Gauge("darkbloom_ledger_last_epoch", "Last settled epoch", r, registry=metrics.registry).labels(metrics.role)
        # The relay's own streams are direct (relayed_share stays 0); what it forwards for others:
        self.circuits_open = Gauge("darkbloom_relay_circuits_open", "Circuits forwarded through this relay now", r,
                                   registry=metrics.registry).labels(metrics.role)
        self.circuits_started = Gauge("darkbloom_relay_circuits_started", "Circuits forwarded since the relay started",
                                      r, registry=metrics.registry).labels(metrics.role)

    async def refresh(self, ledger: LedgerService, started_at: float) -> None:
        store = ledger.ledger.store
        summary = await ledger.ledger.call(store.summary, 0)
        pending = await ledger.ledger.call(store.pending_count)
        since = started_at if summary is None else summary.closed_ms / 1000
        self.lag.set(max(0.0, ledger.clock() - since))
        self.pending.set(pending)
        self.epoch.set(0 if summary is None else summary.epoch)
