"""Simulator scaling: lookup hops and latency, wall time and peak memory against network size.

    .venv/bin/python bench/sim_scale.py [--sizes 100,1000,10000] [--seed 1] [--routing-table kademlia,py-libp2p-0.8.1]
        [--out bench/results/sim_scale.json]

Each size runs in a fresh process (darkbloom.sim.report.run_isolated), so maxrss is its own.
Prints a table and writes JSON; each row names the routing-table model that produced it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from darkbloom.sim.report import _scaling_row, run_isolated, scaling_scenario


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lookups", type=int, default=200, help="virtual seconds of 1 lookup/s and 0.5 requests/s")
    ap.add_argument("--routing-table", default="kademlia",
                    help="comma list of models: kademlia (textbook), py-libp2p-0.8.1 (what Darkbloom nodes run)")
    ap.add_argument("--out", default="bench/results/sim_scale.json")
    args = ap.parse_args()
    rows = []
    cols = ["nodes", "routing_table", "hops_mean", "hops_p95", "rounds_mean", "lookup_success", "lookup_latency_p50_s",
            "relayed_share", "request_success", "wall_s", "cpu_s", "maxrss_mb", "rpcs"]
    print(" ".join(f"{c:>20}" for c in cols), flush=True)
    runs = [(m.strip(), int(s)) for m in args.routing_table.split(",") for s in args.sizes.split(",")]
    for model, n in runs:
        r = run_isolated(scaling_scenario(n, args.seed, args.lookups, routing_table=model))
        row = _scaling_row(n, r)
        rows.append(row)
        print(" ".join(f"{(round(row[c], 3) if isinstance(row[c], float) and not math.isnan(row[c]) else row[c])!s:>20}" for c in cols), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
