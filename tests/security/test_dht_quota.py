"""A peer flooding a DHT server with validly signed records cannot evict honest ones (defect 7).

Real libp2p hosts on 127.0.0.1: the flooder is a DHT client that sends PUT_VALUE for records
of sybil identities it made itself (each validly signed, so the validator accepts them).
"""

from __future__ import annotations

import trio

from darkbloom.identity import Identity
from darkbloom.p2p import records
from darkbloom.p2p.dht import VALUES_PER_PEER
from darkbloom.p2p.keys import caps_key, peer_id_from_public_key
from darkbloom.p2p.testing import swarm
from darkbloom.wire.caps import CapabilityRecord, ModelCap
from darkbloom.wire.codec import encode

TIMEOUT = 90
TEMPLATE = CapabilityRecord(peer_id="", seq=0, issued_at_ms=0, expires_at_ms=0, max_concurrent=1,
                            models=(ModelCap(id="quota-model", digest="ab" * 32, context_length=2048),))


def sybil_record(now_ms: int) -> tuple[str, bytes]:
    sybil = Identity.generate()
    pid = peer_id_from_public_key(sybil.public_key)
    record = records.build_record(sybil, TEMPLATE, seq=now_ms, now_ms=now_ms, ttl_ms=60_000, addrs=(),
                                  reachability="public")
    return caps_key(pid), encode(record)


async def flood(flooder, server, count: int) -> int:
    """PUT_VALUE `count` sybil records from `flooder` to `server`; how many it acknowledged."""
    stored = 0
    now = flooder.now_ms()
    for _ in range(count):
        key, value = sybil_record(now)
        stored += bool(await flooder.dht.value_store._store_at_peer(server.host.get_id(), key.encode(), value))
    return stored


async def test_one_peer_stores_at_most_its_quota_and_honest_records_stay():
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=1, clients=2) as s:
            honest, relay = s.nodes[0].net, s.relays[0].net
            flooder, reader = s.clients[0].net, s.clients[1].net
            await honest.put_record(TEMPLATE)
            honest_key = caps_key(honest.peer_id).encode()
            assert relay.dht.value_store.get(honest_key) is not None

            acknowledged = await flood(flooder, relay, VALUES_PER_PEER + 20)

            store = relay.dht.value_store
            held = store.held()
            assert held[flooder.host.get_id()] == VALUES_PER_PEER
            assert acknowledged == VALUES_PER_PEER
            assert store.refused >= 20
            assert store.get(honest_key) is not None
            assert await reader.get_record(honest.peer_id, fresh=True) is not None
            # the other flooder identity still has its own quota: the limit is per peer, not global
            assert await flood(reader, relay, 3) == 3


async def test_a_full_store_evicts_the_largest_holder_never_the_honest_record():
    with trio.fail_after(TIMEOUT):
        async with swarm(nodes=1, relays=1, clients=1) as s:
            first, relay, flooder = s.nodes[0].net, s.relays[0].net, s.clients[0].net
            store = relay.dht.value_store
            await first.put_record(TEMPLATE)
            store.cap = len(store.store) + 8  # a small store: 8 places left for the flood

            acknowledged = await flood(flooder, relay, 20)

            assert acknowledged == 8
            assert len(store.store) == store.cap
            assert store.get(caps_key(first.peer_id).encode()) is not None
            # A newcomer's honest record gets in: the flooder, holding the most, loses one.
            second = (await s.add("node")).net
            await second.put_record(TEMPLATE)
            assert store.get(caps_key(second.peer_id).encode()) is not None
            assert store.get(caps_key(first.peer_id).encode()) is not None
            assert store.held()[flooder.host.get_id()] == 7
            assert store.evicted >= 1
            assert len(store.store) <= store.cap
