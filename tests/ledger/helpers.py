"""Shared builders for ledger tests: identities, signed requests, lanes with vouchers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from darkbloom.identity import Identity
from darkbloom.ledger.lanes import ConsumerLane, NodeLane
from darkbloom.ledger.receipts import cost_of, sign
from darkbloom.ledger.store import LedgerStore
from darkbloom.wire.ledger import LaneReservation, OpenLane, TopUp, Voucher

PRICE_IN = 100_000
PRICE_OUT = 400_000
HOUR_MS = 3_600_000
PPM = 950_000


def seeded(n: int) -> Identity:
    return Identity.from_seed(bytes([n]) * 32)


LEDGER = seeded(1)
LEDGER_KEY = LEDGER.public_key.hex()


def open_request(consumer: Identity, node: Identity, cap: int, *, nonce: bytes | None = None, time_ms: int = 1000) -> OpenLane:
    return sign(
        consumer,
        OpenLane(
            consumer=consumer.public_key.hex(),
            node=node.public_key.hex(),
            cap=cap,
            price_input_per_m=PRICE_IN,
            price_output_per_m=PRICE_OUT,
            nonce=nonce or os.urandom(16),
            time_ms=time_ms,
        ),
    )


def top_up_request(consumer: Identity, lane: str, cap: int) -> TopUp:
    return sign(consumer, TopUp(lane=lane, cap=cap, time_ms=2000))


@dataclass
class Pair:
    """A lane with both ends, driven through real signing and checking."""

    consumer: Identity
    node: Identity
    reservation: LaneReservation
    c: ConsumerLane = field(init=False)
    n: NodeLane = field(init=False)

    def __post_init__(self) -> None:
        self.c = ConsumerLane(self.consumer, self.reservation, voucher_every_tokens=32)
        self.n = NodeLane.open(
            self.node, self.reservation, ledger_key=LEDGER_KEY, now_ms=self.reservation.opened_ms, voucher_every_tokens=32
        )
        for side in (self.c, self.n):
            side.begin_request(b"request-1", "digest-1")

    def use(self, prompt: int = 0, completion: int = 0, now_ms: int = 2000) -> Voucher:
        """Serve tokens, sign, countersign; returns the countersigned voucher."""
        self.n.served(prompt_tokens=prompt, completion_tokens=completion)
        self.c.add_usage(prompt_tokens=prompt, completion_tokens=completion)
        signed = self.n.accept(self.c.next_voucher(now_ms=now_ms), now_ms=now_ms)
        self.c.countersigned(signed)
        return signed


def open_pair(store: LedgerStore, consumer: Identity, node: Identity, cap: int, *, now_ms: int = 1000, ttl_ms: int = HOUR_MS) -> Pair:
    reservation = store.open_lane(open_request(consumer, node, cap), ledger=LEDGER, now_ms=now_ms, ttl_ms=ttl_ms)
    return Pair(consumer, node, reservation)


def expected_cost(prompt: int, completion: int) -> int:
    return cost_of(prompt, completion, PRICE_IN, PRICE_OUT)


def make_reservation(consumer: Identity, node: Identity, cap: int, *, lane: str = "ab" * 16, signer: Identity = LEDGER) -> LaneReservation:
    """A reservation signed directly (pure tests without a store)."""
    return sign(
        signer,
        LaneReservation(
            lane=lane,
            consumer=consumer.public_key.hex(),
            node=node.public_key.hex(),
            cap=cap,
            price_input_per_m=PRICE_IN,
            price_output_per_m=PRICE_OUT,
            opened_ms=1000,
            expires_ms=1000 + HOUR_MS,
            ledger=LEDGER_KEY,
        ),
    )
