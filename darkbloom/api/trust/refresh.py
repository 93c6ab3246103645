"""Keeping the relay's reputation table fresh in the shim and the node, and building the shim's trust layer from its config.

`run_table_refresh(connect, ledger_key, on_table, interval_s=...)` asks the ledger every
`interval_s` (and at start) for its signed table; a table that does not verify is dropped
with a warning, an unreachable ledger is retried with backoff. The shim passes
`TrustedRouting.apply_table`, the node its own "reputation from the table" setter.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import trio

from darkbloom.errors import DarkbloomError
from darkbloom.ledger.service import LedgerStream
from darkbloom.ledger.trustclient import TrustClient
from darkbloom.wire.trust import ReputationEntry, ReputationTable

__all__ = ["apply_to_backend", "entry_for", "parse_policy_overrides", "routing_from_config", "run_shim_reputation", "run_table_refresh"]

log = logging.getLogger(__name__)


def entry_for(table: ReputationTable | None, node_key: str) -> ReputationEntry | None:
    """The table's entry for `node_key` (hex public key), or None."""
    if table is None:
        return None
    return next((e for e in table.entries if e.node == node_key), None)


async def run_table_refresh(
    connect: Callable[[], Awaitable[LedgerStream]],
    ledger_key: str,
    on_table: Callable[[ReputationTable], object],
    *,
    interval_s: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Fetch the table now and every `interval_s`; `on_table(table)` for each verified one."""
    task_status.started()
    backoff = 1.0
    while True:
        try:
            stream = await connect()
            client = TrustClient(stream, ledger_key=ledger_key)
            try:
                table = await client.reputation()
            finally:
                with trio.move_on_after(1, shield=True):
                    await client.close()
            if table is not None:
                on_table(table)
            backoff = 1.0
            await trio.sleep(interval_s)
        except (DarkbloomError, OSError) as exc:  # unreachable ledger or a bad table: keep the last one, retry later
            log.warning("reputation table not refreshed (%s); retrying in %.0fs", exc, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, max(interval_s, 1.0))


def parse_policy_overrides(text: str, base: object) -> object:
    """`base` (a frozen policy dataclass) with "key=value,..." overrides applied; a ConfigError names a bad key."""
    import dataclasses

    from darkbloom.errors import ConfigError

    changes: dict[str, object] = {}
    fields = {f.name: f for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ConfigError(f"unknown spot-check policy key {key!r}", key="api.spot_check_policy",
                              hint=f"known keys: {', '.join(sorted(fields))}")
        current = getattr(base, key)
        try:
            if isinstance(current, tuple):  # one number (bet_fractions, accumulate_stops): a 1-tuple
                changes[key] = (float(value),)
            else:
                changes[key] = int(value) if isinstance(current, int) and not isinstance(current, bool) else float(value)
        except ValueError:
            raise ConfigError(f"{key} needs a number, got {value.strip()!r}", key="api.spot_check_policy") from None
    return dataclasses.replace(base, **changes)  # type: ignore[type-var]


def routing_from_config(api: object) -> object:
    """The shim's TrustedRouting from its [api] section: hedging, attempts, spot-check probability
    and policy overrides, breaker K / window / cooldowns."""
    import dataclasses

    from darkbloom.api.trust.breaker import BreakerPolicy
    from darkbloom.api.trust.hedge import HedgePolicy
    from darkbloom.api.trust.reputation_mix import TrustBook
    from darkbloom.api.trust.routing import TrustedRouting
    from darkbloom.api.trust.verify import DEFAULT_POLICIES, DEFAULT_POLICY

    a: ApiLike = api  # type: ignore[assignment]
    breaker = BreakerPolicy(failures=a.breaker_failures, window_s=a.breaker_window_s,
                            base_cooldown_s=a.breaker_cooldown_s, max_cooldown_s=a.breaker_max_cooldown_s)
    policies, verify_policy = DEFAULT_POLICIES, DEFAULT_POLICY
    if a.spot_check_policy:
        verify_policy = parse_policy_overrides(a.spot_check_policy, DEFAULT_POLICY)  # type: ignore[assignment]
        policies = dataclasses.replace(DEFAULT_POLICIES, **{  # every regime's policy gets the same overrides
            name: parse_policy_overrides(a.spot_check_policy, getattr(DEFAULT_POLICIES, name)) for name in ("greedy", "low", "high")})
    book = TrustBook(breaker_policy=breaker)
    accumulate = getattr(a, "spot_check_accumulate", 1000.0)
    book.evidence.threshold = math.log(accumulate) if accumulate > 1.0 else math.inf  # 0 (or <= 1): off
    return TrustedRouting(book=book, hedge=HedgePolicy(enabled=a.hedge),
                          max_attempts=a.max_attempts, spot_check_probability=a.spot_check_probability,
                          verify_policy=verify_policy, policies=policies)  # type: ignore[arg-type]


class ApiLike:  # the [api] fields routing_from_config reads (darkbloom.config.ApiConfig)
    hedge: bool
    max_attempts: int
    spot_check_probability: float
    spot_check_policy: str
    spot_check_accumulate: float
    breaker_failures: int
    breaker_window_s: float
    breaker_cooldown_s: float
    breaker_max_cooldown_s: float


def apply_to_backend(backend: object, table: ReputationTable, now: float) -> None:
    """Hand a verified table to the shim's routing: the trust layer's mix when it has one, else
    the plain router's per-peer reputation."""
    from darkbloom.p2p.keys import peer_id_from_public_key

    trust = getattr(backend, "trust", None)
    if trust is not None:
        trust.apply_table(table, now)
        return
    for e in table.entries:
        try:
            pid = peer_id_from_public_key(bytes.fromhex(e.node))
        except ValueError:
            continue
        backend._stats(pid).reputation = e.score_ppm / 1_000_000  # type: ignore[attr-defined]


async def run_shim_reputation(backend: object, network: object, ledger: tuple[str, tuple[str, ...]], *, interval_s: float,
                              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The shim's refresher: the table of the ledger at `ledger` (peer id, addrs) into `backend`."""
    from darkbloom.p2p.keys import public_key_from_peer_id
    from darkbloom.wire.ledger import LEDGER_PROTOCOL

    peer, addrs = ledger

    async def connect() -> LedgerStream:
        return await network.open_stream(peer, LEDGER_PROTOCOL, addrs=addrs)  # type: ignore[attr-defined]

    await run_table_refresh(connect, public_key_from_peer_id(peer).hex(),
                            lambda table: apply_to_backend(backend, table, trio.current_time()),
                            interval_s=interval_s, task_status=task_status)
