"""The `darkbloom` command: version, help, unbuilt commands, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from darkbloom import __version__
from darkbloom.cli import SUBCOMMANDS, build_parser, main


def run_cli(*args, env_extra=None, cwd=None):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKBLOOM_")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "darkbloom", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def test_version_through_python_m():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"darkbloom {__version__}"


def test_every_design_subcommand_is_registered():
    assert set(SUBCOMMANDS) == {"up", "node", "relay", "shim", "ledger", "models", "crawl", "sim"}
    help_text = build_parser().format_help()
    for name in SUBCOMMANDS:
        assert name in help_text


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: darkbloom" in capsys.readouterr().out


def test_bad_config_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "darkbloom.toml"
    bad.write_text("[api]\nport = 'x'\n")
    result = run_cli("--config", str(bad), "up")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(bad) in lines[0] and "api.port" in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_config_with_verbose_shows_traceback(tmp_path):
    bad = tmp_path / "darkbloom.toml"
    bad.write_text("[nope]\n")
    result = run_cli("-v", "--config", str(bad), "up")
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert "nope: unknown section" in result.stderr.splitlines()[-1]


def test_missing_config_file_one_line(tmp_path):
    result = run_cli("--config", str(tmp_path / "absent.toml"), "up")
    assert result.returncode == 2
    assert "file not found" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bad_env_is_one_line():
    result = run_cli("up", env_extra={"DARKBLOOM_API_PORT": "many"})
    assert result.returncode == 2
    assert "DARKBLOOM_API_PORT" in result.stderr and "Traceback" not in result.stderr
