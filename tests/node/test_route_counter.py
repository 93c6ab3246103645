"""The node counts each served stream by its route: darkbloom_relayed_share is the relayed share."""

from __future__ import annotations

from darkbloom.metrics import RoleMetrics
from darkbloom.node.daemon import RouteCounter


class Network:
    """Only what RouteCounter touches (a test about counting, not about libp2p)."""

    def __init__(self) -> None:
        self.handlers: dict = {}
        self.peer_id = "12D3KooWnode"

    def serve(self, protocol, handler) -> None:
        self.handlers[protocol] = handler


class Stream:
    def __init__(self, route: str) -> None:
        self.route = route


async def test_served_streams_are_counted_by_route_and_handled():
    net, metrics, handled = Network(), RoleMetrics("node"), []

    async def handler(stream) -> None:
        handled.append(stream.route)

    counting = RouteCounter(net, metrics)
    assert counting.peer_id == "12D3KooWnode"  # everything else is the network's
    counting.serve("/darkbloom/infer/1.0.0", handler)
    for route in ("direct", "relayed", "relayed", "hole-punched"):
        await net.handlers["/darkbloom/infer/1.0.0"](Stream(route))
    assert handled == ["direct", "relayed", "relayed", "hole-punched"]
    assert metrics.value("darkbloom_relayed_share") == 0.5
    assert metrics.value("darkbloom_routes_total", route="relayed") == 2
    assert metrics.value("darkbloom_routes_total", route="hole-punched") == 1


def test_a_relayed_node_reached_directly_says_hole_punched():
    from darkbloom.node.daemon import reachability_of

    class Net:
        def __init__(self, reachability: str) -> None:
            self.reachability = reachability

    metrics = RoleMetrics("node")
    assert reachability_of(Net("relayed"), metrics) == "relayed"
    metrics.routed("relayed")
    assert reachability_of(Net("relayed"), metrics) == "relayed"
    metrics.routed("direct")
    assert reachability_of(Net("relayed"), metrics) == "hole-punched"
    assert reachability_of(Net("public"), metrics) == "public"
