"""`darkbloom node` as a process: its start-up progress (model load and self-benchmark) on its
output, then serving, then a clean SIGINT exit."""

from __future__ import annotations

import re

import pytest

from .netproc import ProcNetwork, free_port
from .procs import Daemon, clean_env, write_config

pytestmark = pytest.mark.slow


def test_node_start_shows_load_and_self_benchmark_progress(tmp_path, tiny_model_dir):
    net = ProcNetwork(tmp_path, tiny_model_dir)
    try:
        net.start_relay()
        cfg = write_config(
            tmp_path / "node.toml",
            p2p={"use_bundled_bootstrap": False, "listen_addrs": [f"/ip4/127.0.0.1/tcp/{free_port()}"],
                 "bootstrap": [net.relay_addr]},
            inference={"self_benchmark": True},
            node={"status_port": 0, "grace_period_s": 1.0, "pause_on_battery": False},
            models=[{"id": "tiny-chat", "path": str(tiny_model_dir)}],
        )
        (tmp_path / "node").mkdir()
        node = Daemon("node", ["--config", str(cfg), "--data-dir", str(tmp_path / "node"), "node"],
                      env=clean_env(), log_dir=net.logs)
        net.nodes["node"] = node
        node.wait_for(r"^node \w+ serving tiny-chat")
        out = "".join(node.output)
        steps = [line for line in out.splitlines() if re.match(r"^(loading|self-benchmark)", line)]
        assert steps == ["loading tiny-chat ...", "loading tiny-chat: done (1/1)",
                         "self-benchmark ...", "self-benchmark: done (1/1)"], out
        assert re.search(r"self-benchmark of tiny-chat: prefill \d+ tok/s, decode [\d.]+ tok/s", out)
        code = node.interrupt()
        assert code == 0, "".join(node.output[-30:])
    finally:
        net.stop()
