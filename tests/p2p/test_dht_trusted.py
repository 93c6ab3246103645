"""Defect 2 (DHT half): a model stays findable while the DHT servers nearest its key are dead.

Real libp2p hosts on 127.0.0.1: one relay (the trusted bootstrap server), 20 node servers, a
private provider (a DHT client behind the relay) and a shim. The model id is chosen so that the
relay is *not* among the 20 servers closest to the model key; those 20 are then stopped. The
provider and its record are found only because provider lookups and announcements always
include the trusted bootstrap servers.
"""

from __future__ import annotations

import trio
from libp2p.kad_dht.utils import sort_peer_ids_by_distance

from darkbloom.p2p.dht import multihash_of
from darkbloom.p2p.keys import model_cid
from darkbloom.p2p.testing import swarm
from darkbloom.wire.caps import CapabilityRecord, ModelCap

TIMEOUT = 150
SERVERS = 20  # k: with 21 servers the relay can be outside the k closest


def model_far_from(relay_id, server_ids) -> str:
    """A model id whose key has the relay farthest of all servers."""
    for i in range(10_000):
        model = f"far-model-{i}"
        order = sort_peer_ids_by_distance(multihash_of(model_cid(model)), [relay_id, *server_ids])
        if order[-1] == relay_id:
            return model
    raise AssertionError("no model id puts the relay last")  # 1 in 21 ids does


async def test_a_model_is_found_while_the_servers_nearest_its_key_are_dead():
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=SERVERS, relays=1, clients=1) as s:
            relay = s.relays[0].net
            servers = [m.net.host.get_id() for m in s.nodes]
            model = model_far_from(relay.host.get_id(), servers)
            provider = (await s.add("node", reachability="private")).net
            await provider.relay_ready.wait()
            await provider.put_record(CapabilityRecord(
                peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0, max_concurrent=1,
                models=(ModelCap(id=model, digest="cd" * 32, context_length=2048),)))
            await provider.provide(model)
            shim = s.clients[0].net
            assert provider.peer_id in {p.peer_id for p in await shim.find_providers(model, fresh=True)}

            # The relay is not among the k closest servers to the key, so a plain Kademlia lookup that
            # knows every server asks only the others. (Checked over the whole server set: the
            # library's own lookup returns the k closest of the peers this shim happens to have
            # learned, which can include the relay when the shim has not met every server yet.)
            key = multihash_of(model_cid(model))
            k_closest = sort_peer_ids_by_distance(key, [relay.host.get_id(), *servers])[:SERVERS]
            assert relay.host.get_id() not in k_closest and len(k_closest) == SERVERS

            for member in list(s.nodes):  # every server nearest the key dies
                await member.stop()

            found = await shim.find_providers(model, fresh=True)
            assert provider.peer_id in {p.peer_id for p in found}
            record = await shim.get_record(provider.peer_id, fresh=True)
            assert record is not None and record.models[0].id == model
