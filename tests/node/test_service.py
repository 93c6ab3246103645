"""install-service writes a valid systemd unit or launchd plist that runs this node."""

from __future__ import annotations

import configparser
import plistlib
import sys

from darkbloom.node.service import write_service


def test_systemd_unit(tmp_path):
    path, enable, _ = write_service("Linux", config="cfg.toml", data_dir=tmp_path / "data", path=tmp_path / "darkbloom-node.service")
    unit = configparser.ConfigParser(interpolation=None)
    unit.read(path)
    exec_start = unit["Service"]["ExecStart"]
    assert exec_start.startswith(sys.executable)
    assert "darkbloom node --data-dir" in exec_start and str((tmp_path / "data").resolve()) in exec_start
    assert "--config" in exec_start and exec_start.endswith("cfg.toml")
    assert unit["Service"]["Restart"] == "on-failure"
    assert "enable --now darkbloom-node" in enable


def test_launchd_plist(tmp_path):
    path, enable, user = write_service("Darwin", config=None, data_dir=tmp_path, path=tmp_path / "a.plist")
    assert user is None  # an agent runs as the user who loads it
    plist = plistlib.loads(path.read_bytes())
    assert plist["Label"] == "net.darkbloom.node"
    assert plist["ProgramArguments"][:4] == [sys.executable, "-m", "darkbloom", "node"]
    assert plist["RunAtLoad"] is True
    assert enable.startswith("launchctl load -w")


def test_systemd_unit_passes_systemd_analyze(tmp_path):
    import shutil
    import subprocess

    import pytest

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the unit is checked by parsing in test_systemd_unit)")
    for run_as in (None, "daemon"):  # as root, and as another account (with its User= line)
        path, _, user = write_service("Linux", config=None, data_dir=tmp_path / "data", path=tmp_path / "darkbloom-node.service",
                                      run_as=run_as)
        assert user == run_as or run_as is None
        result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "darkbloom-node.service" not in result.stderr, result.stderr  # no warnings about our unit


def test_a_unit_name_without_service_suffix_is_refused(tmp_path):
    import pytest

    from darkbloom.errors import ConfigError

    with pytest.raises(ConfigError, match=r"must end in \.service") as refused:
        write_service("Linux", config=None, data_dir=tmp_path, path=tmp_path / "darkbloom-node")
    assert "darkbloom-node.service" in refused.value.hint
    assert not (tmp_path / "darkbloom-node").exists()


def test_install_service_keeps_the_config_named_by_the_environment(tmp_path):
    import os
    import subprocess

    config = tmp_path / "darkbloom.toml"
    config.write_text("[node]\nregion = \"eu-west\"\n")
    out = tmp_path / "darkbloom-node.service"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKBLOOM_")} | {"DARKBLOOM_CONFIG": str(config)}
    result = subprocess.run([sys.executable, "-m", "darkbloom", "--data-dir", str(tmp_path), "node", "install-service",
                             "--output", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"--config {config.resolve()}" in out.read_text()


def test_other_systems_are_told_what_to_do(tmp_path):
    import pytest

    from darkbloom.errors import ConfigError

    with pytest.raises(ConfigError, match="not a Windows service") as refused:
        write_service("Windows", config=None, data_dir=tmp_path, path=tmp_path / "x.service")
    assert "darkbloom node" in refused.value.hint and not (tmp_path / "x.service").exists()


def _unit(path):
    unit = configparser.ConfigParser(interpolation=None)
    unit.read(path)
    return unit["Service"]


def test_a_system_unit_runs_as_the_data_directorys_owner_and_is_sandboxed(tmp_path, monkeypatch):
    import os
    import pwd

    import pytest

    if os.geteuid() != 0:
        pytest.skip("giving the data directory to another account needs root")
    monkeypatch.delenv("SUDO_USER", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "darkbloom-node.service"
    _, _, user = write_service("Linux", config=None, data_dir=data, path=out)
    assert user is None and "User" not in _unit(out)  # root's directory, nobody else named: root
    nobody = pwd.getpwnam("nobody")
    os.chown(data, nobody.pw_uid, nobody.pw_gid)
    _, _, user = write_service("Linux", config=None, data_dir=data, path=out)
    service = _unit(out)
    assert user == "nobody" and service["User"] == "nobody"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "full"
    _, _, user = write_service("Linux", config=None, data_dir=data, path=out, run_as="daemon")
    assert user == "daemon" and _unit(out)["User"] == "daemon"  # --user wins


def test_a_system_unit_under_sudo_runs_as_the_caller(tmp_path, monkeypatch):
    import os

    import pytest

    if os.geteuid() != 0:
        pytest.skip("the data directory must be root's for the sudo user to be the fallback")
    monkeypatch.setenv("SUDO_USER", "nobody")
    data = tmp_path / "data"
    data.mkdir()
    _, _, user = write_service("Linux", config=None, data_dir=data, path=tmp_path / "darkbloom-node.service")
    assert user == "nobody"


def test_a_per_user_unit_names_no_user(tmp_path):
    out = tmp_path / ".config" / "systemd" / "user" / "darkbloom-node.service"
    _, enable, user = write_service("Linux", config=None, data_dir=tmp_path, path=out, run_as="nobody")
    assert user is None and "User" not in _unit(out) and "--user" in enable


def test_install_service_says_who_the_node_runs_as(tmp_path):
    import os
    import subprocess

    out = tmp_path / "darkbloom-node.service"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKBLOOM_") and k != "SUDO_USER"}
    result = subprocess.run([sys.executable, "-m", "darkbloom", "--data-dir", str(tmp_path), "node", "install-service",
                             "--output", str(out), "--user", "nobody"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "the node runs as nobody" in result.stdout and _unit(out)["User"] == "nobody"
