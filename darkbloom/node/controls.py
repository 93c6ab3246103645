"""Operator controls: when a node pauses (battery, user activity, time windows, memory).

The deciding function is pure (`decide`); the probes read the machine (Linux sysfs, macOS
`pmset` and `ioreg`) and return None where they cannot tell, which never pauses a node.
`Controls.run` polls the probes and holds the current decision for the serving code.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trio

from darkbloom.config import NodeConfig
from darkbloom.errors import ConfigError

__all__ = [
    "Controls",
    "Decision",
    "PauseWindow",
    "decide",
    "idle_seconds",
    "memory_mb",
    "on_battery",
    "parse_ioreg_idle",
    "parse_pause_windows",
    "parse_pmset",
    "sysfs_on_battery",
    "unsupported_controls",
]

log = logging.getLogger(__name__)

_WINDOW = re.compile(r"^\s*([01]\d|2[0-3]):([0-5]\d)\s*-\s*([01]\d|2[0-3]):([0-5]\d)\s*$")


@dataclass(frozen=True, slots=True)
class PauseWindow:
    """A daily local-time window; `end` before `start` wraps past midnight."""

    start: dt.time
    end: dt.time

    def contains(self, t: dt.time) -> bool:
        if self.start <= self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end


def parse_pause_windows(specs: tuple[str, ...]) -> tuple[PauseWindow, ...]:
    out = []
    for spec in specs:
        m = _WINDOW.match(spec)
        if not m:
            raise ConfigError(
                f"pause window {spec!r} is not HH:MM-HH:MM", key="node.pause_windows", hint='write e.g. "09:00-17:30"'
            )
        h1, m1, h2, m2 = map(int, m.groups())
        if (h1, m1) == (h2, m2):
            raise ConfigError(f"pause window {spec!r} is empty", key="node.pause_windows")
        out.append(PauseWindow(dt.time(h1, m1), dt.time(h2, m2)))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Decision:
    paused: bool
    reason: str = ""  # plain words for the operator's status page


def decide(
    *,
    config: NodeConfig,
    windows: tuple[PauseWindow, ...],
    local_time: dt.time,
    battery: bool | None,
    idle_s: float | None,
    rss_mb: float | None,
) -> Decision:
    """Whether the node should stop taking new requests now, and why. Pure."""
    for w in windows:
        if w.contains(local_time):
            return Decision(True, f"inside pause window {w.start:%H:%M}-{w.end:%H:%M}")
    if config.pause_on_battery and battery:
        return Decision(True, "running on battery power")
    if config.pause_when_user_active and idle_s is not None and idle_s < config.user_idle_s:
        return Decision(True, f"the user was active {int(idle_s)} s ago")
    if config.max_memory_mb and rss_mb is not None and rss_mb > config.max_memory_mb:
        return Decision(True, f"using {rss_mb:.0f} MB, above the {config.max_memory_mb} MB limit")
    return Decision(False)


# --- probes ------------------------------------------------------------------------


def parse_pmset(text: str) -> bool | None:
    """`pmset -g batt` output -> True on battery, False on AC, None when it does not say."""
    if "'Battery Power'" in text:
        return True
    if "'AC Power'" in text or "'UPS Power'" in text:
        return False
    return None


def parse_ioreg_idle(text: str) -> float | None:
    """`ioreg -c IOHIDSystem` output -> seconds since the last input event."""
    m = re.search(r'"HIDIdleTime"\s*=\s*(\d+)', text)
    return int(m.group(1)) / 1e9 if m else None


def sysfs_on_battery(root: Path = Path("/sys/class/power_supply")) -> bool | None:
    """Linux: True when a battery discharges and no mains supply is online; None with no battery."""
    if not root.is_dir():
        return None
    batteries, mains_online = [], False
    for supply in root.iterdir():
        try:
            kind = (supply / "type").read_text().strip()
            if kind == "Mains" and (supply / "online").read_text().strip() == "1":
                mains_online = True
            elif kind == "Battery":
                batteries.append((supply / "status").read_text().strip())
        except OSError:
            continue  # a supply without these attributes tells us nothing
    if not batteries:
        return None
    return not mains_online and any(s == "Discharging" for s in batteries)


def _command(args: list[str]) -> str | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None


def on_battery() -> bool | None:
    system = platform.system()
    if system == "Darwin":
        out = _command(["pmset", "-g", "batt"])
        return parse_pmset(out) if out else None
    if system == "Linux":
        return sysfs_on_battery()
    return None


def idle_seconds() -> float | None:
    """Seconds since the user's last input; only macOS can tell (HID idle time)."""
    if platform.system() == "Darwin":
        out = _command(["ioreg", "-c", "IOHIDSystem"])
        return parse_ioreg_idle(out) if out else None
    return None


def memory_mb() -> float | None:
    """This process's resident memory in MB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS (peak)
    return rss / 1e6 if platform.system() == "Darwin" else rss / 1e3


def unsupported_controls(config: NodeConfig, system: str) -> list[str]:
    """One line per configured control this system cannot honour (logged once at start; it stays off)."""
    out = []
    if config.pause_on_battery and system not in ("Darwin", "Linux"):
        out.append(f"node.pause_on_battery is off on {system}: only macOS (pmset) and Linux "
                   "(/sys/class/power_supply) report battery power")
    if config.pause_when_user_active and system != "Darwin":
        out.append(f"node.pause_when_user_active is off on {system}: only macOS reports the user's idle time "
                   "(ioreg HIDIdleTime)")
    return out


class Controls:
    """Polls the probes and keeps the current `Decision` for the node."""

    def __init__(self, config: NodeConfig, *, poll_s: float = 10.0) -> None:
        self.config = config
        self.windows = parse_pause_windows(config.pause_windows)
        self.poll_s = poll_s
        self.decision = Decision(False)
        self.changed = trio.Event()

    def check(self) -> Decision:
        decision = decide(
            config=self.config,
            windows=self.windows,
            local_time=dt.datetime.now().time(),
            battery=on_battery() if self.config.pause_on_battery else None,
            idle_s=idle_seconds() if self.config.pause_when_user_active else None,
            rss_mb=memory_mb() if self.config.max_memory_mb else None,
        )
        if decision != self.decision:
            if decision.paused:
                log.warning("pausing: %s", decision.reason)
            else:
                log.info("resuming: no pause condition holds")
            self.decision = decision
            self.changed.set()
            self.changed = trio.Event()
        return decision

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        for line in unsupported_controls(self.config, platform.system()):
            log.info("%s", line)
        await trio.to_thread.run_sync(self.check)
        task_status.started(self.decision)
        while True:
            await trio.sleep(self.poll_s)
            await trio.to_thread.run_sync(self.check)
