"""Real NAT: network namespaces, veth pairs and masquerading routers; a home node served through the relay.

Topology (10.213.x.x exists only inside the namespaces this test creates):

    dbpub   (bridge dbbr0 10.213.0.1/24): relay :4001, public node 10.213.0.1:4002
      |-- dbr1 router 10.213.0.11 | MASQUERADE | 10.213.1.1 -- dbh1 home node 10.213.1.2
      `-- dbr2 router 10.213.0.12 | MASQUERADE | 10.213.2.1 -- dbh2 client    10.213.2.2

The home node is reachable only through the relay; the client in the other home finds it in
the DHT, streams tokens from it through the circuit, and the hole punch outcome is reported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
PREFIX = f"db{os.getpid() % 10000}"  # interface names (15 characters at most), inside our namespaces
NS_PREFIX = f"dbnat-{os.getpid()}-"  # namespace names carry the whole pid of the run that made them
PUB, R1, R2, H1, H2 = (f"{NS_PREFIX}{n}" for n in ("pub", "r1", "r2", "h1", "h2"))
NAMESPACES = (PUB, R1, R2, H1, H2)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def ns(name: str, *args: str) -> None:
    sh("ip", "netns", "exec", name, *args)


def build_topology() -> None:
    for n in NAMESPACES:
        sh("ip", "netns", "add", n)
        ns(n, "ip", "link", "set", "lo", "up")
    ns(PUB, "ip", "link", "add", "dbbr0", "type", "bridge")
    ns(PUB, "ip", "addr", "add", "10.213.0.1/24", "dev", "dbbr0")
    ns(PUB, "ip", "link", "set", "dbbr0", "up")
    for i, (router, home) in enumerate(((R1, H1), (R2, H2)), start=1):
        # router <-> public bridge
        sh("ip", "link", "add", f"{PREFIX}a{i}", "netns", router, "type", "veth", "peer", "name", f"{PREFIX}b{i}", "netns", PUB)
        ns(PUB, "ip", "link", "set", f"{PREFIX}b{i}", "master", "dbbr0")
        ns(PUB, "ip", "link", "set", f"{PREFIX}b{i}", "up")
        ns(router, "ip", "addr", "add", f"10.213.0.{10 + i}/24", "dev", f"{PREFIX}a{i}")
        ns(router, "ip", "link", "set", f"{PREFIX}a{i}", "up")
        # home <-> router
        sh("ip", "link", "add", f"{PREFIX}c{i}", "netns", router, "type", "veth", "peer", "name", f"{PREFIX}d{i}", "netns", home)
        ns(router, "ip", "addr", "add", f"10.213.{i}.1/24", "dev", f"{PREFIX}c{i}")
        ns(router, "ip", "link", "set", f"{PREFIX}c{i}", "up")
        ns(home, "ip", "addr", "add", f"10.213.{i}.2/24", "dev", f"{PREFIX}d{i}")
        ns(home, "ip", "link", "set", f"{PREFIX}d{i}", "up")
        ns(home, "ip", "route", "add", "default", "via", f"10.213.{i}.1")
        ns(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        ns(router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", f"{PREFIX}a{i}", "-j", "MASQUERADE")
        # a home router drops unsolicited inbound connections
        ns(router, "iptables", "-A", "FORWARD", "-i", f"{PREFIX}a{i}", "-m", "state", "--state", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        ns(router, "iptables", "-A", "FORWARD", "-i", f"{PREFIX}a{i}", "-j", "DROP")


def teardown_topology() -> None:
    for n in NAMESPACES:
        subprocess.run(["ip", "netns", "del", n], capture_output=True)


@pytest.fixture
def topology():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iptables"):
        pytest.skip("needs root, iproute2 and iptables to build network namespaces")
    try:
        build_topology()
    except (subprocess.CalledProcessError, OSError) as exc:
        teardown_topology()
        reason = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        pytest.skip(f"cannot create network namespaces here: {reason}")
    try:
        yield
    finally:
        teardown_topology()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert NS_PREFIX not in left, "namespaces left behind"


class Peer:
    """A nat_peer process inside a namespace; JSON events from its stdout."""

    def __init__(self, process: trio.Process, name: str) -> None:
        self.process = process
        self.name = name
        self._buf = b""

    async def event(self, kind: str) -> dict:
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if msg.get("event") == kind:
                    return msg
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                raise AssertionError(f"{self.name} exited before {kind!r} (code {self.process.poll()})")
            self._buf += chunk


async def spawn(namespace: str, log_dir: Path, name: str, *args: str) -> Peer:
    cmd = ["ip", "netns", "exec", namespace, str(ROOT / ".venv/bin/python"), "-m", "tests.p2p.nat_peer", *args]
    with open(log_dir / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
        process = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
    return Peer(process, name)


async def test_home_node_reached_through_relay_from_another_home(topology, tmp_path, record_property):
    peers: list[Peer] = []
    try:
        with trio.fail_after(90):
            relay = await spawn(PUB, tmp_path, "relay", "relay", "--listen", "/ip4/10.213.0.1/tcp/4001")
            peers.append(relay)
            ready = await relay.event("ready")
            boot = f"/ip4/10.213.0.1/tcp/4001/p2p/{ready['peer_id']}"
            public = await spawn(PUB, tmp_path, "public", "node", "--listen", "/ip4/10.213.0.1/tcp/4002",
                                 "--bootstrap", boot, "--model", "nat-public")
            home = await spawn(H1, tmp_path, "home", "node", "--listen", "/ip4/10.213.1.2/tcp/4001",
                               "--bootstrap", boot, "--model", "nat-model")
            peers += [public, home]
            pub_ann = await public.event("announced")
            home_ann = await home.event("announced")
            assert pub_ann["reachability"] == "public"  # dial-back reached it
            assert home_ann["reachability"] == "relayed"  # dial-back could not: behind the NAT
            assert all("/p2p-circuit/" in a for a in home_ann["addrs"])
            # The home node is not reachable directly from the public segment.
            probe = subprocess.run(
                ["ip", "netns", "exec", PUB, sys.executable, "-c",
                 "import socket; s=socket.socket(); s.settimeout(1.5)\n"
                 "try:\n s.connect(('10.213.1.2', 4001)); print('open')\nexcept OSError: print('closed')"],
                capture_output=True, text=True)
            assert probe.stdout.strip() == "closed"
            client = await spawn(H2, tmp_path, "client", "client", "--listen", "/ip4/10.213.2.2/tcp/4001",
                                 "--bootstrap", boot, "--model", "nat-model", "--count", "200")
            peers.append(client)
            result = await client.event("result")
        assert result["ok"], result
        assert result["route"] == "relayed"
        assert result["record_reachability"] == "relayed"
        assert result["tokens"] == 200
        record_property("hole_punch", result["hole_punch"])
        print(f"hole punch outcome: {result['hole_punch']!r} (the relayed path carried the stream)")
    finally:
        for peer in peers:
            if peer.process.returncode is None:
                peer.process.kill()
        with trio.move_on_after(5, shield=True):
            for peer in peers:
                await peer.process.wait()
