"""`darkbloom node install-service`: a systemd unit (Linux) or a launchd agent (macOS) for the node."""

from __future__ import annotations

import os
import plistlib
import shlex
import sys
from pathlib import Path

from darkbloom.errors import ConfigError

__all__ = ["default_service_path", "is_system_unit", "render_launchd", "render_systemd", "service_command", "service_user", "write_service"]

LAUNCHD_LABEL = "net.darkbloom.node"


def service_command(*, config: str | None, data_dir: Path) -> list[str]:
    """The command line the service runs: this interpreter's darkbloom, absolute paths."""
    cmd = [sys.executable, "-m", "darkbloom", "node", "--data-dir", str(Path(data_dir).resolve())]
    if config:
        cmd += ["--config", str(Path(config).resolve())]
    return cmd


def render_systemd(cmd: list[str], *, user_unit: bool, run_as: str | None = None) -> str:
    """A unit for `cmd`. A system unit runs as `run_as` (None: root) and gets the sandboxing that
    costs the node nothing: no privilege gain, a private /tmp, /usr /boot /etc read-only."""
    system = [] if user_unit else [
        *([f"User={run_as}"] if run_as else []),
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectSystem=full",
    ]
    lines = [
        "[Unit]",
        "Description=Darkbloom inference node",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={shlex.join(cmd)}",
        "Restart=on-failure",
        "RestartSec=5",
        # SIGTERM starts the graceful shutdown; give it the grace period and some.
        "KillSignal=SIGTERM",
        "TimeoutStopSec=60",
        "Environment=HF_HUB_OFFLINE=1",
        *system,
        "",
        "[Install]",
        f"WantedBy={'default.target' if user_unit else 'multi-user.target'}",
        "",
    ]
    return "\n".join(lines)


def render_launchd(cmd: list[str], *, log_dir: Path) -> bytes:
    return plistlib.dumps(
        {
            "Label": LAUNCHD_LABEL,
            "ProgramArguments": cmd,
            "RunAtLoad": True,
            "KeepAlive": {"SuccessfulExit": False},
            "EnvironmentVariables": {"HF_HUB_OFFLINE": "1"},
            "StandardOutPath": str(log_dir / "node.out.log"),
            "StandardErrorPath": str(log_dir / "node.err.log"),
            "ProcessType": "Background",
            "LowPriorityIO": True,
        }
    )


def default_service_path(system: str) -> Path:
    home = Path.home()
    if system == "Darwin":
        return home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    if os.geteuid() == 0:
        return Path("/etc/systemd/system/darkbloom-node.service")
    return home / ".config" / "systemd" / "user" / "darkbloom-node.service"


def is_system_unit(path: Path) -> bool:
    """A systemd unit for the whole system (not a per-user unit, not a launchd agent)."""
    return path.suffix == ".service" and "/systemd/user/" not in str(path)


def service_user(data_dir: Path, explicit: str | None = None) -> str | None:
    """Who a system unit runs the node as: `explicit`, else the data directory's owner when that is
    not root, else the user who ran sudo; None means root."""
    if explicit:
        return explicit
    try:
        import pwd

        owner = pwd.getpwuid(Path(data_dir).stat().st_uid).pw_name
    except (OSError, KeyError, ImportError):
        owner = None
    if owner and owner != "root":
        return owner
    sudo_user = os.environ.get("SUDO_USER")
    return sudo_user if sudo_user and sudo_user != "root" else None


def write_service(system: str, *, config: str | None, data_dir: Path, path: Path | None = None,
                  run_as: str | None = None) -> tuple[Path, str, str | None]:
    """Write the service file; returns its path, the command that enables it, and the user a system
    unit runs as (None for root, and for per-user units and launchd agents, which run as their owner)."""
    if system not in ("Darwin", "Linux"):
        raise ConfigError(f"install-service writes a launchd agent (macOS) or a systemd unit (Linux), not a {system} "
                          "service", hint="run `darkbloom node` under your system's own service manager")
    cmd = service_command(config=config, data_dir=data_dir)
    path = path or default_service_path(system)
    if system != "Darwin" and path.suffix != ".service":
        raise ConfigError(f"a systemd unit's file name must end in .service, not {path.name!r}",
                          hint=f"use --output {path.with_name(path.name + '.service')}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if system == "Darwin":
        path.write_bytes(render_launchd(cmd, log_dir=Path(data_dir).resolve()))
        return path, f"launchctl load -w {shlex.quote(str(path))}", None
    user_unit = not is_system_unit(path)
    user = None if user_unit else service_user(data_dir, run_as)
    path.write_text(render_systemd(cmd, user_unit=user_unit, run_as=user))
    scope = "--user " if user_unit else ""
    return path, f"systemctl {scope}daemon-reload && systemctl {scope}enable --now {path.stem}", user
