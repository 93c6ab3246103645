"""The peer-to-peer layer: the only package that imports libp2p (in network, host, dht, relay).

Importing `darkbloom.p2p` stays light: the interface, pure records and the memory network.
The libp2p implementation is `darkbloom.p2p.network.open_network`.
"""

from darkbloom.p2p.api import Handler, PeerNetwork, Provider, Route, Stream, recv_message, send_message
from darkbloom.p2p.keys import caps_key, model_cid, peer_id_from_public_key

__all__ = [
    "Handler",
    "PeerNetwork",
    "Provider",
    "Route",
    "Stream",
    "caps_key",
    "model_cid",
    "peer_id_from_public_key",
    "recv_message",
    "send_message",
]
