"""Simulation scenarios: TOML files into frozen dataclasses, strictly (unknown keys are errors).

A scenario says who is on the network (size, NAT mix, regions, models), how the wire behaves
(`[links]`), how the DHT is tuned (`[dht]`, `[records]`), what users do (`[workload]`), how
nodes come and go (`[churn]`) and what happens when (`[[events]]`). Bundled scenarios live in
darkbloom/sim/scenarios/; `load_scenario("churn")` finds them by name.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from darkbloom.errors import ConfigError
from darkbloom.sim.dht import DhtParams
from darkbloom.sim.network import LinkParams

__all__ = [
    "BUNDLED_DIR",
    "Churn",
    "Event",
    "Population",
    "Records",
    "Scenario",
    "Workload",
    "bundled_scenarios",
    "load_scenario",
    "parse_scenario",
]

BUNDLED_DIR = Path(__file__).resolve().parent / "scenarios"

EventKind = Literal["leave_providers", "kill_relays", "partition", "heal", "flash_crowd"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Population:
    relays: int = 4  # public bootstrap relays (DHT servers, circuit relay hops)
    public: float = 0.4  # shares of the other nodes by NAT type (normalised)
    full_cone: float = 0.3
    symmetric: float = 0.3
    providers: float = 0.6  # share of non-relay nodes serving models
    shims: int = 20  # nodes that send all requests (developers' shims); 0: any node asks
    regions: dict[str, float] = field(default_factory=lambda: {"eu": 0.4, "us": 0.4, "asia": 0.2})
    models: dict[str, float] = field(default_factory=lambda: {"smollm2-135m-instruct": 0.7, "qwen2.5-7b-instruct": 0.3})


@dataclass(frozen=True, slots=True, kw_only=True)
class Records:
    record_ttl_s: float = 600.0  # capability record lifetime (darkbloom default)
    announce_interval_s: float = 120.0  # re-provide and re-sign this often
    refresh_interval_s: float = 0.0  # routing table refresh (self lookup) per node; 0: off
    reservation_refresh_s: float = 60.0  # a relayed node notices its relay died within this


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    lookup_rate_per_s: float = 1.0  # FIND_NODE of a random live DHT server's id
    request_rate_per_s: float = 0.5  # discovery + one inference exchange with a provider
    request_bytes: int = 2_000
    response_bytes: int = 20_000
    candidates: int = 4  # providers (with valid records) a shim picks from per request
    probe_interval_s: float = 30.0  # how often departed providers are looked for
    max_concurrent: int = 256  # workload tasks in flight at most


@dataclass(frozen=True, slots=True, kw_only=True)
class Churn:
    leave_per_s: float = 0.0  # nodes leaving silently per second (relays never)
    join_per_s: float = 0.0  # new nodes joining per second


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    at_s: float
    kind: EventKind
    count: int = 0  # leave_providers, kill_relays, flash_crowd (requests)
    regions: tuple[str, ...] = ()  # partition/heal: the two regions
    model: str = ""  # flash_crowd: the model everyone asks for (empty: the first)
    within_s: float = 10.0  # flash_crowd: requests spread over this long


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    name: str
    description: str = ""
    nodes: int = 1000
    seed: int = 1
    duration_s: float = 1800.0
    warmup_s: float = 60.0  # no measurements before this
    population: Population = field(default_factory=Population)
    links: LinkParams = field(default_factory=LinkParams)
    dht: DhtParams = field(default_factory=DhtParams)
    records: Records = field(default_factory=Records)
    workload: Workload = field(default_factory=Workload)
    churn: Churn = field(default_factory=Churn)
    events: tuple[Event, ...] = ()

    def with_overrides(self, *, nodes: int | None = None, seed: int | None = None, duration_s: float | None = None) -> Scenario:
        changes: dict[str, Any] = {}
        if nodes is not None:
            changes["nodes"] = nodes
        if seed is not None:
            changes["seed"] = seed
        if duration_s is not None:
            changes["duration_s"] = duration_s
        return dataclasses.replace(self, **changes)


def bundled_scenarios() -> list[str]:
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.toml"))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A bundled scenario by name, or a TOML file by path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = BUNDLED_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise ConfigError(
            f"no scenario {str(name_or_path)!r}", source="sim",
            hint=f"bundled scenarios: {', '.join(bundled_scenarios())}; or give a .toml path",
        )
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=str(path), hint="fix the file's syntax") from None
    raw.setdefault("name", path.stem)
    return parse_scenario(raw, source=str(path))


def parse_scenario(raw: dict[str, Any], *, source: str = "scenario") -> Scenario:
    data = dict(raw)
    links = data.pop("links", {})
    if isinstance(links, dict) and "region_ms" in links:
        links = dict(links)
        pairs = {}
        for name, ms in links.pop("region_ms").items():
            a, sep, b = name.partition("/")
            if not sep:
                raise ConfigError("region_ms keys are written 'a/b'", key=f"links.region_ms.{name}", source=source)
            pairs[(a, b)] = ms
        built_links = _build(LinkParams, links, "links", source)
        built_links = dataclasses.replace(built_links, region_ms=pairs)
    else:
        built_links = _build(LinkParams, links, "links", source)
    events = data.pop("events", [])
    if not isinstance(events, list):
        raise ConfigError("must be an array of tables ([[events]])", key="events", source=source)
    built_events = tuple(sorted((_build(Event, e, f"events[{i}]", source) for i, e in enumerate(events)), key=lambda e: e.at_s))
    scenario = _build(Scenario, data, "", source, nested={"links": built_links, "events": built_events})
    total = scenario.population.public + scenario.population.full_cone + scenario.population.symmetric
    if total <= 0:
        raise ConfigError("NAT shares must add up to more than 0", key="population", source=source)
    if scenario.nodes < scenario.population.relays + 2:
        raise ConfigError(f"needs at least {scenario.population.relays + 2} nodes", key="nodes", source=source)
    if scenario.population.relays < 1:
        raise ConfigError("needs at least one relay (the bootstrap)", key="population.relays", source=source)
    return scenario


def _build(cls: type, data: Any, where: str, source: str, nested: dict[str, Any] | None = None) -> Any:
    if not isinstance(data, dict):
        raise ConfigError("must be a table", key=where or "scenario", source=source)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = dict(nested or {})
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in hints or key in kwargs:
            raise ConfigError("unknown key", key=name, source=source, hint=f"known keys: {', '.join(sorted(hints))}")
        kwargs[key] = _coerce(value, hints[key], name, source)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"incomplete: {exc}", key=where or "scenario", source=source) from None


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, source)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"must be one of {', '.join(map(repr, typing.get_args(hint)))}", key=key, source=source)
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError("must be a list", key=key, source=source)
        return tuple(_coerce(v, typing.get_args(hint)[0], key, source) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError("must be a table", key=key, source=source)
        return {str(k): _coerce(v, typing.get_args(hint)[1], f"{key}.{k}", source) for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError("must be a number", key=key, source=source)
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError("must be an integer", key=key, source=source)
        return value
    if hint in (str, bool):
        if type(value) is not hint:
            raise ConfigError(f"must be a {hint.__name__}", key=key, source=source)
        return value
    return value
