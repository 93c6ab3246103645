"""install-service writes a valid systemd unit or launchd plist that runs this node."""

from __future__ import annotations

import configparser
import plistlib
import sys

from darkbloom.node.service import write_service


def test_systemd_unit(tmp_path):
    path, enable = write_service("Linux", config="cfg.toml", data_dir=tmp_path / "data", path=tmp_path / "darkbloom-node.service")
    unit = configparser.ConfigParser(interpolation=None)
    unit.read(path)
    exec_start = unit["Service"]["ExecStart"]
    assert exec_start.startswith(sys.executable)
    assert "darkbloom node --data-dir" in exec_start and str((tmp_path / "data").resolve()) in exec_start
    assert "--config" in exec_start and exec_start.endswith("cfg.toml")
    assert unit["Service"]["Restart"] == "on-failure"
    assert "enable --now darkbloom-node" in enable


def test_launchd_plist(tmp_path):
    path, enable = write_service("Darwin", config=None, data_dir=tmp_path, path=tmp_path / "a.plist")
    plist = plistlib.loads(path.read_bytes())
    assert plist["Label"] == "net.darkbloom.node"
    assert plist["ProgramArguments"][:4] == [sys.executable, "-m", "darkbloom", "node"]
    assert plist["RunAtLoad"] is True
    assert enable.startswith("launchctl load -w")
