"""`darkbloom relay` as an operator runs it: the entry it prints is a working bootstrap-nodes.toml
line, its status and metrics answer, and Ctrl-C (SIGINT) or SIGTERM stops it with exit code 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from darkbloom.config import load_bootstrap_file
from darkbloom.relay.commands import bootstrap_entry

PEER = "12D3KooWMxvLcAHEQLH2ot8GVzv7Ywgxz7pXnxhFiXUWUQWn5jcn"


def test_entry_uses_announced_addresses_and_ends_each_in_the_peer_id(tmp_path):
    entry = bootstrap_entry(PEER, (f"/ip4/0.0.0.0/tcp/4001/p2p/{PEER}",), ("/dns4/relay.example.org/tcp/4001",))
    (tmp_path / "b.toml").write_text(f"relays = [\n  {entry}\n]\n")
    assert load_bootstrap_file(tmp_path / "b.toml") == (f"/dns4/relay.example.org/tcp/4001/p2p/{PEER}",)
    assert bootstrap_entry(PEER, (f"/ip4/10.0.0.2/tcp/4001/p2p/{PEER}",)) == \
        f'{{ name = "relay", addrs = ["/ip4/10.0.0.2/tcp/4001/p2p/{PEER}"] }},'


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_relay_prints_its_entry_serves_metrics_and_stops_on_a_signal(tmp_path, stop):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKBLOOM_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "darkbloom", "--data-dir", str(tmp_path / "relay"), "relay",
         "--listen", "/ip4/127.0.0.1/tcp/0", "--status-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True,
    )
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("status and metrics: "):
                break
        out = "".join(lines)
        assert "add this entry to the relays list in bootstrap-nodes.toml:" in out, out
        entry = next(line.strip() for line in lines if line.strip().startswith("{ name = "))
        assert "0.0.0.0" not in out  # listening on loopback: nothing to replace
        (tmp_path / "bootstrap-nodes.toml").write_text(f"relays = [\n  {entry}\n]\n")
        (addr,) = load_bootstrap_file(tmp_path / "bootstrap-nodes.toml")
        assert addr.startswith("/ip4/127.0.0.1/tcp/") and addr.split("/p2p/")[1] in lines[0]

        status_url = lines[-1].split(": ", 1)[1].strip()
        with urllib.request.urlopen(f"{status_url}/status.json", timeout=30) as r:
            status = json.load(r)
        assert status["role"] == "relay" and status["addrs"] == [addr]
        with urllib.request.urlopen(f"{status_url}/metrics", timeout=30) as r:
            metrics = r.read().decode()
        for family in ("darkbloom_peers", "darkbloom_settlement_lag_seconds", "darkbloom_relay_circuits_open",
                       "darkbloom_requests_total", "darkbloom_errors_total", "darkbloom_dht_lookups_total"):
            assert f"# TYPE {family.removesuffix('_total')}" in metrics, family
    finally:
        proc.send_signal(stop)
        try:
            code = proc.wait(timeout=10)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.stdout.close()  # type: ignore[union-attr]
    assert code == 0
