"""A loopback Darkbloom network made of processes: a relay, nodes on the tiny test model, a shim.

Every role is `python -m darkbloom` with its own darkbloom.toml and data dir under `root`.
The relay listens on a fixed loopback port so that it can be killed and restarted where
its peers look for it. The shim's ledger account is funded before the relay starts.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from darkbloom.identity import load_or_create_identity
from darkbloom.ledger.store import open_store

from .procs import Daemon, clean_env, write_config

CHAT = "tiny-chat"
CREDITS = 100_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ProcNetwork:
    root: Path
    model_dir: Path
    relay: Daemon | None = None
    relay_addr: str = ""
    nodes: dict[str, Daemon] = field(default_factory=dict)
    node_status: dict[str, str] = field(default_factory=dict)  # name -> status page URL (latest start)
    node_ids: dict[str, str] = field(default_factory=dict)
    shim_log_flags: tuple[str, ...] = ("-v",)  # the chaos tests read the shim's debug log
    node_ports: dict[str, int] = field(default_factory=dict)
    shim: Daemon | None = None
    shim_url: str = ""

    @property
    def logs(self) -> Path:
        path = self.root / "logs"
        path.mkdir(exist_ok=True)
        return path

    def start_relay(self) -> None:
        port = free_port()
        data = self.root / "relay"
        data.mkdir(exist_ok=True)
        cfg = write_config(self.root / "relay.toml",
                           p2p={"use_bundled_bootstrap": False, "listen_addrs": [f"/ip4/127.0.0.1/tcp/{port}"]},
                           relay={"listen_addrs": [f"/ip4/127.0.0.1/tcp/{port}"], "status_port": 0},
                           ledger={"epoch_s": 3600})
        shim_identity = load_or_create_identity(self.root / "shim" / "shim")
        store = open_store("", data)
        try:
            store.deposit(shim_identity.public_key.hex(), CREDITS, now_ms=int(time.time() * 1000))
        finally:
            store.close()
        self.relay = Daemon("relay", ["--config", str(cfg), "--data-dir", str(data), "relay"],
                            env=clean_env(), log_dir=self.logs)
        self.wait_relay()

    def wait_relay(self) -> None:
        assert self.relay is not None
        self.relay_addr = self.relay.wait_for(r'addrs = \["(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)"').group(1)
        self.relay.wait_for(r"status and metrics")

    def node_config(self, name: str, *, reachability: str = "public", model_id: str = CHAT,
                    max_concurrent: int = 4, require_payment: bool = True, bootstrap_retry_max_s: float = 2.0,
                    p2p: dict[str, object] | None = None) -> Path:
        # A fixed port, as an operator's node has (p2p.listen_addrs defaults to tcp/4001): a restarted
        # node comes back where its record says it is.
        port = self.node_ports.setdefault(name, free_port())
        return write_config(
            self.root / f"{name}.toml",
            p2p={"use_bundled_bootstrap": False, "listen_addrs": [f"/ip4/127.0.0.1/tcp/{port}"],
                 "bootstrap": [self.relay_addr], "reachability": reachability, "record_ttl_s": 60.0,
                 "announce_interval_s": 20.0, "dial_timeout_s": 5.0, "bootstrap_retry_max_s": bootstrap_retry_max_s,
                 **(p2p or {})},
            inference={"self_benchmark": False, "max_concurrent": max_concurrent, "max_queue": 16},
            node={"status_port": 0, "grace_period_s": 1.0, "pause_on_battery": False,
                  "require_payment": require_payment},
            ledger={"epoch_s": 5},  # the node submits its vouchers this often (and on shutdown)
            models=[{"id": model_id, "path": str(self.model_dir)}],
        )

    def start_node(self, name: str, **kwargs: object) -> Daemon:
        cfg = self.node_config(name, **kwargs)  # type: ignore[arg-type]
        data = self.root / name
        data.mkdir(exist_ok=True)
        node = Daemon(name, [*(["-v"] if os.environ.get("CHAOS_VERBOSE") else []), "--config", str(cfg), "--data-dir", str(data), "node"], env=clean_env(), log_dir=self.logs)
        self.nodes[name] = node
        return node

    def wait_node(self, name: str) -> None:
        node = self.nodes[name]
        self.node_ids[name] = node.wait_for(r"^node (\w+) serving").group(1)
        self.node_status[name] = node.wait_for(r"status page: (http://\S+)").group(1)

    def restart_node(self, name: str) -> None:
        node = self.nodes[name]
        node.kill()
        node.start()

    def start_shim(self, p2p: dict[str, object] | None = None, **api: object) -> None:
        cfg = write_config(
            self.root / "shim.toml",
            p2p={"use_bundled_bootstrap": False, "listen_addrs": ["/ip4/127.0.0.1/tcp/0"],
                 "bootstrap": [self.relay_addr], "dial_timeout_s": 5.0, "bootstrap_retry_max_s": 2.0,
                 "providers_cache_s": 1.0, **(p2p or {})},
            api={"port": 0, "first_token_timeout_s": 10.0, "request_timeout_s": 60.0, **api},
        )
        self.shim = Daemon("shim", [*self.shim_log_flags, "--config", str(cfg), "--data-dir", str(self.root / "shim"), "shim"],
                           env=clean_env(), log_dir=self.logs)
        self.shim_url = self.shim.wait_for(r"OpenAI-compatible API at (http://\S+/v1)").group(1)
        self.shim.wait_for(r"joined the network")

    def settle(self) -> str:
        """`darkbloom ledger settle` on the relay's store (the relay stopped first)."""
        import subprocess
        import sys

        out = subprocess.run([sys.executable, "-m", "darkbloom", "--config", str(self.root / "relay.toml"),
                              "--data-dir", str(self.root / "relay"), "ledger", "settle"],
                             capture_output=True, text=True, env=clean_env(), timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def stop(self) -> None:
        for d in [self.shim, *self.nodes.values(), self.relay]:
            if d is not None:
                d.kill()


def count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text, flags=re.M))
