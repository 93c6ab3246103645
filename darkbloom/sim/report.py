"""Reports: CSV, JSON and PNG plots of simulation results, and the one-command research report.

`write_result` puts one scenario's rows and summary in a directory (lookups.csv, requests.csv,
departures.csv, events.csv, summary.json, timeline.png). `run_report` runs the hops-vs-N sweep
and the bundled scenarios, each in a fresh process (so memory is measured per run), and
writes scaling.csv, hops_vs_n.png and report.md next to the per-scenario directories.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import logging
import math
import multiprocessing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from darkbloom.errors import ConfigError
from darkbloom.sim.engine import SimResult, scenario_dict, simulate
from darkbloom.sim.routing import ROUTING_TABLE_MODELS
from darkbloom.sim.scenario import load_scenario as load_scenario  # re-exported for commands
from darkbloom.sim.metrics import percentile, timeline
from darkbloom.sim.scenario import Scenario

__all__ = ["REPORT_SCENARIOS", "run_isolated", "run_report", "scaling_scenario", "with_routing_table", "write_result"]

log = logging.getLogger(__name__)

REPORT_SCENARIOS = ("churn", "relay_failure", "flash_crowd", "regional_split")


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    fields: list[str] = []
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or ["empty"])
        w.writeheader()
        w.writerows(rows)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_result(result: SimResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    m = result.metrics
    _write_csv(out / "lookups.csv", m.lookups)
    _write_csv(out / "requests.csv", m.requests)
    _write_csv(out / "departures.csv", m.departures)
    _write_csv(out / "events.csv", m.events)
    doc = {
        "scenario": scenario_dict(result.scenario),
        "summary": {k: _clean(v) for k, v in result.summary.items()},
        "stats": result.stats,
        "nodes_final": result.nodes_final,
        "digest": result.digest,
    }
    (out / "summary.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
    plot_timeline(result, out / "timeline.png")


def plot_timeline(result: SimResult, path: Path, bin_s: float = 60.0) -> None:
    sc = result.scenario
    m = result.metrics
    plot_rows(m.lookups, m.requests, m.events, path, title=f"{sc.name}: {sc.nodes} nodes, seed {sc.seed}", bin_s=bin_s)


def replot(out: Path, bin_s: float = 60.0) -> None:
    """Redraw timeline.png of a result directory from its CSV files."""

    def load(name: str) -> list[dict[str, Any]]:
        with open(out / name, newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            for k, v in r.items():
                if v in ("True", "False"):
                    r[k] = v == "True"
                elif k in ("t", "latency_s", "discovery_s"):
                    r[k] = float(v)
        return rows

    doc = json.loads((out / "summary.json").read_text())
    sc = doc["scenario"]
    plot_rows(load("lookups.csv"), load("requests.csv"), load("events.csv"), out / "timeline.png",
              title=f"{sc['name']}: {sc['nodes']} nodes, seed {sc['seed']}", bin_s=bin_s)


def plot_rows(lookups, requests, events, path: Path, *, title: str, bin_s: float = 60.0) -> None:  # noqa: ANN001
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    served = [dict(r, _relayed=r["route"] == "relayed") for r in requests if r["ok"]]
    panels = [
        ("lookup success", timeline(lookups, bin_s=bin_s, flag="success"), (-0.05, 1.05)),
        ("request success", timeline(requests, bin_s=bin_s, flag="ok"), (-0.05, 1.05)),
        ("served through a relay", timeline(served, bin_s=bin_s, flag="_relayed"), (-0.05, 1.05)),
    ]
    lat: dict[int, list[float]] = {}
    for r in served:
        lat.setdefault(int(float(r["t"]) // bin_s), []).append(float(r["latency_s"]))
    lat_rows = [{"t": b * bin_s, "share": percentile(v, 95)} for b, v in sorted(lat.items())]
    panels.append(("request latency p95 (s)", lat_rows, None))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 8.5), sharex=True)
    for ax, (label, rows, ylim) in zip(axes, panels):
        ax.plot([float(r["t"]) / 60 for r in rows], [r["share"] for r in rows], marker=".")
        ax.set_ylabel(label, fontsize=8)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        for ev in events:
            if ev["kind"] != "re_reserve":
                ax.axvline(float(ev["t"]) / 60, color="red", alpha=0.4, linestyle="--")
    axes[-1].set_xlabel("virtual time (min); red: scenario events")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def with_routing_table(scenario: Scenario, model: str | None) -> Scenario:
    """`scenario` with routing-table model `model` (None: as the scenario says). The
    py-libp2p-0.8.1 model also admits servers named in FIND_NODE answers, as 0.8.1 does."""
    if model is None:
        return scenario
    if model not in ROUTING_TABLE_MODELS:
        raise ConfigError(f"unknown routing table model {model!r}", key="--routing-table", source="command line",
                          hint=f"one of: {', '.join(ROUTING_TABLE_MODELS)}")
    dht = dataclasses.replace(scenario.dht, routing_table=model, admit_learned=model == "py-libp2p-0.8.1")
    return dataclasses.replace(scenario, dht=dht)


def scaling_scenario(nodes: int, seed: int = 1, lookups: int = 200, routing_table: str = "kademlia") -> Scenario:
    """The baseline at `nodes` for the hops/latency sweep: warm network, lookups and requests
    for `lookups` virtual seconds, no re-announce inside the short window (records live 600 s)."""
    base = with_routing_table(load_scenario("baseline"), routing_table)
    duration = base.warmup_s + lookups
    suffix = "" if routing_table == "kademlia" else f"-{routing_table}"
    return dataclasses.replace(
        base,
        name=f"scaling-{nodes}{suffix}",
        nodes=nodes,
        seed=seed,
        duration_s=duration,
        records=dataclasses.replace(base.records, announce_interval_s=duration + 1),
        workload=dataclasses.replace(base.workload, lookup_rate_per_s=1.0, request_rate_per_s=0.5),
    )


def _simulate_quietly(scenario: Scenario) -> SimResult:
    logging.getLogger("darkbloom.p2p.core").setLevel(logging.ERROR)  # "record expired" per peer
    return simulate(scenario)


def run_isolated(scenario: Scenario) -> SimResult:
    """`simulate` in a fresh process, so its peak memory is its own."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_simulate_quietly, scenario).result()


def _scaling_row(n: int, r: SimResult) -> dict[str, Any]:
    s, st = r.summary, r.stats
    return {
        "nodes": n, "routing_table": r.scenario.dht.routing_table, "log2_nodes": round(math.log2(n), 3), "lookups": s["lookups"], "lookup_success": s["lookup_success"],
        "hops_mean": s["hops_mean"], "hops_p95": s["hops_p95"], "rounds_mean": s["rounds_mean"],
        "queries_mean": s["queries_mean"], "lookup_latency_p50_s": s["lookup_latency_p50_s"],
        "lookup_latency_p95_s": s["lookup_latency_p95_s"], "requests": s["requests"],
        "request_success": s["request_success"], "relayed_share": s["relayed_share"],
        "discovery_latency_p50_s": s["discovery_latency_p50_s"], "request_latency_p50_s": s["request_latency_p50_s"],
        "wall_s": st["wall_s"], "cpu_s": st["cpu_s"], "maxrss_mb": st["maxrss_mb"], "rpcs": st["rpcs_by_alive_nodes"],
    }


def plot_scaling(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    models = list(dict.fromkeys(r.get("routing_table", "kademlia") for r in rows))
    for model, line in zip(models, ("-", "--", "-.")):
        sub = [r for r in rows if r.get("routing_table", "kademlia") == model]
        xs = [r["log2_nodes"] for r in sub]
        tag = f" [{model}]"
        a.plot(xs, [r["hops_mean"] for r in sub], line, marker="o", label="hops (mean)" + tag)
        a.plot(xs, [r["hops_p95"] for r in sub], line, marker="^", label="hops (p95)" + tag)
        a.plot(xs, [r["rounds_mean"] for r in sub], line, marker="s", label="rounds (mean)" + tag)
        if len(sub) >= 2:
            mx, my = sum(xs) / len(xs), sum(r["hops_mean"] for r in sub) / len(sub)
            den = sum((x - mx) ** 2 for x in xs) or 1.0
            slope = sum((x - mx) * (r["hops_mean"] - my) for x, r in zip(xs, sub)) / den
            a.plot(xs, [my + slope * (x - mx) for x in xs], "k:", label=f"fit: {slope:.2f} hops per doubling" + tag)
        b.plot(xs, [r["lookup_latency_p50_s"] for r in sub], line, marker="o", label="lookup p50" + tag)
        b.plot(xs, [r["lookup_latency_p95_s"] for r in sub], line, marker="^", label="lookup p95" + tag)
        b.plot(xs, [r["discovery_latency_p50_s"] for r in sub], line, marker="s", label="model discovery p50" + tag)
    top = max((max(r["rounds_mean"], r["hops_p95"]) for r in rows), default=1.0)
    a.set_ylim(-0.2, top * 1.8)  # room for the legend above the lines
    a.set_title("routing-table model in [brackets]", fontsize=9)
    a.set_xlabel("log2(N)")
    a.set_ylabel("per lookup")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    b.set_xlabel("log2(N)")
    b.set_ylabel("seconds (virtual)")
    b.legend(fontsize=7)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def run_report(
    out: Path,
    *,
    sizes: Sequence[int] = (100, 1000, 10000),
    scenarios: Sequence[str] = REPORT_SCENARIOS,
    scenario_nodes: int | None = None,
    seed: int = 1,
    routing_tables: Sequence[str] = ("kademlia",),
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The whole research report into `out`; returns what it wrote as a dict. The scaling sweep
    runs once per routing-table model in `routing_tables`; scenarios use the first."""
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"scaling": [], "scenarios": {}}
    for name in scenarios:
        sc = with_routing_table(load_scenario(name).with_overrides(nodes=scenario_nodes, seed=seed), routing_tables[0])
        progress(f"scenario {name}: {sc.nodes} nodes, {sc.duration_s:.0f} s virtual")
        r = run_isolated(sc)
        write_result(r, out / name)
        results["scenarios"][name] = {"summary": r.summary, "stats": r.stats, "routing_table": sc.dht.routing_table}
        progress(f"  done in {r.stats['wall_s']:.0f} s wall, {r.stats['maxrss_mb']:.0f} MB")
    runs = [(model, n) for model in routing_tables for n in sizes]
    for model, n in runs:
        sc = scaling_scenario(n, seed, routing_table=model)
        progress(f"scaling: {n} nodes, {model} routing tables")
        r = run_isolated(sc)
        write_result(r, out / sc.name)
        results["scaling"].append(_scaling_row(n, r))
        progress(f"  hops {r.summary['hops_mean']}, {r.stats['wall_s']:.0f} s wall, {r.stats['maxrss_mb']:.0f} MB")
        _write_csv(out / "scaling.csv", results["scaling"])
    if results["scaling"]:
        plot_scaling(results["scaling"], out / "hops_vs_n.png")
    (out / "report.json").write_text(json.dumps(results, indent=2, default=_clean))
    (out / "report.md").write_text(render_markdown(results))
    return results


def render_markdown(results: dict[str, Any]) -> str:
    lines = ["# Darkbloom simulation report", ""]
    if results["scaling"]:
        cols = ["nodes", "routing_table", "hops_mean", "hops_p95", "rounds_mean", "queries_mean", "lookup_success",
                "lookup_latency_p50_s", "lookup_latency_p95_s", "relayed_share", "request_success",
                "discovery_latency_p50_s", "wall_s", "cpu_s", "maxrss_mb"]
        lines += ["## Lookups against N", "", "routing_table: the simulator's routing-table model that produced the row "
                  "(kademlia: textbook k-buckets; py-libp2p-0.8.1: any full bucket splits, up to 256 buckets).", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in results["scaling"]:
            lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
        lines.append("")
    if results["scenarios"]:
        keys = ["lookup_success", "hops_mean", "request_success", "relayed_share", "hole_punched_share",
                "request_latency_p50_s", "request_latency_p95_s", "vanish_mean_s", "vanish_max_s"]
        lines += ["## Scenarios", "", "| scenario | routing_table | " + " | ".join(keys) + " | wall_s | maxrss_mb |",
                  "|" + "---|" * (len(keys) + 4)]
        for name, r in results["scenarios"].items():
            lines.append(f"| {name} | {r.get('routing_table', 'kademlia')} | " + " | ".join(_fmt(r["summary"].get(k)) for k in keys)
                         + f" | {_fmt(r['stats']['wall_s'])} | {_fmt(r['stats']['maxrss_mb'])} |")
        lines.append("")
    return "\n".join(lines)
