"""The operator's status shows the relay's reputation (page, JSON, CLI text) instead of n/a, and explains failed checks."""

from __future__ import annotations

from darkbloom.node.status import NodeStatus, explain, render_html, reputation_text, to_json


def _status(**kw) -> NodeStatus:
    return NodeStatus(peer_id="12D3KooWexample", version="0.1", uptime_s=10.0, reachability="public", **kw)


def test_before_a_table_the_page_says_why_there_is_no_figure() -> None:
    s = _status()
    assert reputation_text(s).startswith("n/a")
    assert "n/a (no reputation table from the relay yet)" in render_html(s)


def test_reputation_from_the_table_on_page_and_json() -> None:
    s = _status(reputation=0.62, reputation_epoch=12, paying_consumers=5, failed_spot_checks=1,
                failed_features=("json",), observed_class="standard", node_class="pro")
    text = reputation_text(s)
    assert text == "0.62 (epoch 12, 5 paying consumers, 1 failed spot check)"
    page = render_html(s)
    assert "<td id=reputation>0.62 (epoch 12, 5 paying consumers, 1 failed spot check)</td>" in page
    assert "relay sees: standard" in page
    data = to_json(s)
    assert data["reputation"] == 0.62 and data["reputation_text"] == text and data["failed_features"] == ("json",)
    reasons = explain(s)
    assert any("Failed 1 spot check" in r for r in reasons)
    assert any("capability check for json" in r for r in reasons)


def test_clean_node_gets_no_trust_explanations() -> None:
    s = _status(reputation=0.9, reputation_epoch=3, paying_consumers=1)
    assert reputation_text(s) == "0.90 (epoch 3, 1 paying consumer)"
    assert not any("spot check" in r or "capability" in r for r in explain(s))
