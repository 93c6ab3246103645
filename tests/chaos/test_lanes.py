"""A lane the shim reuses right after a clean finish must be accepted by the node.

Memory network, real engine, real ledger service (SQLite) opening the lane, the shim's own
`ConsumerMeter` and infer client; the node's voucher store is a slow disk (a write on the store's
worker thread that completes when the test lets it, as an fsync on a busy machine), which makes
the window deterministic: the shim has the node's
countersigned final voucher (so it reuses the lane) while the node is still storing it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from darkbloom.api.client import open_infer
from darkbloom.api.metering import ConsumerMeter, session_bytes
from darkbloom.config import LedgerConfig
from darkbloom.identity import Identity
from darkbloom.inference.catalog import model_info
from darkbloom.inference.engine import open_engine
from darkbloom.ledger.service import LedgerService
from darkbloom.ledger.store import open_store
from darkbloom.node.serve import InferenceService, NodeMeter, serve_inference
from darkbloom.p2p.memory import MemoryHub, open_memory_network
from darkbloom.wire.infer import InferRequest
from darkbloom.wire.ledger import LEDGER_PROTOCOL

CHAT = "tiny-chat"
PRICE_IN, PRICE_OUT = 100_000, 400_000


@dataclass
class PaidNetwork:
    """A ledger (its store), a paying node serving the tiny model, and a shim's ConsumerMeter."""

    store: Any
    node: Any
    shim_net: Any
    shim_id: Identity
    meter: NodeMeter
    consumer: ConsumerMeter

    def parts(self) -> tuple[Any, Any, Any, NodeMeter, ConsumerMeter]:
        return self.store, self.node, self.shim_net, self.meter, self.consumer


@asynccontextmanager
async def paid_network(model_dir: Path, tmp_path: Path, cfg: LedgerConfig, *, deposit: int = 10_000_000,
                       prices: tuple[int, int] = (PRICE_IN, PRICE_OUT), voucher_timeout_s: float = 5,
                       store_voucher: Any = None, on_served: Any = None) -> AsyncIterator[PaidNetwork]:
    """Ledger, node and shim on one memory hub, the shim's account funded with `deposit`; the node
    vouchers every 4 tokens at `prices` (micro-credits per 1M input and output tokens)."""
    hub = MemoryHub()
    ledger_id, node_id, shim_id = Identity.generate(), Identity.generate(), Identity.generate()
    store = open_store("", tmp_path)
    store.deposit(shim_id.public_key.hex(), deposit, now_ms=int(time.time() * 1000))
    info = model_info(CHAT, model_dir, "chat")
    try:
        async with open_engine([(CHAT, model_dir)], self_benchmark=False) as engine, \
                open_memory_network(hub, ledger_id) as ledger_net, \
                open_memory_network(hub, node_id) as node, \
                open_memory_network(hub, shim_id) as shim_net:
            ledger_net.serve(LEDGER_PROTOCOL, LedgerService(store, ledger_id, cfg).handle)
            meter = NodeMeter(node_id, ledger_key=ledger_id.public_key.hex(), price_input_per_m=prices[0],
                              price_output_per_m=prices[1], voucher_every_tokens=4,
                              voucher_timeout_s=voucher_timeout_s, store=store_voucher)
            serve_inference(node, InferenceService(engine, digests={CHAT: info.digest}, meter=meter,
                                                   on_served=on_served))
            consumer = ConsumerMeter(shim_net, shim_id, cfg, ledger_peer=ledger_net.peer_id)
            yield PaidNetwork(store, node, shim_net, shim_id, meter, consumer)
    finally:
        store.close()


async def test_a_lane_reused_right_after_a_clean_finish_is_accepted(tiny_model_dir, tmp_path):
    cfg = LedgerConfig(voucher_every_tokens=4)
    kept: list = []

    import threading

    disk = threading.Event()  # the slow disk: once armed, a write completes when the test lets it (or after 5 s)
    armed = threading.Event()

    def slow_put(voucher) -> None:  # on the store's worker thread, as the daemon's VoucherBook.put
        if armed.is_set():
            disk.wait(5)
        kept.append(voucher)

    async def slow_disk_store(voucher) -> None:  # as the node daemon keeps each countersigned voucher
        await trio.to_thread.run_sync(slow_put, voucher)

    served: list = []
    both_served = trio.Event()

    def on_served(record) -> None:
        served.append(record)
        if len(served) == 2:
            both_served.set()

    with trio.fail_after(60):
        async with paid_network(tiny_model_dir, tmp_path, cfg, store_voucher=slow_disk_store,
                                 on_served=on_served) as paid:
            store, node, shim_net, meter, consumer = paid.parts()
            lane = await consumer.acquire(node.peer_id, price_input_per_m=PRICE_IN, price_output_per_m=PRICE_OUT)
            assert lane is not None
            outcomes: list[str] = []
            released = trio.Event()

            def on_release(outcome: str) -> None:
                outcomes.append(outcome)
                released.set()

            def request(i: int) -> InferRequest:
                return InferRequest(request_id=f"r{i}", kind="chat", model=CHAT, session=session_bytes(lane),
                                    params={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})

            first = await open_infer(shim_net, node.peer_id, request(0), lane=lane, on_release=on_release)
            while await first.receive() is not None:
                pass
            armed.set()  # the final voucher (signed on Done) is the slow write
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first.aclose)  # waits for the node's countersigned final voucher
                with trio.fail_after(4):  # before the slow write completes
                    await released.wait()
                assert outcomes == ["clean"]  # the shim would lend this lane again now
                try:
                    second = await open_infer(shim_net, node.peer_id, request(1), lane=lane)
                    while await second.receive() is not None:
                        pass
                    await second.aclose()
                finally:
                    disk.set()
            assert kept
            # both requests were served in full and recorded so (not cancelled by the client's close)
            with trio.fail_after(10):
                await both_served.wait()
            assert sorted(r.request_id for r in served) == ["r0", "r1"]
            assert [r.outcome for r in served] == ["done", "done"], served
            await consumer.aclose()


async def test_a_lane_refused_as_busy_is_retried_on_the_same_node_with_another_lane(tiny_model_dir, tmp_path, monkeypatch):
    """The shim lends a lane the node still serves a request on: the node waits (bounded), then
    refuses it as LaneBusy; `open_metered` asks the same node again with a new lane and succeeds."""
    import darkbloom.node.serve as serve_mod
    from darkbloom.api.metering import open_metered

    monkeypatch.setattr(serve_mod, "LANE_BUSY_WAIT_S", 0.2)
    cfg = LedgerConfig(voucher_every_tokens=4)
    with trio.fail_after(60):
        async with paid_network(tiny_model_dir, tmp_path, cfg) as paid:
            store, node, shim_net, meter, consumer = paid.parts()

            def request(i: int) -> InferRequest:
                return InferRequest(request_id=f"r{i}", kind="chat", model=CHAT,
                                    params={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})

            first = await open_metered(shim_net, consumer, node.peer_id, request(0),
                                       price_input_per_m=PRICE_IN, price_output_per_m=PRICE_OUT)
            busy_lane = first.lane
            assert busy_lane is not None and busy_lane.lane in meter.busy
            consumer.release(node.peer_id, busy_lane, "clean")  # as if the shim lent it again too early
            second = await open_metered(shim_net, consumer, node.peer_id, request(1),
                                        price_input_per_m=PRICE_IN, price_output_per_m=PRICE_OUT)
            assert second.lane is not None and second.lane.lane != busy_lane.lane
            assert consumer.opened == 2
            for call in (second, first):
                while await call.receive() is not None:
                    pass
                await call.aclose()
            assert not meter.busy
            await consumer.aclose()


async def test_a_lane_dropped_after_a_cut_request_is_closed_at_the_ledger(tiny_model_dir, tmp_path):
    """A request reset mid-answer drops its lane (the chains may differ); the shim closes it at the
    ledger, so its reserve is released about an epoch later instead of at the 24 h lane expiry."""
    from darkbloom.api.metering import open_metered

    cfg = LedgerConfig(voucher_every_tokens=4, epoch_s=600, lane_ttl_s=24 * 3600)
    with trio.fail_after(60):
        async with paid_network(tiny_model_dir, tmp_path, cfg) as paid:
            store, node, shim_net, meter, consumer = paid.parts()
            request = InferRequest(request_id="cut", kind="chat", model=CHAT,
                                   params={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50})
            call = await open_metered(shim_net, consumer, node.peer_id, request,
                                      price_input_per_m=PRICE_IN, price_output_per_m=PRICE_OUT)
            lane = call.lane.lane
            opened = store.lane(lane)
            assert opened.expires_ms - opened.opened_ms == 24 * 3600 * 1000
            await call.receive()
            await call.aclose()  # before Done: reset, the lane is dropped
            assert consumer.closed == 1
            closed = store.lane(lane)
            assert closed.open and closed.expires_ms <= int(time.time() * 1000) + 600_000
            assert closed.expires_ms >= opened.opened_ms
            await consumer.aclose()


async def test_a_lane_near_its_cap_is_topped_up_mid_request_instead_of_failing(tiny_model_dir, tmp_path):
    """A request that costs several lane reserves: the shim tops the lane up at the (real) ledger as it
    runs low, sends the raised reservation to the node ahead of the next voucher, and the request is
    served in full; the ledger's reservation grew, the consumer's balance paid for it, nothing else."""
    from darkbloom.api.metering import open_metered

    price = 1_000_000  # one micro-credit per token, so a 100-token answer costs over 100
    cfg = LedgerConfig(voucher_every_tokens=4, lane_reserve=40)
    served: list = []
    handled = trio.Event()

    def on_served(record) -> None:
        served.append(record)
        handled.set()

    with trio.fail_after(60):
        async with paid_network(tiny_model_dir, tmp_path, cfg, deposit=10_000, prices=(price, price),
                                 on_served=on_served) as paid:
            store, node, shim_net, meter, consumer = paid.parts()
            request = InferRequest(request_id="big", kind="chat", model=CHAT, params={
                "messages": [{"role": "user", "content": "go"}], "max_tokens": 100,
                "logit_bias": {"0": -100, "2": -100}})
            call = await open_metered(shim_net, consumer, node.peer_id, request,
                                      price_input_per_m=price, price_output_per_m=price)
            tokens = 0
            while (frame := await call.receive()) is not None:
                tokens += getattr(frame, "tokens", 0)
            await call.aclose()
            assert tokens == 100
            final = call.lane.countersigned_latest
            assert final is not None and final.cum_cost == call.done.usage.prompt_tokens + 100
            assert final.cum_cost > cfg.lane_reserve and consumer.topped_up >= 2
            state = store.lane(final.lane)
            assert state.cap == call.lane.reservation.cap == cfg.lane_reserve * (1 + consumer.topped_up)
            assert store.balance(paid.shim_id.public_key.hex()) == (10_000 - state.cap, state.cap)
            await handled.wait()
            assert [r.outcome for r in served] == ["done"]
            await consumer.aclose()


async def test_a_paying_node_wrongly_taken_for_free_is_paid_at_its_next_request(tiny_model_dir, tmp_path):
    """Defect 8: a lane whose stream ended before the node's first countersign (a relay circuit that
    died) marks the node "free"; when that node then asks for payment, the shim pays it at once
    (same request, with a lane) instead of sending it unpaid requests for 10 minutes."""
    from darkbloom.api.metering import open_metered

    cfg = LedgerConfig(voucher_every_tokens=4)
    with trio.fail_after(60):
        async with paid_network(tiny_model_dir, tmp_path, cfg) as paid:
            store, node, shim_net, meter, consumer = paid.parts()
            lane = await consumer.acquire(node.peer_id, price_input_per_m=PRICE_IN, price_output_per_m=PRICE_OUT)
            consumer.release(node.peer_id, lane, "unmetered")  # as after a circuit cut before any countersign
            assert await consumer.acquire(node.peer_id, price_input_per_m=PRICE_IN,
                                          price_output_per_m=PRICE_OUT) is None  # taken for free
            request = InferRequest(request_id="again", kind="chat", model=CHAT,
                                   params={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
            call = await open_metered(shim_net, consumer, node.peer_id, request,
                                      price_input_per_m=PRICE_IN, price_output_per_m=PRICE_OUT)
            assert call.lane is not None
            while await call.receive() is not None:
                pass
            await call.aclose()
            assert call.lane.countersigned_latest is not None
            assert consumer.opened == 2
            await consumer.aclose()


async def test_tokens_that_end_a_choice_without_text_are_paid_for_and_do_not_stall_the_lane(tiny_model_dir, tmp_path):
    """A token the node counts but sends no text for (an end-of-sequence token, folded into
    ChoiceEnd) must be covered by the shim's vouchers too. When it was not, the node's unvouched
    count grew by one per such request on a reused lane, until a later request's first tokens
    paused for a voucher the shim did not know it owed and the node ended the stream (the 30-minute
    soak's 1.4 % of errors: "vouchers stopped arriving")."""
    cfg = LedgerConfig(voucher_every_tokens=4)  # the node pauses beyond 8 unvouched tokens
    served: list = []
    with trio.fail_after(60):
        async with paid_network(tiny_model_dir, tmp_path, cfg, voucher_timeout_s=1,
                                 on_served=served.append) as paid:
            store, node, shim_net, meter, consumer = paid.parts()
            lane = await consumer.acquire(node.peer_id, price_input_per_m=PRICE_IN, price_output_per_m=PRICE_OUT)
            assert lane is not None

            async def ask(i: int, bias: dict[str, int], max_tokens: int) -> list:
                req = InferRequest(request_id=f"r{i}", kind="chat", model=CHAT, session=session_bytes(lane),
                                   params={"messages": [{"role": "user", "content": "hi"}],
                                           "max_tokens": max_tokens, "logit_bias": bias})
                call = await open_infer(shim_net, node.peer_id, req, lane=lane)
                frames = []
                while (frame := await call.receive()) is not None:
                    frames.append(frame)
                await call.aclose()
                return frames

            for i in range(12):  # the end token at once: one completion token, no text
                frames = await ask(i, {"2": 100}, 4)
                ends = [f for f in frames if type(f).__name__ == "ChoiceEnd"]
                assert ends and ends[0].completion_tokens >= 1
                assert sum(f.tokens for f in frames if type(f).__name__ == "Delta") < ends[0].completion_tokens
            frames = await ask(99, {"0": -100, "2": -100}, 12)  # then an ordinary answer on the same lane
            assert type(frames[-1]).__name__ == "Done" and frames[-1].usage.completion_tokens == 12
            assert all(r.outcome == "done" for r in served), [r.outcome for r in served]
            node_lane = meter.lanes[lane.lane]
            assert node_lane.lag_tokens == 0  # every token the node counted is vouched for
            await consumer.aclose()
