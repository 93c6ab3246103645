"""Network simulator and DHT crawler for topology research (see docs/RESEARCH.md).

Layers: `keys` and `routing` (pure Kademlia tables: textbook or py-libp2p 0.8.1) -> `traversal` (pure lookup state machine)
-> `dht` (RPC over PeerNetwork streams, `messages`) -> `peer` (a PeerNetwork on the simulated
wire, `network`) -> `engine` (scenarios from `scenario`, measured into `metrics`) -> `report`
and `commands` (`darkbloom sim`). `crawl`, `crawl_ports` and `crawl_commands` walk a DHT
(`darkbloom crawl`); `realhost` runs the same workload on real libp2p hosts. Import the
modules themselves: this package imports nothing heavy on its own.
"""

__all__: list[str] = []
