"""Daemons fail in one line with exit code 2: a port in use, an unwritable data dir."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest


def run_cli(*args, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKBLOOM_")}
    return subprocess.run([sys.executable, "-m", "darkbloom", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_relay_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("--data-dir", str(tmp_path), "relay", "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--status-port", "0")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("darkbloom: error:") and "in use" in last, result.stderr
    assert "Traceback" not in result.stderr


def test_relay_status_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("--data-dir", str(tmp_path), "relay", "--listen", "/ip4/127.0.0.1/tcp/0", "--status-port", str(port))
    assert result.returncode == 2, result.stderr
    assert "in use" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_unwritable_data_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_cli("--data-dir", str(blocker / "relay"), "relay", "--listen", "/ip4/127.0.0.1/tcp/0", "--status-port", "0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot create data dir" in lines[0] and "--data-dir" in lines[0]


def test_node_status_without_a_node(tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    result = run_cli("node", "--status-port", str(port), "status")
    assert result.returncode == 2
    assert "no node answers" in result.stderr and "Traceback" not in result.stderr


def test_install_service_cli(tmp_path):
    out = tmp_path / "darkbloom-node.service"
    result = run_cli("--data-dir", str(tmp_path), "node", "install-service", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout and "systemctl" in result.stdout
    assert "ExecStart=" in out.read_text()


def test_up_names_the_busy_port_before_loading_anything(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("--data-dir", str(tmp_path), "up", "--port", str(port))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"darkbloom: error: port {port} (the OpenAI-compatible shim) is already in use")
    assert "--port 0" in line
    assert "loading" not in result.stdout and not (tmp_path / "up").exists()  # failed before starting any role


def test_up_port_check_covers_every_fixed_port():
    import dataclasses

    from darkbloom.config import Config
    from darkbloom.up import fixed_ports

    config = Config()
    assert [p for p, _ in fixed_ports(config)] == [8080, 8100, 8181, 8182]
    assert fixed_ports(dataclasses.replace(config, api=dataclasses.replace(config.api, port=0))) == []
