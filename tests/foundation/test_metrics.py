"""Role metrics render as Prometheus text, with role labels and separate registries."""

from darkbloom.metrics import RoleMetrics, render


def test_counts_render_per_role():
    node, shim = RoleMetrics("node"), RoleMetrics("shim")
    node.request("chat", "ok")
    node.request("chat", "ok")
    node.tokens(prompt=5, completion=7)
    node.ttft.observe(0.2)
    shim.error("no_capacity")
    assert node.value("darkbloom_requests_total", kind="chat", outcome="ok") == 2
    assert node.value("darkbloom_tokens_total", direction="completion") == 7
    assert shim.value("darkbloom_requests_total", kind="chat", outcome="ok") == 0
    text = render(node, shim).decode()
    assert 'darkbloom_requests_total{kind="chat",outcome="ok",role="node"} 2.0' in text
    assert 'darkbloom_errors_total{kind="no_capacity",role="shim"} 1.0' in text
    assert 'darkbloom_ttft_seconds_bucket{le="0.25",role="node"} 1.0' in text


def test_libp2p_warnings_do_not_leak_as_bare_lines():
    import subprocess
    import sys

    code = (
        "from darkbloom import log; log.configure('INFO'); import libp2p, logging; "
        "logging.getLogger('libp2p.kad_dht.kad_dht').warning('Failed to read DHT message from stream: x'); "
        "logging.getLogger('darkbloom.x').warning('ours')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "Failed to read DHT message" not in out.stderr
    assert "darkbloom.x: ours" in out.stderr
