"""The status HTTP server answers its routes over real HTTP."""

from __future__ import annotations

import httpx
import trio

from darkbloom.metrics import RoleMetrics
from darkbloom.statushttp import serve_status


async def test_routes_over_http():
    metrics = RoleMetrics("relay")
    metrics.request("ledger", "ok")
    state = {"served": 0}
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                lambda task_status: serve_status(
                    "relay", "127.0.0.1", 0, status_json=lambda: dict(state), page=lambda: f"<p>{state['served']}</p>",
                    metrics=(metrics,), task_status=task_status,
                )
            )
            state["served"] = 7

            def fetch():
                with httpx.Client(base_url=url) as client:
                    return client.get("/"), client.get("/status.json"), client.get("/metrics"), client.get("/health")

            page, js, prom, health = await trio.to_thread.run_sync(fetch)
            nursery.cancel_scope.cancel()
    assert page.status_code == 200 and page.text == "<p>7</p>" and page.headers["content-type"].startswith("text/html")
    assert js.json() == {"served": 7}
    assert 'darkbloom_requests_total{kind="ledger",outcome="ok",role="relay"} 1.0' in prom.text
    assert health.json() == {"status": "ok"}
