"""The shim's side of paying nodes: one ledger lane per request slot, vouchers signed as tokens arrive.

`ConsumerMeter` opens lanes at the ledger (`/darkbloom/ledger/1.0.0` on a relay) with the
shim's own key, at the prices in the node's capability record, and lends each request a
lane nobody else is using (a lane's request hash chain is sequential, so concurrent
requests to one node use separate lanes). The infer client (`darkbloom.api.client`) does
the per-stream work with the lent `ConsumerLane`: begin the request, count what arrives,
send a voucher every `voucher_every_tokens` and a final one, keep the node's countersigned
copies. A lane goes back to the pool only after a clean finish; after a broken stream the
two sides may disagree about the chain, so it is dropped and closed at the ledger
(`CloseLane`: its unused reserve comes back about an epoch later, not at `lane_ttl_s`).

`open_metered` is the one call the router makes: lend a lane, open the stream, release.
A lane the node refuses as still busy (`LaneBusy`) is swapped for another one on the same
node. While the ledger is unreachable no lane can be opened: a request then waits (bounded)
for a lane this shim already holds to that node, and goes unpaid only when it holds none.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import trio

from darkbloom.api.client import InferCall, open_infer
from darkbloom.config import LedgerConfig
from darkbloom.errors import ApiError, DarkbloomError, LaneBusy, LedgerError, P2PError
from darkbloom.identity import Identity
from darkbloom.ledger.client import LedgerClient
from darkbloom.ledger.lanes import ConsumerLane
from darkbloom.log import short_id
from darkbloom.p2p.keys import public_key_from_peer_id
from darkbloom.wire.codec import encode
from darkbloom.wire.infer import InferRequest
from darkbloom.wire.ledger import LEDGER_PROTOCOL, LaneReservation

__all__ = ["PAYER", "ConsumerMeter", "open_metered", "session_bytes"]

log = logging.getLogger(__name__)

LEDGER_RETRY_S = 60.0  # after the ledger could not be reached, go unpaid this long before trying again
FREE_NODE_RECHECK_S = 600.0  # a node that served without countersigning gets no lane for this long
# The account paying for the current request (hosted mode: the API key's, set when the key is
# checked); None: the meter's own account (the shim's key).
PAYER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("darkbloom_payer", default=None)

LEDGER_DOWN_WAIT_S = 15.0  # ledger unreachable: wait this long for a lane we hold to the node before going unpaid
LANE_BUSY_RETRIES = 1  # a lane refused as busy: ask the same node again with another lane this many times


class ConsumerMeter:
    """Lanes per node for one consumer account (the shim's key)."""

    def __init__(
        self,
        network: Any,
        identity: Identity,
        config: LedgerConfig,
        *,
        ledger_peer: str,
        ledger_addrs: tuple[str, ...] = (),
        ledger_key: str = "",
    ) -> None:
        self.network = network
        self.identity = identity
        self.config = config
        self.ledger_peer = ledger_peer
        self.ledger_addrs = ledger_addrs
        # The relay's key signs reservations; its peer id carries that key.
        self.ledger_key = ledger_key or public_key_from_peer_id(ledger_peer).hex()
        self._client: LedgerClient | None = None
        self._client_lock = trio.Lock()
        self._idle: dict[str, list[ConsumerLane]] = {}  # node peer id -> lanes free for a request
        self._free: dict[str, float] = {}  # node peer id -> when it was seen serving without vouchers
        self._held: dict[str, int] = {}  # node peer id -> lanes to it that are idle or lent to a request
        self._returned: dict[str, trio.Event] = {}  # node peer id -> set when one of its lanes comes back or drops
        self._dropped: list[str] = []  # lanes dropped after unfinished requests, to close at the ledger
        self._ledger_down_until = -float("inf")
        self.opened = 0
        self.closed = 0  # dropped lanes closed at the ledger
        self.topped_up = 0  # lanes whose cap was raised at the ledger
        self.payers: dict[str, ConsumerMeter] = {}  # account -> the meter paying from it (hosted mode, per API key)

    @property
    def account(self) -> str:
        return self.identity.public_key.hex()

    def for_payer(self, payer: Identity | None) -> ConsumerMeter:
        """The meter whose lanes `payer`'s account funds and whose vouchers it signs (self for None)."""
        if payer is None or payer.public_key == self.identity.public_key:
            return self
        account = payer.public_key.hex()
        meter = self.payers.get(account)
        if meter is None:
            meter = self.payers[account] = ConsumerMeter(self.network, payer, self.config, ledger_peer=self.ledger_peer,
                                                         ledger_addrs=self.ledger_addrs, ledger_key=self.ledger_key)
        return meter

    async def _ledger(self) -> LedgerClient:
        async with self._client_lock:
            if self._client is None:
                stream = await self.network.open_stream(self.ledger_peer, LEDGER_PROTOCOL, addrs=self.ledger_addrs)
                self._client = LedgerClient(stream, self.identity, ledger_key=self.ledger_key)
            return self._client

    async def acquire(self, node_peer_id: str, *, price_input_per_m: int, price_output_per_m: int,
                      avoid: str = "") -> ConsumerLane | None:
        """A lane to `node_peer_id` for one request: an idle one, or a new one opened at the ledger.

        None when the node was seen serving free (it never countersigned), or when the ledger
        cannot be reached and no lane this shim holds to the node came back within
        LEDGER_DOWN_WAIT_S: the request then goes without a lane.

        Raises InsufficientFunds (the account cannot reserve `lane_reserve`) or another
        LedgerError the ledger answered (e.g. VoucherRejected).
        """
        free_since = self._free.get(node_peer_id)
        if free_since is not None and trio.current_time() - free_since < FREE_NODE_RECHECK_S:
            return None
        lane = self._idle_lane(node_peer_id, price_input_per_m, price_output_per_m, avoid)
        if lane is not None:
            await self.refill(lane)  # before it is lent: the node gets the raised cap with the request
            return lane
        if trio.current_time() < self._ledger_down_until:
            return await self._wait_for_held(node_peer_id, price_input_per_m, price_output_per_m, avoid)
        node_account = public_key_from_peer_id(node_peer_id).hex()
        try:
            client = await self._ledger()
            reservation = await client.open_lane(node_account, self.config.lane_reserve,
                                                 price_input_per_m=price_input_per_m,
                                                 price_output_per_m=price_output_per_m)
        except P2PError as exc:
            # No ledger to pay through: ask for free serving for a while (nodes that require
            # payment refuse, and the router tries others) rather than failing every request.
            self._client = None
            self._ledger_down_until = trio.current_time() + LEDGER_RETRY_S
            log.warning("ledger %s unreachable (%s): requests wait for held lanes (or go unpaid) for %.0f s",
                        short_id(self.ledger_peer), type(exc).__name__, LEDGER_RETRY_S)
            return await self._wait_for_held(node_peer_id, price_input_per_m, price_output_per_m, avoid)
        self.opened += 1
        self._held[node_peer_id] = self._held.get(node_peer_id, 0) + 1
        log.info("lane %s opened to node %s (cap %d)", reservation.lane[:8], short_id(node_peer_id), reservation.cap)
        return ConsumerLane(self.identity, reservation, voucher_every_tokens=self.config.voucher_every_tokens)

    def low(self, lane: ConsumerLane) -> bool:
        """Whether the lane's headroom is under a quarter of `lane_reserve` (time to top it up)."""
        return lane.headroom() < max(1, self.config.lane_reserve // 4)

    async def refill(self, lane: ConsumerLane) -> LaneReservation | None:
        """Top the lane up by `lane_reserve` at the ledger when it runs low; the new reservation, or None.

        None too when the ledger cannot be reached or refuses (e.g. the account has no more
        credits): the lane goes on with what it has, and a voucher above its cap fails as before.
        """
        if not self.low(lane) or trio.current_time() < self._ledger_down_until:
            return None
        try:
            client = await self._ledger()
            reservation = await client.top_up(lane.lane, lane.reservation.cap + self.config.lane_reserve)
            lane.update_reservation(reservation, self.ledger_key, now_ms=int(time.time() * 1000))
        except P2PError as exc:
            self._client = None
            self._ledger_down_until = trio.current_time() + LEDGER_RETRY_S
            log.warning("ledger %s unreachable (%s): lane %s not topped up", short_id(self.ledger_peer),
                        type(exc).__name__, lane.lane[:8])
            return None
        except LedgerError as exc:  # e.g. InsufficientFunds: the lane serves what its cap still allows
            log.warning("lane %s not topped up: %s", lane.lane[:8], exc)
            return None
        self.topped_up += 1
        log.info("lane %s topped up to cap %d", lane.lane[:8], reservation.cap)
        return reservation

    def _idle_lane(self, node_peer_id: str, price_input_per_m: int, price_output_per_m: int,
                   avoid: str) -> ConsumerLane | None:
        """Take an idle lane to the node at these prices with headroom left (the most recently used first)."""
        idle = self._idle.get(node_peer_id, [])
        for i in range(len(idle) - 1, -1, -1):
            lane = idle[i]
            if lane.lane == avoid:  # just refused as busy: keep it for later
                continue
            del idle[i]
            if lane.headroom() > 0 and lane.reservation.price_input_per_m == price_input_per_m \
                    and lane.reservation.price_output_per_m == price_output_per_m:
                return lane
            self._drop(node_peer_id)  # spent or at old prices: no use any more
            self._dropped.append(lane.lane)  # closed at the ledger with the next dropped lane (or at aclose)
        return None

    async def _wait_for_held(self, node_peer_id: str, price_input_per_m: int, price_output_per_m: int,
                             avoid: str) -> ConsumerLane | None:
        """The ledger is unreachable: wait (bounded) for a lane this shim holds to the node to come back.

        A node that requires payment refuses a request without a lane, so while we hold lanes
        to it, queueing for one beats going unpaid. None (go unpaid) when we hold none, or
        none came back within LEDGER_DOWN_WAIT_S.
        """
        with trio.move_on_after(LEDGER_DOWN_WAIT_S):
            while self._held.get(node_peer_id, 0) > 0:
                lane = self._idle_lane(node_peer_id, price_input_per_m, price_output_per_m, avoid)
                if lane is not None:
                    return lane
                avoid = ""  # a busy lane is fine to retry once it came back
                await self._returned.setdefault(node_peer_id, trio.Event()).wait()
        return None

    def _returns(self, node_peer_id: str) -> None:
        event = self._returned.pop(node_peer_id, None)
        if event is not None:
            event.set()

    def _drop(self, node_peer_id: str) -> None:
        held = self._held.get(node_peer_id, 0) - 1
        if held > 0:
            self._held[node_peer_id] = held
        else:
            self._held.pop(node_peer_id, None)
        self._returns(node_peer_id)

    def unmark_free(self, node_peer_id: str) -> bool:
        """Forget that the node was seen serving free (it asked for payment); True when it was marked."""
        return self._free.pop(node_peer_id, None) is not None

    def release(self, node_peer_id: str, lane: ConsumerLane, outcome: str) -> None:
        """Give a lane back after a request ("clean", "busy", "unclean" or "unmetered"); clean and busy ones are reused.

        A "busy" lane (the node still finishes another request on it) goes to the back of the
        pool, so the retry gets another lane and this one is used again later.
        """
        if outcome == "clean":
            self._free.pop(node_peer_id, None)
            self._idle.setdefault(node_peer_id, []).append(lane)
            self._returns(node_peer_id)
        elif outcome == "busy":
            self._idle.setdefault(node_peer_id, []).insert(0, lane)
            self._returns(node_peer_id)
        elif outcome == "unmetered":
            self._free[node_peer_id] = trio.current_time()
            log.info("node %s serves free: no lanes for it for a while", short_id(node_peer_id))
            self._drop(node_peer_id)
            self._dropped.append(lane.lane)
        else:
            log.info("lane %s to node %s dropped after an unfinished request", lane.lane[:8], short_id(node_peer_id))
            self._drop(node_peer_id)
            self._dropped.append(lane.lane)

    async def close_dropped(self) -> None:
        """Close the dropped lanes at the ledger, so their unused reserve comes back in about an epoch, not at
        `lane_ttl_s`. Lanes that cannot be closed now (ledger unreachable) wait for the next call."""
        while self._dropped and trio.current_time() >= self._ledger_down_until:
            lane = self._dropped.pop()
            try:
                client = await self._ledger()
                await client.close_lane(lane)
            except P2PError as exc:
                self._dropped.append(lane)
                self._client = None
                self._ledger_down_until = trio.current_time() + LEDGER_RETRY_S
                log.warning("ledger %s unreachable (%s): lanes wait to be closed", short_id(self.ledger_peer),
                            type(exc).__name__)
                return
            except LedgerError as exc:  # unknown or already closed: nothing left to release
                log.info("lane %s not closed: %s", lane[:8], exc)
            else:
                self.closed += 1
                log.info("lane %s closed at the ledger (its unused reserve is released after an epoch)", lane[:8])

    async def aclose(self) -> None:
        for payer in self.payers.values():
            await payer.aclose()
        with trio.move_on_after(2, shield=True):
            await self.close_dropped()
        if self._client is not None:
            with trio.move_on_after(2, shield=True):
                try:
                    await self._client.close()
                except DarkbloomError:
                    pass  # the ledger stream is gone already
            self._client = None


async def open_metered(
    network: Any,
    meter: ConsumerMeter | None,
    peer_id: str,
    request: InferRequest,
    *,
    addrs: Sequence[str] = (),
    price_input_per_m: int = 0,
    price_output_per_m: int = 0,
) -> InferCall:
    """`open_infer` paying through `meter` (None: free): lend a lane, put it in the request, release it after.

    When the node refuses the lane as still busy with another request (LaneBusy), the same node
    is asked once more with another lane (an idle one or a new one), not counted against it.
    """
    if meter is None:
        return await open_infer(network, peer_id, request, addrs=addrs)
    meter = meter.for_payer(PAYER.get())
    avoid = ""
    for attempt in range(LANE_BUSY_RETRIES + 1):
        lane = await meter.acquire(peer_id, price_input_per_m=price_input_per_m, price_output_per_m=price_output_per_m,
                                   avoid=avoid)
        if lane is None:
            try:
                return await open_infer(network, peer_id, request, addrs=addrs)
            except ApiError as exc:
                # A node taken for free (its stream ended before any countersign, e.g. a relay
                # circuit died) that asks for payment is not free: pay it, now.
                if exc.code != "payment_required" or not meter.unmark_free(peer_id) or attempt == LANE_BUSY_RETRIES:
                    raise
                log.info("%s node %s wants payment after all; asking again with a lane", request.request_id,
                         short_id(peer_id))
                continue

        def release(outcome: str, _lane: ConsumerLane = lane) -> Awaitable[None] | None:
            meter.release(peer_id, _lane, outcome)
            return meter.close_dropped() if outcome in ("unclean", "unmetered") else None

        try:
            return await open_infer(network, peer_id, dataclasses.replace(request, session=session_bytes(lane)),
                                    addrs=addrs, lane=lane, on_release=release, refill=meter.refill)
        except LaneBusy:
            if attempt == LANE_BUSY_RETRIES:
                raise
            avoid = lane.lane
            log.info("%s lane %s busy on node %s; asking again with another lane", request.request_id, lane.lane[:8],
                     short_id(peer_id))
    raise AssertionError("unreachable")


def session_bytes(lane: ConsumerLane) -> bytes:
    """What goes into `InferRequest.session`: the encoded reservation."""
    return encode(lane.reservation)
