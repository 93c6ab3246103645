"""`darkbloom sim SCENARIO` and `darkbloom sim report`: run simulations, write CSV, JSON and plots.

    darkbloom sim churn --nodes 500 --seed 2 --out sim-out/churn
    darkbloom sim report --out sim-report [--sizes 100,1000,10000] [--scenario-nodes 500] [--routing-table kademlia,py-libp2p-0.8.1]
    darkbloom sim real --nodes 50 --requests 10
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from darkbloom.config import Config
from darkbloom.errors import ConfigError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", metavar="SCENARIO",
                        help="a bundled scenario (baseline, churn, relay_failure, flash_crowd, regional_split), "
                             "a scenario .toml file, 'report' for the whole research report, or 'real' to compare "
                             "the simulator with up to 50 real libp2p hosts on 127.0.0.1")
    parser.add_argument("--out", metavar="DIR", help="where CSV, JSON and PNG go (default: sim-out/<scenario>)")
    parser.add_argument("--nodes", type=int, metavar="N", help="network size (overrides the scenario's)")
    parser.add_argument("--seed", type=int, metavar="S", help="random seed (overrides the scenario's)")
    parser.add_argument("--duration", type=float, metavar="SECONDS", help="virtual seconds to simulate")
    parser.add_argument("--sizes", default="100,1000,10000", metavar="N,N,...",
                        help="report: network sizes for hops and latency against N")
    parser.add_argument("--scenario-nodes", type=int, metavar="N", help="report: size of the scenario runs (default: each file's)")
    parser.add_argument("--scenarios", metavar="A,B,...", help="report: which scenarios (default: churn, relay_failure, flash_crowd, regional_split)")
    parser.add_argument("--requests", type=int, default=20, metavar="N", help="real: requests in the comparison")
    parser.add_argument("--routing-table", metavar="MODEL[,MODEL]",
                        help="routing-table model: kademlia (textbook k-buckets, the scenarios' default) or "
                             "py-libp2p-0.8.1 (what Darkbloom nodes run: any full bucket splits); report: a comma "
                             "list runs the scaling sweep once per model (default: kademlia)")


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{flag} must be at least 1", key=flag, source="command line")


def run(args: argparse.Namespace, config: Config) -> int:
    from darkbloom.sim import report

    _positive(args.nodes, "--nodes")
    _positive(args.scenario_nodes, "--scenario-nodes")
    models = [m.strip() for m in (args.routing_table or "").split(",") if m.strip()]
    for model in models:
        report.with_routing_table(report.load_scenario("baseline"), model)  # ConfigError naming the choices
    if args.scenario == "real":
        from darkbloom.sim.realhost import compare

        nodes = args.nodes or 20
        if not 1 <= nodes <= 50:
            raise ConfigError("real-host mode runs 1 to 50 hosts", key="--nodes", source="command line")
        _positive(args.requests, "--requests")
        print(f"{nodes} real libp2p providers + 1 relay + 2 shims on 127.0.0.1, and the same in the simulator "
              "(py-libp2p-0.8.1 routing tables; hops of the textbook model as context)", flush=True)
        rows = compare(nodes, args.requests, args.seed or 1)
        print(f"  {'metric':<24}{'sim':>10}{'real':>10}  within 10 %")
        for r in rows:
            flag = "" if r["within_10pct"] is None else ("yes" if r["within_10pct"] else "NO")
            print(f"  {r['metric']:<24}{r['sim']!s:>10}{r['real']!s:>10}  {flag}")
        return 0 if all(r["within_10pct"] is not False for r in rows) else 1
    if args.scenario == "report":
        out = Path(args.out or "sim-report")
        try:
            sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--sizes wants numbers like 100,1000, got {args.sizes!r}", key="--sizes", source="command line") from None
        for n in sizes:
            _positive(n, "--sizes")
        names = [s.strip() for s in args.scenarios.split(",")] if args.scenarios else list(report.REPORT_SCENARIOS)
        for name in names:
            report.load_scenario(name)  # fail before hours of work, not after
        results = report.run_report(
            out, sizes=sizes, scenarios=names, scenario_nodes=args.scenario_nodes, seed=args.seed or 1,
            routing_tables=models or ("kademlia",),
            progress=lambda line: print(line, flush=True),
        )
        print(report.render_markdown(results))
        print(f"wrote {out}/report.md, scaling.csv, hops_vs_n.png and one directory per run")
        return 0

    if len(models) > 1:
        raise ConfigError("a scenario runs with one routing-table model", key="--routing-table", source="command line")
    scenario = report.load_scenario(args.scenario).with_overrides(nodes=args.nodes, seed=args.seed, duration_s=args.duration)
    scenario = report.with_routing_table(scenario, models[0] if models else None)
    out = Path(args.out or f"sim-out/{scenario.name}")
    print(f"{scenario.name}: {scenario.nodes} nodes, seed {scenario.seed}, {scenario.duration_s:.0f} s virtual, "
          f"{scenario.dht.routing_table} routing tables", flush=True)
    import logging

    logging.getLogger("darkbloom.p2p.core").setLevel(logging.ERROR)  # one "record expired" per peer otherwise
    result = report.simulate(scenario)
    report.write_result(result, out)
    width = max(len(k) for k in result.summary)
    for key, value in result.summary.items():
        shown = "-" if isinstance(value, float) and math.isnan(value) else value
        print(f"  {key:<{width}}  {shown}")
    st = result.stats
    print(f"  {'wall / cpu / memory':<{width}}  {st['wall_s']} s / {st['cpu_s']} s / {st['maxrss_mb']} MB")
    print(f"wrote {out}/ (lookups.csv, requests.csv, departures.csv, events.csv, summary.json, timeline.png)")
    sys.stdout.flush()
    return 0
