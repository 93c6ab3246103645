"""`darkbloom relay`: run a bootstrap relay (DHT server, circuit relay hop, ledger service)."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "bootstrap_entry", "run"]


def _unspecified(addr: str) -> bool:
    return addr.startswith(("/ip4/0.0.0.0/", "/ip6/::/"))


def bootstrap_entry(peer_id: str, addrs: tuple[str, ...], announce: tuple[str, ...] = (), name: str = "relay") -> str:
    """The TOML line for bootstrap-nodes.toml: the announced addresses when set, else the listening ones,
    each ending in /p2p/<peer id>."""
    suffix = f"/p2p/{peer_id}"
    full = [a if a.endswith(suffix) else a + suffix for a in (announce or addrs)]
    listed = ", ".join(f'"{a}"' for a in full)
    return f'{{ name = "{name}", addrs = [{listed}] }},'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", action="append", dest="cfg__relay__listen_addrs", metavar="MULTIADDR",
                        help="address to listen on (repeatable), default /ip4/0.0.0.0/tcp/4001")
    parser.add_argument("--status-port", type=int, dest="cfg__relay__status_port", metavar="PORT", help="status/metrics HTTP port")
    parser.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                        help="other relays to join (repeatable)")


def run(args: argparse.Namespace, config) -> int:
    import trio

    return trio.run(_run_relay, config, tuple(args.bootstrap))


async def _run_relay(config, bootstrap: tuple[str, ...]) -> int:
    from darkbloom.relay.daemon import open_relay
    from darkbloom.runner import run_until_signal

    async def body(stop):
        async with open_relay(config, bootstrap=bootstrap) as relay:
            print(f"relay {relay.peer_id} listening", flush=True)
            print("add this entry to the relays list in bootstrap-nodes.toml:", flush=True)
            print(f"  {bootstrap_entry(relay.peer_id, relay.addrs, config.p2p.announce_addrs)}", flush=True)
            if any(_unspecified(a) for a in (config.p2p.announce_addrs or relay.addrs)):
                print("  (0.0.0.0 / :: means every interface here, which nobody else can dial: replace it with this "
                      "machine's public IP or DNS name, or set [p2p] announce_addrs)", flush=True)
            print(f"ledger key {relay.ledger_key}", flush=True)
            print(f"status and metrics: {relay.status_url}", flush=True)
            await stop.wait()

    return await run_until_signal(body)
