"""The operator's view of a node: a status snapshot, plain explanations, JSON and a small HTML page.

Pure: the daemon gathers a `NodeStatus`; `explain` says in plain words why a node gets no
work; `render_html` makes the page served on the node's local status port.
"""

from __future__ import annotations

import dataclasses
import html
from dataclasses import dataclass, field

__all__ = ["ModelStatus", "NodeStatus", "explain", "render_html", "reputation_text", "to_json"]

IDLE_EXPLAIN_AFTER_S = 600  # how long without requests before "nobody asked" is said


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelStatus:
    id: str
    kind: str  # chat | embedding
    digest: str
    requests: int = 0
    completion_tokens: int = 0
    providers_seen: int = 0  # other nodes found in the DHT serving the same id
    market_price_out: int | None = None  # median output price of those providers (micro-credits / 1M)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeStatus:
    peer_id: str
    version: str
    uptime_s: float
    reachability: str  # public | relayed | hole-punched | unreachable | unknown
    addresses: tuple[str, ...] = ()
    models: tuple[ModelStatus, ...] = ()
    requests_served: int = 0
    requests_failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    active: int = 0
    queued: int = 0
    max_concurrent: int = 0
    paused: bool = False
    pause_reason: str = ""
    price_input_per_m: int = 0
    price_output_per_m: int = 0
    region: str = ""
    node_class: str = ""
    earnings: tuple[tuple[int, int], ...] = ()  # (epoch, micro-credits paid to this node)
    reputation: float | None = None  # from the relay's signed table (None: no table fetched yet)
    reputation_epoch: int | None = None  # the table's last settled epoch
    paying_consumers: int = 0  # distinct paying consumers inside the table's window
    failed_spot_checks: int = 0  # counted by the relay inside the window
    failed_features: tuple[str, ...] = ()  # capability canaries the relay saw this node fail
    observed_class: str = ""  # the class the relay derived from its probes ("" none yet)
    decode_tps: float = 0.0
    prefill_tps: float = 0.0
    last_request_age_s: float | None = None  # None: never served
    notes: tuple[str, ...] = field(default=())  # extra lines from the daemon (e.g. ledger unreachable)


def explain(s: NodeStatus) -> list[str]:
    """Plain reasons, most important first, why this node is getting little or no work."""
    out: list[str] = []
    if s.reachability in ("unreachable", "unknown"):
        out.append(
            "Not reachable: no direct address works and no relay reservation is held, so no one can "
            "connect. Check the network connection and that a bootstrap relay is up."
        )
    if s.paused:
        out.append(f"Paused by your settings: {s.pause_reason}.")
    for m in s.models:
        if m.market_price_out is not None and s.price_output_per_m > m.market_price_out * 1.2:
            out.append(
                f"Price above the market for {m.id}: you ask {s.price_output_per_m} per 1M output tokens, "
                f"the {m.providers_seen} other providers ask {m.market_price_out} (median)."
            )
    idle = s.last_request_age_s is None or s.last_request_age_s > IDLE_EXPLAIN_AFTER_S
    if not out and idle and s.uptime_s > IDLE_EXPLAIN_AFTER_S:
        names = ", ".join(m.id for m in s.models) or "no models"
        out.append(f"Nobody asked for this model recently ({names}): there is no demand on the network right now.")
    if s.failed_spot_checks:
        out.append(
            f"Failed {s.failed_spot_checks} spot check(s): another node serving the same weights scored your answers "
            "as not coming from them. Check that the model files are the advertised ones (darkbloom models verify)."
        )
    if s.failed_features:
        feats = ", ".join(s.failed_features)
        out.append(f"Failed the relay's capability check for {feats}: shims send you no such requests for now.")
    out.extend(s.notes)
    return out


def to_json(s: NodeStatus) -> dict:
    data = dataclasses.asdict(s)
    data["explanations"] = explain(s)
    data["reputation_text"] = reputation_text(s)
    data["load"] = s.active / s.max_concurrent if s.max_concurrent else 0.0
    return data


def reputation_text(s: NodeStatus) -> str:
    """"0.62 (epoch 12, 5 paying consumers, 1 failed spot check)", or "n/a" before the first table."""
    if s.reputation is None:
        return "n/a (no reputation table from the relay yet)"
    parts = [] if s.reputation_epoch is None else [f"epoch {s.reputation_epoch}"]
    parts.append(f"{s.paying_consumers} paying consumer{'s' if s.paying_consumers != 1 else ''}")
    if s.failed_spot_checks:
        parts.append(f"{s.failed_spot_checks} failed spot check{'s' if s.failed_spot_checks != 1 else ''}")
    return f"{s.reputation:.2f} ({', '.join(parts)})"


def _fmt_credits(micro: int) -> str:
    return f"{micro / 1e6:,.6f}"


def render_html(s: NodeStatus) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(m.id)}</td><td>{e(m.kind)}</td><td><code title='{e(m.digest)}'>{e(m.digest[:23])}</code></td>"
        f"<td class=n>{m.requests}</td><td class=n>{m.completion_tokens}</td></tr>"
        for m in s.models
    )
    earnings = "".join(f"<tr><td>{epoch}</td><td class=n>{_fmt_credits(amount)}</td></tr>" for epoch, amount in s.earnings)
    earnings = earnings or "<tr><td colspan=2>no settled epochs yet</td></tr>"
    notes = "".join(f"<li>{e(line)}</li>" for line in explain(s))
    notes_block = f"<section class=warn><h2>Why little or no work</h2><ul>{notes}</ul></section>" if notes else ""
    load = f"{s.active}/{s.max_concurrent} busy, {s.queued} queued"
    rep = reputation_text(s)
    state = "paused" if s.paused else "serving"
    observed = f" (relay sees: {s.observed_class})" if s.observed_class else ""
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>Darkbloom node {e(s.peer_id[-8:])}</title>
<meta http-equiv=refresh content=5>
<style>
body{{font:15px/1.4 system-ui,sans-serif;margin:2em;max-width:60em;color:#222}}
h1{{font-size:1.4em}} table{{border-collapse:collapse;margin:.5em 0 1.5em}}
td,th{{border-bottom:1px solid #ddd;padding:.3em .8em;text-align:left}} .n{{text-align:right}}
.kv td:first-child{{color:#666}} .warn{{background:#fff4e0;border:1px solid #f0c36d;padding:.5em 1em}}
code{{font-size:.9em}}
</style></head><body>
<h1>Darkbloom node <code>{e(s.peer_id[-8:])}</code> — {state}</h1>
{notes_block}
<table class=kv>
<tr><td>Peer id</td><td><code id=peer-id>{e(s.peer_id)}</code></td></tr>
<tr><td>Reachability</td><td id=reachability>{e(s.reachability)}</td></tr>
<tr><td>Requests served</td><td id=requests-served>{s.requests_served}</td></tr>
<tr><td>Tokens (prompt / completion)</td><td id=tokens>{s.prompt_tokens} / {s.completion_tokens}</td></tr>
<tr><td>Current load</td><td id=load>{load}</td></tr>
<tr><td>Speed (prefill / decode tok/s)</td><td>{s.prefill_tps:.0f} / {s.decode_tps:.1f}</td></tr>
<tr><td>Price per 1M tokens (in / out)</td><td>{_fmt_credits(s.price_input_per_m)} / {_fmt_credits(s.price_output_per_m)}</td></tr>
<tr><td>Region / class</td><td>{e(s.region or "-")} / {e(s.node_class or "-")}{e(observed)}</td></tr>
<tr><td>Reputation</td><td id=reputation>{e(rep)}</td></tr>
<tr><td>Version</td><td id=version>{e(s.version)}</td></tr>
<tr><td>Uptime</td><td>{s.uptime_s / 3600:.1f} h</td></tr>
</table>
<h2>Models</h2>
<table><tr><th>Model</th><th>Kind</th><th>Weights digest</th><th>Requests</th><th>Tokens out</th></tr>{rows}</table>
<h2>Earnings per epoch</h2>
<table id=earnings><tr><th>Epoch</th><th>Credits</th></tr>{earnings}</table>
</body></html>
"""
