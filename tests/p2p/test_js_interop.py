"""Interoperability: a js-libp2p 2.x peer (npm) identifies, pings and finds providers against our nodes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from darkbloom.p2p.keys import model_cid
from darkbloom.p2p.testing import swarm

from .test_swarm import announce

JS = Path(__file__).resolve().parent / "js"


@pytest.fixture(scope="module")
def js_peer() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not npm or not node:
        pytest.skip("npm is not installed: the js-libp2p interop test needs Node.js and npm")
    if not (JS / "node_modules" / "libp2p").exists():
        # `make setup` runs this; do it here too so the test works from a fresh clone.
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, capture_output=True, timeout=300)
    return JS / "interop.mjs"


async def test_js_libp2p_identifies_pings_and_finds_providers(js_peer):
    with trio.fail_after(60):
        async with swarm(nodes=1, relays=1, clients=0) as s:
            node, relay = s.nodes[0], s.relays[0]
            await announce(node, "js-model")
            result = await trio.run_process(
                ["node", str(js_peer), node.net.listen_addrs[0], relay.net.listen_addrs[0], model_cid("js-model")],
                capture_stdout=True, capture_stderr=True, cwd=JS, check=False,
            )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    out = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert "error" not in out, out["error"]
    assert out["node_peer"] == node.peer_id
    assert out["encryption"] == "/noise" and out["multiplexer"] == "/yamux/1.0.0"
    protocols = set(out["identify"]["protocols"])
    assert {"/ipfs/id/1.0.0", "/ipfs/ping/1.0.0", "/ipfs/kad/1.0.0", "/darkbloom/status/1.0.0"} <= protocols
    assert out["ping_ms"] >= 0
    assert node.peer_id in out["providers"], out
