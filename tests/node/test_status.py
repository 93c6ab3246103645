"""Node status: explanations for a node without work, JSON, and the HTML page."""

from __future__ import annotations

from darkbloom.node.status import ModelStatus, NodeStatus, explain, render_html, to_json


def status(**kw):
    base = dict(
        peer_id="12D3KooWabcdefgh12345678",
        version="0.1.0",
        uptime_s=3600,
        reachability="public",
        models=(ModelStatus(id="smollm2-135m-instruct", kind="chat", digest="ab" * 32, requests=3, completion_tokens=40),),
        requests_served=3,
        completion_tokens=40,
        last_request_age_s=5,
        max_concurrent=4,
        price_output_per_m=400_000,
    )
    base.update(kw)
    return NodeStatus(**base)


def test_busy_node_needs_no_explanation():
    assert explain(status()) == []


def test_unreachable_node_says_so():
    lines = explain(status(reachability="unreachable"))
    assert lines[0].startswith("Not reachable")


def test_expensive_node_says_price_above_market():
    m = ModelStatus(id="m", kind="chat", digest="d", providers_seen=3, market_price_out=100_000)
    lines = explain(status(models=(m,), price_output_per_m=400_000))
    assert any("Price above the market for m" in line and "100000" in line for line in lines)


def test_idle_node_says_nobody_asked():
    lines = explain(status(last_request_age_s=None, requests_served=0))
    assert lines == ["Nobody asked for this model recently (smollm2-135m-instruct): there is no demand on the network right now."]
    assert explain(status(last_request_age_s=None, uptime_s=30)) == []  # too early to tell


def test_paused_node_gives_reason():
    assert "Paused by your settings: running on battery power." in explain(status(paused=True, pause_reason="running on battery power"))


def test_json_has_explanations_and_load():
    data = to_json(status(active=2, reachability="relayed"))
    assert data["load"] == 0.5 and data["explanations"] == [] and data["reachability"] == "relayed"


def test_html_escapes_and_shows_figures():
    page = render_html(status(region="<script>", earnings=((3, 1_500_000),)))
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert 'id=requests-served>3<' in page
    assert "1.500000" in page


def test_status_command_lines_say_every_figure():
    from darkbloom.node.commands import format_status

    lines = format_status(to_json(status(region="eu-west", node_class="desktop", observed_class="laptop",
                                         earnings=((7, 2_500_000),), paused=True, pause_reason="running on battery power")))
    text = "\n".join(lines)
    assert lines[0].endswith("(paused: running on battery power)")
    assert "served      3 requests" in text and "smollm2-135m-instruct (chat)" in text
    assert "price       0.000000 / 0.400000 credits per 1M prompt / completion tokens" in text
    assert "region      eu-west  (class: desktop, derived by the relay: laptop)" in text
    assert "earned      epoch 7: 2.500000 credits" in text
    assert "note        Paused by your settings: running on battery power." in text


def test_status_command_before_any_earnings():
    from darkbloom.node.commands import format_status

    text = "\n".join(format_status(to_json(status(reachability="unreachable"))))
    assert "earned      nothing settled yet" in text
    assert "note        Not reachable" in text and "(class: none declared)" in text


def test_html_shows_sixteen_hex_digits_of_the_digest_and_the_whole_on_hover():
    digest = "sha256:" + "0123456789abcdef" * 4
    page = render_html(status(models=(ModelStatus(id="m", kind="chat", digest=digest),)))
    assert f"<code title='{digest}'>sha256:0123456789abcdef</code>" in page
