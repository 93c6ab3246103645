"""Test fixtures: real libp2p swarms on 127.0.0.1 (`swarm(...)`) and a controllable clock.

`async with swarm(nodes=5, relays=1, clients=1) as s:` starts relays first, then nodes and
clients bootstrapped from them, each in its own cancel scope so a test can stop, restart or
add a member. Readiness comes from `nursery.start` and `wait_joins`, never from sleeps.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from darkbloom.config import P2PConfig
from darkbloom.identity import Identity
from darkbloom.p2p.network import LibP2PNetwork, Role, open_network

__all__ = ["Member", "OffsetClock", "Swarm", "loopback_config", "peer_ids", "swarm"]


class OffsetClock:
    """Wall time plus an offset a test moves forward: expiry without waiting."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def loopback_config(**changes: object) -> P2PConfig:
    """A P2PConfig for loopback tests: port 0, no bundled bootstrap, short lifetimes."""
    base = dict(
        listen_addrs=("/ip4/127.0.0.1/tcp/0",),
        use_bundled_bootstrap=False,
        reachability="public",
        record_ttl_s=60.0,
        announce_interval_s=30.0,
        providers_cache_s=0.0,
        dial_timeout_s=5.0,
        bootstrap_retry_max_s=1.0,
    )
    base.update(changes)
    return P2PConfig(**base)  # type: ignore[arg-type]


@dataclass
class Member:
    """One running network of the swarm; `stop()` and `start()` it again (same identity)."""

    role: Role
    identity: Identity
    config: P2PConfig
    clock: OffsetClock
    nursery: trio.Nursery
    net: LibP2PNetwork | None = None
    _scope: trio.CancelScope | None = None
    _done: trio.Event = field(default_factory=trio.Event)

    async def _run(self, *, task_status: trio.TaskStatus[LibP2PNetwork] = trio.TASK_STATUS_IGNORED) -> None:
        self._done = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                async with open_network(self.config, self.identity, role=self.role, clock=self.clock) as net:
                    self.net = net
                    task_status.started(net)
                    await trio.sleep_forever()
        finally:
            self._done.set()

    async def start(self) -> LibP2PNetwork:
        return await self.nursery.start(self._run)

    async def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            await self._done.wait()
        self.net = None

    @property
    def peer_id(self) -> str:
        assert self.net is not None
        return self.net.peer_id


@dataclass
class Swarm:
    relays: list[Member]
    nodes: list[Member]
    clients: list[Member]
    clock: OffsetClock
    nursery: trio.Nursery
    config: P2PConfig

    @property
    def bootstrap(self) -> tuple[str, ...]:
        return tuple(m.config.listen_addrs[0] + f"/p2p/{m.peer_id}" for m in self.relays)

    async def add(self, role: Role, **config_changes: object) -> Member:
        config = dataclasses.replace(self.config, bootstrap=self.bootstrap, **config_changes)  # type: ignore[arg-type]
        member = Member(role, Identity.generate(), config, self.clock, self.nursery)
        net = await member.start()
        if self.relays:
            await net.wait_joins(1)
        {"relay": self.relays, "node": self.nodes, "shim": self.clients}[role].append(member)
        return member

    async def restart_relay(self, index: int = 0, *, down_s: float = 0.0) -> LibP2PNetwork:
        """Stop the relay and start it again (same identity, same port) after `down_s`."""
        member = self.relays[index]
        await member.stop()
        await trio.sleep(down_s)  # the outage being simulated, not a synchronisation
        return await member.start()


@asynccontextmanager
async def swarm(
    nodes: int = 5,
    relays: int = 1,
    clients: int = 1,
    *,
    config: P2PConfig | None = None,
    node_config: dict[str, object] | None = None,
) -> AsyncIterator[Swarm]:
    """A running swarm; members bootstrap from the relays and have joined on entry."""
    config = config or loopback_config()
    clock = OffsetClock()
    async with trio.open_nursery() as nursery:
        s = Swarm([], [], [], clock, nursery, config)
        for _ in range(relays):
            member = Member("relay", Identity.generate(), config, clock, nursery)
            net = await member.start()
            # Pin the port so a restarted relay comes back where peers look for it.
            addr = net.listen_addrs[0]
            member.config = dataclasses.replace(config, listen_addrs=(addr[: addr.index("/p2p/")],))
            s.relays.append(member)
        async with trio.open_nursery() as starting:
            for _ in range(nodes):
                starting.start_soon(_add, s, "node", node_config or {})
            for _ in range(clients):
                starting.start_soon(_add, s, "shim", {})
        try:
            yield s
        finally:
            nursery.cancel_scope.cancel()


async def _add(s: Swarm, role: Role, changes: dict[str, object]) -> None:
    await s.add(role, **changes)


def peer_ids(members: Sequence[Member]) -> set[str]:
    return {m.peer_id for m in members}
