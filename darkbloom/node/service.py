"""`darkbloom node install-service`: a systemd unit (Linux) or a launchd agent (macOS) for the node."""

from __future__ import annotations

import os
import plistlib
import shlex
import sys
from pathlib import Path

from darkbloom.errors import ConfigError

__all__ = ["default_service_path", "render_launchd", "render_systemd", "service_command", "write_service"]

LAUNCHD_LABEL = "net.darkbloom.node"


def service_command(*, config: str | None, data_dir: Path) -> list[str]:
    """The command line the service runs: this interpreter's darkbloom, absolute paths."""
    cmd = [sys.executable, "-m", "darkbloom", "node", "--data-dir", str(Path(data_dir).resolve())]
    if config:
        cmd += ["--config", str(Path(config).resolve())]
    return cmd


def render_systemd(cmd: list[str], *, user_unit: bool) -> str:
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


def write_service(system: str, *, config: str | None, data_dir: Path, path: Path | None = None) -> tuple[Path, str]:
    """Write the service file; returns its path and the command that enables it."""
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
        return path, f"launchctl load -w {shlex.quote(str(path))}"
    user_unit = "/systemd/user/" in str(path)
    path.write_text(render_systemd(cmd, user_unit=user_unit))
    scope = "--user " if user_unit else ""
    return path, f"systemctl {scope}daemon-reload && systemctl {scope}enable --now {path.stem}"
