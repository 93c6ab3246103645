"""The `/darkbloom/ledger/1.0.0` handler and client over a trio memory stream pair, on a real SQLite store."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing

from darkbloom.config import LedgerConfig
from darkbloom.errors import InsufficientFunds, InvalidSignature, LedgerError, StreamClosed, UnknownLane
from darkbloom.ledger.book import VoucherBook
from darkbloom.ledger.client import LedgerClient, run_submitter, submit_unsettled
from darkbloom.ledger.receipts import sign
from darkbloom.ledger.service import LedgerService
from darkbloom.ledger.store import SqliteStore
from darkbloom.wire.codec import FrameDecoder, encode_frame, read_frame
from darkbloom.wire.ledger import BalanceQuery, LedgerErrorReply, SubmitVouchers

from .helpers import LEDGER, LEDGER_KEY, PRICE_IN, PRICE_OUT, Pair, open_request, seeded

ALICE, NODE, MALLORY = seeded(20), seeded(21), seeded(22)
NOW = 1_800_000_000.0


class MemoryLedgerStream:
    """The handler's stream interface over one end of trio.testing.memory_stream_pair."""

    def __init__(self, stream: trio.abc.Stream, peer_id: str) -> None:
        self._stream = stream
        self.peer_id = peer_id

    async def read(self, n: int) -> bytes:
        return await self._stream.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def close(self) -> None:
        await self._stream.aclose()


@pytest.fixture
def service(tmp_path):
    store = SqliteStore(tmp_path / "ledger.sqlite3")
    svc = LedgerService(store, LEDGER, LedgerConfig(epoch_s=600), clock=lambda: NOW)
    yield svc
    store.close()


async def connect(nursery, service, identity) -> LedgerClient:
    left, right = trio.testing.memory_stream_pair()
    nursery.start_soon(service.handle, MemoryLedgerStream(right, "peer-" + identity.public_key.hex()))
    return LedgerClient(MemoryLedgerStream(left, "ledger"), identity, ledger_key=LEDGER_KEY, clock=lambda: NOW)


async def test_lane_lifecycle_over_the_protocol(service, tmp_path):
    service.ledger.store.deposit(ALICE.public_key.hex(), 5_000_000, now_ms=1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            shim = await connect(nursery, service, ALICE)
            node = await connect(nursery, service, NODE)
            reservation = await shim.open_lane(NODE.public_key.hex(), 1_000_000, price_input_per_m=PRICE_IN, price_output_per_m=PRICE_OUT)
            assert await shim.balance() == (4_000_000, 1_000_000)
            reservation = await shim.top_up(reservation.lane, 2_000_000)
            assert reservation.cap == 2_000_000
            assert await shim.balance() == (3_000_000, 2_000_000)

            pair = Pair(ALICE, NODE, reservation)
            book = VoucherBook(tmp_path / "node-vouchers.sqlite3")
            for _ in range(3):
                book.put(pair.use(prompt=100, completion=300))
            summary = await submit_unsettled(book, node)
            assert (summary.queued, summary.duplicate, summary.rejected) == (1, 0, 0)
            assert book.unsettled() == []
            # resubmitting the same voucher is a no-op
            assert [r.status for r in await node.submit([pair.c.latest])] == ["duplicate"]

            outcome = await service.settle_now()
            assert outcome.rows[0].paid == pair.c.latest.cum_cost
            summary = await shim.epoch()
            assert summary == outcome.summary
            proof = await node.proof(summary.epoch, 0)
            assert proof.row.lane == reservation.lane
            assert (await shim.balance())[1] == 2_000_000 - pair.c.latest.cum_cost
            book.close()
            await shim.close()
            await node.close()


async def test_refusals_come_back_as_typed_errors_and_the_stream_goes_on(service):
    service.ledger.store.deposit(ALICE.public_key.hex(), 1_000, now_ms=1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            shim = await connect(nursery, service, ALICE)
            with pytest.raises(InsufficientFunds) as info:
                await shim.open_lane(NODE.public_key.hex(), 5_000, price_input_per_m=1, price_output_per_m=1)
            assert (info.value.account, info.value.needed, info.value.available) == (ALICE.public_key.hex(), 5_000, 1_000)
            with pytest.raises(UnknownLane):
                await shim.top_up("00" * 16, 10)
            # a balance query signed by someone else is refused
            forged = dataclasses.replace(sign(MALLORY, BalanceQuery(account=MALLORY.public_key.hex(), time_ms=int(NOW * 1000))), account=ALICE.public_key.hex())
            with pytest.raises(InvalidSignature):
                await shim._ask(forged, LedgerErrorReply)
            # so is a stale one, even correctly signed
            stale = sign(ALICE, BalanceQuery(account=ALICE.public_key.hex(), time_ms=int(NOW * 1000) - 3_600_000))
            with pytest.raises(LedgerError, match="clock"):
                await shim._ask(stale, LedgerErrorReply)
            # a batch signed by another key than the node it names
            batch = dataclasses.replace(sign(MALLORY, SubmitVouchers(node=MALLORY.public_key.hex(), vouchers=(), time_ms=1)), node=NODE.public_key.hex())
            with pytest.raises(InvalidSignature):
                await shim._ask(batch, LedgerErrorReply)
            with pytest.raises(LedgerError, match="not closed"):
                await shim.proof(1, 0)
            assert await shim.epoch() is None
            assert await shim.balance() == (1_000, 0)  # still serving on the same stream
            await shim.close()


async def test_malformed_frame_gets_an_error_reply_and_the_stream_closes(service):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            left, right = trio.testing.memory_stream_pair()
            nursery.start_soon(service.handle, MemoryLedgerStream(right, "peer-x"))
            raw = MemoryLedgerStream(left, "ledger")
            await raw.write(b"\x03\xc1\xc1\xc1")
            decoder = FrameDecoder()
            reply = await read_frame(raw.read, decoder, LedgerErrorReply)
            assert reply.code == "MalformedMessage"
            assert await read_frame(raw.read, decoder) is None  # closed after the reply
            # a well-formed message of the wrong kind is refused the same way
            left2, right2 = trio.testing.memory_stream_pair()
            nursery.start_soon(service.handle, MemoryLedgerStream(right2, "peer-y"))
            raw2 = MemoryLedgerStream(left2, "ledger")
            await raw2.write(encode_frame(LedgerErrorReply(code="x", message="y")))
            reply2 = await read_frame(raw2.read, FrameDecoder(), LedgerErrorReply)
            assert reply2.code == "MalformedMessage" and "unexpected message" in reply2.message


async def test_client_reports_a_closed_stream(service):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            left, right = trio.testing.memory_stream_pair()

            async def hang_up() -> None:
                await right.receive_some(65536)
                await right.aclose()

            nursery.start_soon(hang_up)
            client = LedgerClient(MemoryLedgerStream(left, "ledger"), ALICE)
            with pytest.raises(StreamClosed):
                await client.balance()


@pytest.fixture
def slow_autojump_clock():
    # jumps only after 20 ms of real idleness, so time does not race ahead while a store call runs on its thread
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_epoch_loop_and_submitter_loop(service, tmp_path, slow_autojump_clock):
    """The service closes an epoch every epoch_s; the node's submitter keeps submitting (virtual time)."""
    service.ledger.store.deposit(ALICE.public_key.hex(), 5_000_000, now_ms=1)
    service.config = LedgerConfig(epoch_s=60)
    reservation = service.ledger.store.open_lane(
        open_request(ALICE, NODE, 100_000),
        ledger=LEDGER, now_ms=int(NOW * 1000), ttl_ms=3_600_000,
    )
    pair = Pair(ALICE, NODE, reservation)
    book = VoucherBook(tmp_path / "node.sqlite3")
    book.put(pair.use(prompt=1000))

    async def dial():
        left, right = trio.testing.memory_stream_pair()
        nursery.start_soon(service.handle, MemoryLedgerStream(right, "node"))
        return MemoryLedgerStream(left, "ledger")

    expected = pair.c.latest.cum_cost

    async def paid() -> int:  # through the service's one store thread, like every other store call
        return (await service.ledger.call(service.ledger.store.lane, reservation.lane)).paid

    # Virtual time may run ahead while a store call is on its thread, so wait on the outcome, not on a time.
    with trio.fail_after(10**6):
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            await nursery.start(lambda task_status: run_submitter(book, dial, NODE, interval_s=10, ledger_key=LEDGER_KEY, task_status=task_status))
            while service.epochs_closed < 2 or await paid() != expected:
                await trio.sleep(30)
            nursery.cancel_scope.cancel()
    assert await paid() == expected
    assert book.unsettled() == []
    book.close()


async def test_a_closed_lane_settles_the_nodes_voucher_and_releases_its_reserve_an_epoch_later(tmp_path):
    """CloseLane: only its consumer may close it; the expiry shrinks to one epoch (never grows); the node's
    voucher submitted meanwhile still settles; the unused reserve comes back after expiry + grace, not in 24 h."""
    now = [NOW]
    store = SqliteStore(tmp_path / "ledger.sqlite3")
    service = LedgerService(store, LEDGER, LedgerConfig(epoch_s=600, lane_ttl_s=24 * 3600), clock=lambda: now[0])
    store.deposit(ALICE.public_key.hex(), 3_000_000, now_ms=1)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                shim = await connect(nursery, service, ALICE)
                node = await connect(nursery, service, NODE)
                mallory = await connect(nursery, service, MALLORY)
                for client in (shim, node, mallory):
                    client.clock = lambda: now[0]
                reservation = await shim.open_lane(NODE.public_key.hex(), 1_000_000, price_input_per_m=PRICE_IN,
                                                   price_output_per_m=PRICE_OUT)
                assert reservation.expires_ms == int(NOW * 1000) + 24 * 3600 * 1000
                pair = Pair(ALICE, NODE, reservation)
                voucher = pair.use(prompt=100, completion=300)
                with pytest.raises(InvalidSignature):  # signed by another key than the lane's consumer
                    await mallory.close_lane(reservation.lane)
                closed = await shim.close_lane(reservation.lane)
                assert closed.expires_ms == int(NOW * 1000) + 600_000 and closed.cap == reservation.cap
                now[0] += 60
                assert (await shim.close_lane(reservation.lane)).expires_ms == closed.expires_ms  # never lengthened
                assert [r.status for r in await node.submit([voucher])] == ["queued"]
                now[0] += 600  # past expiry, within the grace of one epoch: settles, not released yet
                outcome = await service.settle_now()
                assert [r.paid for r in outcome.rows] == [voucher.cum_cost]
                assert await shim.balance() == (2_000_000, 1_000_000 - voucher.cum_cost)
                now[0] += 600  # expiry + grace passed: the unused reserve is back
                outcome = await service.settle_now()
                assert outcome.summary.released == 1_000_000 - voucher.cum_cost
                assert await shim.balance() == (3_000_000 - voucher.cum_cost, 0)
                assert store.totals().conserved
                for client in (shim, node, mallory):
                    await client.close()
    finally:
        store.close()
