"""Configuration: `darkbloom.toml` into frozen dataclasses, one per section; the only reader of files and env.

Precedence: defaults < file < `DARKBLOOM_<SECTION>_<KEY>` environment variables < CLI flags.
An unknown section or key, or a value of the wrong type, is a `ConfigError` naming the key
and where it came from. Nothing here runs at import time.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from darkbloom.errors import ConfigError

__all__ = [
    "ApiConfig",
    "Config",
    "InferenceConfig",
    "LedgerConfig",
    "ModelSpec",
    "NodeConfig",
    "P2PConfig",
    "RelayConfig",
    "default_data_dir",
    "load_config",
    "bundled_bootstrap_file",
    "load_bootstrap_file",
]

ENV_PREFIX = "DARKBLOOM_"
# Environment variables that are not config keys.
_ENV_NOT_KEYS = {"DARKBLOOM_CONFIG", "DARKBLOOM_DATA_DIR", "DARKBLOOM_LOG_LEVEL"}


@dataclass(frozen=True, slots=True, kw_only=True)
class P2PConfig:
    listen_addrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4001",)
    announce_addrs: tuple[str, ...] = ()  # addresses others should dial; empty: learned
    bootstrap: tuple[str, ...] = ()  # extra bootstrap multiaddrs (…/p2p/<id>)
    bootstrap_file: str = ""  # empty: the bootstrap-nodes.toml shipped with Darkbloom
    use_bundled_bootstrap: bool = True  # False: only `bootstrap` (tests, private networks)
    reachability: Literal["auto", "public", "private"] = "auto"
    quic: bool = False  # QUIC transport (experimental in py-libp2p 0.8.1)
    max_frame_bytes: int = 1 << 20
    record_ttl_s: float = 600.0  # capability record lifetime
    announce_interval_s: float = 120.0  # re-provide and re-put the record this often
    providers_cache_s: float = 5.0  # find_providers answers from cache this long, then asks the DHT
    dial_timeout_s: float = 10.0  # per connection attempt (direct or through a relay)
    hole_punch: bool = True  # after a relayed dial, try a direct upgrade (DCUtR)
    bootstrap_retry_max_s: float = 60.0  # backoff ceiling while no bootstrap peer answers
    max_streams_per_peer: int = 64
    max_record_bytes: int = 16384


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    id: str  # the id clients ask for
    path: str = ""  # an mlx-lm model directory; empty for bundled models
    kind: Literal["chat", "embedding"] = "chat"


@dataclass(frozen=True, slots=True, kw_only=True)
class InferenceConfig:
    models: tuple[ModelSpec, ...] = (ModelSpec(id="smollm2-135m-instruct"),)
    models_dir: str = ""  # where bundled models are prepared; empty: <cache>/darkbloom/models
    max_concurrent: int = 8  # decode slots in the batch
    max_queue: int = 64  # waiting requests before NoCapacity
    default_max_tokens: int = 512
    prefill_step_size: int = 512
    prompt_cache_mb: int = 256  # KV caches kept for prefix reuse, per model; counted against node.max_memory_mb
    openblas: bool = True  # Linux: load OpenBLAS before MLX when present
    native_jit: bool = True  # Linux: MLX builds its fused CPU kernels for this CPU (inference/cpujit.py)
    blas_threads: int = 0  # OpenBLAS threads (process-wide); 0: measured per step between 1 and the core count
    self_benchmark: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    price_input_per_m: int = 100_000  # micro-credits per 1M prompt tokens
    price_output_per_m: int = 400_000  # micro-credits per 1M completion tokens
    region: str = ""  # operator-declared, e.g. "eu-west"
    node_class: str = ""  # empty: derived from measured speed and uptime
    max_memory_mb: int = 0  # 0: no limit
    pause_on_battery: bool = True
    pause_when_user_active: bool = False
    user_idle_s: int = 300  # "active" means input within this many seconds
    pause_windows: tuple[str, ...] = ()  # "HH:MM-HH:MM" in local time
    status_host: str = "127.0.0.1"
    status_port: int = 8181
    grace_period_s: float = 20.0  # on SIGINT/SIGTERM, let in-flight work finish this long
    require_payment: bool = True  # refuse requests that bring no ledger lane (False: serve free too)
    max_requests_per_peer: int = 0  # one client's requests in progress at once; 0: half of slots + queue, at least 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    hosted: bool = False  # public listener with TLS and API keys
    tls_cert: str = ""
    tls_key: str = ""
    require_api_key: bool = False  # local mode: no key unless set
    max_body_bytes: int = 4 << 20
    first_token_timeout_s: float = 30.0
    request_timeout_s: float = 600.0
    max_attempts: int = 3  # peers tried before the first byte
    spot_check_probability: float = 0.0
    hedge: bool = False
    account: str = ""  # ledger account the local shim spends from; empty: its own key
    # Trust (darkbloom.api.trust): circuit breaker, spot-check policy, the relay's reputation table.
    breaker_failures: int = 3  # K failures inside the window open a peer's breaker
    breaker_window_s: float = 30.0
    breaker_cooldown_s: float = 5.0  # first cooldown; doubles per consecutive opening
    breaker_max_cooldown_s: float = 300.0
    spot_check_policy: str = ""  # overrides of the verdict policy, "key=value,..." (VerifyPolicy fields)
    spot_check_report: bool = True  # report flagged nodes to the relay's ledger with the signed evidence
    spot_check_accumulate: float = 1000.0  # flag a node when the product of its checks' e-values reaches this (0: off)
    reputation_refresh_s: float = 60.0  # fetch the relay's signed reputation table this often


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayConfig:
    listen_addrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4001",)
    status_host: str = "127.0.0.1"
    status_port: int = 8090
    max_reservations: int = 1024
    max_circuits_per_peer: int = 64
    circuit_duration_s: int = 6 * 3600
    circuit_max_bytes: int = 1 << 30
    probe_interval_s: float = 300.0  # status probes of connected nodes (uptime, class); 0: off
    canary_interval_s: float = 3600.0  # capability canaries (json/tools/logprobs) to nodes advertising them; 0: off
    canary_budget: int = 1_000_000  # micro-credits the relay's canary account is topped up to per epoch


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerConfig:
    url: str = ""  # empty: SQLite in the relay's data dir; or postgresql://...
    epoch_s: int = 600
    operator_share: float = 0.95
    voucher_every_tokens: int = 32
    voucher_timeout_s: float = 10.0  # a node ends a stream paused this long waiting for a voucher
    lane_reserve: int = 1_000_000  # micro-credits reserved when a lane opens
    lane_ttl_s: int = 24 * 3600
    ledger_peer: str = ""  # multiaddr of the ledger (a relay); empty: the first bootstrap relay


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    data_dir: str = ""
    log_level: str = "INFO"
    p2p: P2PConfig = field(default_factory=P2PConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    source: str = "defaults"  # the file it came from, for messages

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else default_data_dir()


_SECTIONS: dict[str, type] = {
    name: hint for name, hint in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(hint)
}


def default_data_dir() -> Path:
    return Path.home() / ".darkbloom"


def bundled_bootstrap_file() -> Path:
    """The bootstrap-nodes.toml that ships with the package (or the repo's top level)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "bootstrap-nodes.toml", here.parent / "bootstrap-nodes.toml"):
        if candidate.exists():
            return candidate
    return here / "bootstrap-nodes.toml"


def load_bootstrap_file(path: str | Path) -> tuple[str, ...]:
    """The relay multiaddrs listed in a bootstrap-nodes.toml (`relays = [{name, addrs}]`)."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("file not found", source=source, hint="check p2p.bootstrap_file") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", source=source) from None
    relays = raw.get("relays", [])
    if not isinstance(relays, list):
        raise ConfigError("must be a list of tables", key="relays", source=source)
    out: list[str] = []
    for i, entry in enumerate(relays):
        addrs = entry.get("addrs") if isinstance(entry, dict) else None
        if not isinstance(addrs, list) or not all(isinstance(a, str) and "/p2p/" in a for a in addrs):
            raise ConfigError("addrs must be a list of multiaddrs ending in /p2p/<peer-id>", key=f"relays[{i}]", source=source)
        out.extend(addrs)
    return tuple(out)


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config: defaults < file < env < overrides ("section.key" or "data_dir")."""
    env = dict(os.environ if env is None else env)
    if path is None and env.get("DARKBLOOM_CONFIG"):
        path = env["DARKBLOOM_CONFIG"]
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("file not found", source=source, hint="check --config, or drop it to use defaults") from None
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", source=source) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}", source=source, hint="fix the file's syntax") from None
    layers: list[tuple[str, dict[str, Any]]] = [(source, raw)]
    layers.append(("environment", _from_env(env)))
    layers.append(("command line", _nest(overrides or {})))
    merged: dict[str, Any] = {}
    for origin, layer in layers:
        _merge(merged, layer, origin)
    return _build(merged, source)


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if env.get("DARKBLOOM_DATA_DIR"):
        out["data_dir"] = env["DARKBLOOM_DATA_DIR"]
    if env.get("DARKBLOOM_LOG_LEVEL"):
        out["log_level"] = env["DARKBLOOM_LOG_LEVEL"]
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_KEYS:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            raise ConfigError(
                "unknown environment variable", key=name, source="environment",
                hint=f"sections are {', '.join(sorted(_SECTIONS))}; unset it",
            )
        key = rest[len(section) + 1 :]
        hint = _field_hint(_SECTIONS[section], key)
        if hint is None:
            raise ConfigError("unknown key", key=name, source="environment", hint="unset it")
        out.setdefault(section, {})[key] = _parse_env_value(value, hint, name)
    return out


def _parse_env_value(text: str, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return [part.strip() for part in text.split(",") if part.strip()]
    if hint is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected true or false, got {text!r}", key=name, source="environment")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"expected an integer, got {text!r}", key=name, source="environment") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"expected a number, got {text!r}", key=name, source="environment") from None
    return text


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if key:
            out.setdefault(section, {})[key] = value
        else:
            out[section] = value
    return out


def _merge(into: dict[str, Any], layer: dict[str, Any], origin: str) -> None:
    for key, value in layer.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError("must be a table", key=key, source=origin)
            section = into.setdefault(key, {})
            for sub, subvalue in value.items():
                section[sub] = (subvalue, origin)
        elif key in ("data_dir", "log_level"):
            into[key] = (value, origin)
        else:
            raise ConfigError(
                "unknown section or key", key=key, source=origin,
                hint=f"sections are {', '.join(sorted(_SECTIONS))}",
            )


def _field_hint(cls: type, key: str) -> Any:
    hints = typing.get_type_hints(cls)
    return hints.get(key)


def _build(merged: dict[str, Any], source: str) -> Config:
    top: dict[str, Any] = {"source": source}
    for key in ("data_dir", "log_level"):
        if key in merged:
            value, origin = merged[key]
            top[key] = _coerce(value, str, key, origin)
    for section, cls in _SECTIONS.items():
        if section not in merged:
            continue
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, (value, origin) in merged[section].items():
            if key not in hints:
                raise ConfigError(
                    "unknown key", key=f"{section}.{key}", source=origin,
                    hint=f"known keys: {', '.join(sorted(hints))}",
                )
            kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", origin)
        top[section] = cls(**kwargs)
    return Config(**top)


def _coerce(value: Any, hint: Any, key: str, origin: str) -> Any:
    """Check `value` against `hint`; return it in the dataclass's shape (tuples, nested specs)."""
    kind = typing.get_origin(hint)
    if kind is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"must be one of {', '.join(map(repr, allowed))}, got {value!r}", key=key, source=origin)
        return value
    if kind is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"must be a list, got {type(value).__name__}", key=key, source=origin)
        return tuple(_coerce(v, item, f"{key}[{i}]", origin) for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"must be a table, got {type(value).__name__}", key=key, source=origin)
        hints = typing.get_type_hints(hint)
        kwargs = {}
        for sub, subvalue in value.items():
            if sub not in hints:
                raise ConfigError("unknown key", key=f"{key}.{sub}", source=origin)
            kwargs[sub] = _coerce(subvalue, hints[sub], f"{key}.{sub}", origin)
        try:
            return hint(**kwargs)
        except TypeError:
            missing = [n for n in hints if n not in kwargs]
            raise ConfigError(f"missing {', '.join(missing)}", key=key, source=origin) from None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"must be a number, got {type(value).__name__}", key=key, source=origin)
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"must be an integer, got {type(value).__name__}", key=key, source=origin)
        return value
    if hint in (str, bool):
        if type(value) is not hint:
            raise ConfigError(f"must be a {hint.__name__}, got {type(value).__name__}", key=key, source=origin)
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in a dataclass above
