"""`darkbloom crawl --bootstrap ADDR`: walk the live DHT read-only and write JSON and GraphML.

    darkbloom crawl --bootstrap /ip4/1.2.3.4/tcp/4001/p2p/12D3KooW... --out crawl-out

Joins as a DHT client with a throwaway identity (it stores and announces nothing), walks every
DHT server by FIND_NODE (rate-limited, with timeouts), fetches capability records, finds the
providers of every model seen, and prints a summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from darkbloom.config import Config
from darkbloom.errors import ConfigError, P2PError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", action="append", required=True, metavar="ADDR",
                        help="a bootstrap peer's multiaddr with /p2p/<peer-id> (repeatable)")
    parser.add_argument("--out", default="crawl-out", metavar="DIR", help="where crawl.json and crawl.graphml go")
    parser.add_argument("--rate", type=float, default=20.0, metavar="PER_S", help="requests started per second at most")
    parser.add_argument("--concurrency", type=int, default=8, metavar="N", help="requests in flight at most")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="per request")
    parser.add_argument("--probes", type=int, default=8, metavar="N", help="FIND_NODE keys per peer (buckets covered)")
    parser.add_argument("--max-peers", type=int, default=100_000, metavar="N", help="stop learning peers beyond this")
    parser.add_argument("--join-timeout", type=float, default=30.0, metavar="SECONDS", help="wait this long for a bootstrap peer")


def run(args: argparse.Namespace, config: Config) -> int:
    import trio

    for name in ("rate", "timeout", "join_timeout"):
        if getattr(args, name) <= 0:
            raise ConfigError("must be positive", key=f"--{name.replace('_', '-')}", source="command line")
    for name in ("concurrency", "probes", "max_peers"):
        if getattr(args, name) < 1:
            raise ConfigError("must be at least 1", key=f"--{name.replace('_', '-')}", source="command line")
    bootstrap = [b.strip() for b in args.bootstrap]
    for addr in bootstrap:
        if "/p2p/" not in addr:
            raise ConfigError(f"{addr!r} names no peer", key="--bootstrap", source="command line",
                              hint="give /ip4/<ip>/tcp/<port>/p2p/<peer-id>")
    return trio.run(_crawl, args, config, bootstrap)


async def _crawl(args: argparse.Namespace, config: Config, bootstrap: list[str]) -> int:
    import networkx as nx
    import trio

    from darkbloom.identity import Identity
    from darkbloom.p2p.network import open_network
    from darkbloom.sim.crawl import crawl, row_dict, summarise_crawl, to_graph
    from darkbloom.sim.crawl_ports import LibP2PCrawlPort

    p2p = dataclasses.replace(config.p2p, listen_addrs=("/ip4/0.0.0.0/tcp/0",), bootstrap=tuple(bootstrap),
                              use_bundled_bootstrap=False)
    out = Path(args.out)
    async with open_network(p2p, Identity.generate(), role="shim") as net:
        with trio.move_on_after(args.join_timeout) as scope:
            await net.wait_joined()
        if scope.cancelled_caught:
            raise P2PError(f"no bootstrap peer answered within {args.join_timeout:.0f} s",
                           hint="check the address and that the peer is up")
        port = LibP2PCrawlPort(net)
        seeds = [(a.rsplit("/p2p/", 1)[1], (a,)) for a in bootstrap]

        def progress(done: int, known: int) -> None:
            print(f"\rcrawled {done} of {known} peers", end="", flush=True)

        result = await crawl(port, seeds, concurrency=args.concurrency, rate_per_s=args.rate, timeout_s=args.timeout,
                             probes_per_peer=args.probes, max_peers=args.max_peers, progress=progress)
        print()
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise_crawl(result)
    doc = {"summary": summary, "peers": [row_dict(r) for r in result.peers.values()]}
    (out / "crawl.json").write_text(json.dumps(doc, indent=2))
    nx.write_graphml(to_graph(result), out / "crawl.graphml")
    _print_summary(summary)
    print(f"wrote {out}/crawl.json and {out}/crawl.graphml")
    return 0


def _print_summary(s: dict) -> None:
    print(f"peers: {s['peers']} ({s['dht_servers_asked']} DHT servers asked, {s['reachable']} answered, "
          f"{s['reachable_share']:.0%} reachable)")
    print(f"relayed: {s['relayed']} ({s['relayed_share']:.0%}); with a valid record: {s['with_record']}")
    print("models: " + (", ".join(f"{m} x{n}" for m, n in s["models"].items()) or "none"))
    print("software versions: " + (", ".join(f"{v} x{n}" for v, n in s["software_versions"].items()) or "none"))
    print(f"routing-table edges: {s['routing_edges']}; requests {s['requests']}, failures {s['failures']}, "
          f"{s['elapsed_s']} s")
