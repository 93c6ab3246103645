"""`darkbloom node`: run an operator's node; `node status` and `node install-service`."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import urllib.error
import urllib.request

__all__ = ["add_arguments", "format_status", "run", "startup_bar"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                        help="a relay to bootstrap from (repeatable; used with the relays in bootstrap-nodes.toml)")
    parser.add_argument("--listen", action="append", dest="cfg__p2p__listen_addrs", metavar="MULTIADDR",
                        help="address to listen on (repeatable), e.g. /ip4/0.0.0.0/tcp/4001")
    parser.add_argument("--status-port", type=int, dest="cfg__node__status_port", metavar="PORT", help="local status page port")
    parser.add_argument("--price-in", type=int, dest="cfg__node__price_input_per_m", metavar="N",
                        help="micro-credits per 1M prompt tokens")
    parser.add_argument("--price-out", type=int, dest="cfg__node__price_output_per_m", metavar="N",
                        help="micro-credits per 1M completion tokens")
    parser.add_argument("--region", dest="cfg__node__region", metavar="REGION", help="your region, e.g. eu-west")
    parser.add_argument("--max-concurrent", type=int, dest="cfg__inference__max_concurrent", metavar="N",
                        help="requests generated at once")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.add_parser("run", help="run the node (the default)")
    status = sub.add_parser("status", help="show the running node's status")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    install = sub.add_parser("install-service", help="write a systemd unit (Linux) or launchd agent (macOS)")
    install.add_argument("--output", metavar="PATH", help="where to write it (default: the system's place)")
    install.add_argument("--user", metavar="NAME", dest="run_as",
                         help="the account a system unit runs the node as (default: the data directory's owner, "
                              "or the user who ran sudo)")


def run(args: argparse.Namespace, config) -> int:
    action = getattr(args, "action", None) or "run"
    if action == "status":
        return _status(config, as_json=args.json)
    if action == "install-service":
        return _install(args, config)
    import trio

    return trio.run(_run_node, config, tuple(args.bootstrap))


def startup_bar(stream=None):
    """`models prepare`'s progress bar, for the node's start (preparation, load, self-benchmark).

    On a terminal one bar per step; otherwise one line as each step starts and one as it ends.
    """
    from darkbloom.inference.commands import ProgressBar

    class StartupBar(ProgressBar):
        def __call__(self, label: str, done: int, total: int) -> None:
            if not self.tty:
                if label != self._current:
                    self.finish()
                    self._current = label
                    print(f"{label} ...", file=self.stream, flush=True)
                if total and done >= total:
                    print(f"{label}: done ({done}/{total})", file=self.stream, flush=True)
                    self._current = ""
                return
            super().__call__(label, done, total)

    return StartupBar(stream)


async def _run_node(config, bootstrap: tuple[str, ...]) -> int:
    from darkbloom.node.daemon import open_node
    from darkbloom.runner import run_until_signal

    async def body(stop):
        bar = startup_bar()
        try:
            async with open_node(config, bootstrap=bootstrap, progress=bar) as node:
                bar.finish()
                print(f"node {node.peer_id} serving {', '.join(m.id for m in node.models)}", flush=True)
                print(f"status page: {node.status_url}", flush=True)
                await stop.wait()
                print(f"stopping: letting requests finish (up to {config.node.grace_period_s:.0f} s)", flush=True)
        finally:
            bar.finish()  # a failed start leaves no half-drawn bar before its error

    return await run_until_signal(body)


def _status(config, *, as_json: bool) -> int:
    host, port = config.node.status_host, config.node.status_port
    url = f"http://{host}:{port}/status.json"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            data = json.load(response)
    except (urllib.error.URLError, OSError) as exc:
        print(f"darkbloom: error: no node answers on {url} ({getattr(exc, 'reason', exc)}); start it with `darkbloom node`, "
              f"or pass the running node's --status-port (or its --config)", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    for line in format_status(data):
        print(line)
    return 0


def format_status(data: dict) -> list[str]:
    """`darkbloom node status`'s lines from the node's /status.json (darkbloom.node.status.to_json)."""
    state = "paused: " + data["pause_reason"] if data["paused"] else "serving"
    lines = [
        f"node        {data['peer_id']}  ({state})",
        f"reachable   {data['reachability']}",
        f"version     {data['version']}",
        f"load        {data['active']}/{data['max_concurrent']} busy, {data['queued']} queued",
        f"served      {data['requests_served']} requests, {data['prompt_tokens']} prompt / "
        f"{data['completion_tokens']} completion tokens",
    ]
    lines += [f"model       {m['id']} ({m['kind']}) {m['digest'][:23]}  {m['requests']} requests" for m in data["models"]]
    rep = data.get("reputation")
    lines.append(f"reputation  {data.get('reputation_text') or ('n/a' if rep is None else f'{rep:.2f}')}")
    lines.append(f"price       {data['price_input_per_m'] / 1e6:.6f} / {data['price_output_per_m'] / 1e6:.6f} credits "
                 "per 1M prompt / completion tokens")
    declared = data.get("node_class") or "none declared"
    observed = f", derived by the relay: {data['observed_class']}" if data.get("observed_class") else ""
    lines.append(f"region      {data.get('region') or '-'}  (class: {declared}{observed})")
    lines += [f"earned      epoch {epoch}: {amount / 1e6:.6f} credits" for epoch, amount in data.get("earnings", [])]
    if not data.get("earnings"):
        lines.append("earned      nothing settled yet (paid when a ledger epoch closes with your vouchers)")
    lines += [f"note        {line}" for line in data["explanations"]]
    return lines


def _install(args, config) -> int:
    from pathlib import Path

    from darkbloom.node.service import is_system_unit, write_service

    import os

    config_file = args.config or os.environ.get("DARKBLOOM_CONFIG")  # the service must read the same file
    path, enable, user = write_service(
        platform.system(), config=config_file, data_dir=config.data_path, path=Path(args.output) if args.output else None,
        run_as=getattr(args, "run_as", None),
    )
    print(f"wrote {path}")
    if is_system_unit(path):
        if user:
            print(f"the node runs as {user}; {config.data_path} must be theirs to write")
        else:
            print("the node runs as root: pass --user NAME to run it as an unprivileged account (recommended)")
    print(f"enable it with: {enable}")
    return 0
