"""`darkbloom shim` as a user runs it: key management in-process, and the daemon as a real
subprocess joining a loopback network (relay + a node with a real engine started by the test)."""

from __future__ import annotations

import os
import sys

import openai
import trio

from darkbloom.cli import main

from .netharness import CHAT, network

TIMEOUT = 120
CANARY = "canary-51d0c0ffee-prompt"


def test_keys_create_list_revoke(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path), "shim", "keys", "create", "ci", "--rpm", "10", "--quota-tokens", "500"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    key_id = key.split("-")[1]
    assert key.startswith("dbk-") and "not shown again" in err
    assert main(["--data-dir", str(tmp_path), "shim", "keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and "active" in listing and "rpm=10" in listing and "quota=500" in listing
    assert key.split("-", 2)[2] not in listing  # the secret is never shown again
    assert main(["--data-dir", str(tmp_path), "shim", "keys", "revoke", key_id]) == 0
    assert main(["--data-dir", str(tmp_path), "shim", "keys", "revoke", key_id]) == 2
    assert "no active key" in capsys.readouterr().err
    assert main(["--data-dir", str(tmp_path), "shim", "keys", "list"]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["--data-dir", str(tmp_path), "shim", "keys", "create", "bad", "--rpm", "-1"]) == 2


async def test_shim_daemon_serves_the_network(tiny_model_dir, tmp_path):
    with trio.fail_after(TIMEOUT):
        async with network(tiny_model_dir, [{}]) as net:
            relay = net.swarm.bootstrap[0]
            env = {
                **os.environ,
                "DARKBLOOM_DATA_DIR": str(tmp_path),
                "DARKBLOOM_P2P_LISTEN_ADDRS": "/ip4/127.0.0.1/tcp/0",
                "DARKBLOOM_P2P_BOOTSTRAP": relay,
                "DARKBLOOM_P2P_USE_BUNDLED_BOOTSTRAP": "false",
            }
            log_file = open(tmp_path / "shim.log", "wb")  # noqa: SIM115 - closed below
            async with trio.open_nursery() as nursery:
                proc = await nursery.start(lambda task_status: trio.run_process(
                    [sys.executable, "-m", "darkbloom", "-v", "shim", "--port", "0"], env=env,
                    stdout=-1, stderr=log_file, check=False, task_status=task_status))
                try:
                    out = b""
                    while out.count(b"\n") < 2:  # the listening line, then the joined line
                        chunk = await proc.stdout.receive_some(4096)
                        assert chunk, f"darkbloom shim exited early: {out!r}"
                        out += chunk
                    listening, joined = out.decode().splitlines()[:2]
                    assert listening.startswith("darkbloom shim (local): OpenAI-compatible API at http://127.0.0.1:")
                    assert joined.startswith("darkbloom shim: joined the network as ")
                    url = listening.rsplit(" ", 1)[1]
                    async with openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0) as client:
                        r = await client.chat.completions.create(model=CHAT, max_tokens=3,
                                                                 messages=[{"role": "user", "content": CANARY}])
                        # a model outside the catalog is listed once the shim has met a provider
                        models = await client.models.list()
                    assert r.usage.completion_tokens <= 3 and r.system_fingerprint
                    assert CHAT in [m.id for m in models.data]
                    assert (tmp_path / "shim" / "identity.key").exists()
                finally:
                    proc.terminate()
            log_file.close()
    assert proc.returncode is not None
    # no prompt retention: not in the shim's debug log, not in any file of its data dir
    assert "routed to" in (tmp_path / "shim.log").read_text()  # the request was logged, by id
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
