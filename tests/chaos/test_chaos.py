"""Chaos with real processes on 127.0.0.1: nodes SIGKILLed and restarted while requests run, the
relay killed and restarted, the shim killed mid-stream.

Roles are `python -m darkbloom relay|node|shim` processes (tests/chaos/netproc.py) on the tiny
test model; the client is the official openai SDK. An outcome is "complete" (every choice
finished, the stream reached its end) or "clean" (an OpenAI error object: an HTTP error with
a JSON body, or an error event ending a stream). Anything else fails the test: a timeout
(a hang), a refused connection (a dead shim), a stream that stops without a finish reason.
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai
import pytest

from .netproc import CHAT, ProcNetwork

pytestmark = pytest.mark.slow

REQUESTS = 100
CLIENTS = 4
CLIENT_TIMEOUT_S = 60.0  # the shim's request_timeout_s; a request still open after it is a hang
NO_END = {"0": -100, "2": -100}  # the tiny model's end tokens: keep it generating to max_tokens


@dataclass
class Outcome:
    kind: str  # "complete" | "clean" | "hang" | "unreachable" | "truncated" | "bad"
    detail: str
    seconds: float
    node: str = ""


def one_request(client: openai.OpenAI, i: int, rng: random.Random) -> Outcome:
    started = time.monotonic()
    messages = [{"role": "user", "content": f"request {i}: say something"}]
    max_tokens = rng.randint(4, 48)
    try:
        if i % 2:
            stream = client.chat.completions.create(model=CHAT, messages=messages, max_tokens=max_tokens, stream=True,
                                                    extra_body={"logit_bias": NO_END})
            finish = None
            for chunk in stream:
                for choice in chunk.choices:
                    finish = choice.finish_reason or finish
            if finish not in ("stop", "length"):
                return Outcome("truncated", f"stream ended without a finish reason ({finish})", time.monotonic() - started)
            return Outcome("complete", "stream", time.monotonic() - started)
        raw = client.chat.completions.with_raw_response.create(model=CHAT, messages=messages, max_tokens=max_tokens,
                                                                extra_body={"logit_bias": NO_END})
        r = raw.parse()
        if r.choices[0].finish_reason not in ("stop", "length") or r.usage.completion_tokens < 1:
            return Outcome("bad", f"finish={r.choices[0].finish_reason}", time.monotonic() - started)
        return Outcome("complete", "json", time.monotonic() - started, raw.headers.get("x-darkbloom-node", ""))
    except openai.APITimeoutError:
        return Outcome("hang", "no answer within the client timeout", time.monotonic() - started)
    except openai.APIConnectionError as exc:
        return Outcome("unreachable", type(exc).__name__, time.monotonic() - started)
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        ok = bool(body.get("message")) and exc.status_code in (429, 500, 502, 503, 504)
        return Outcome("clean" if ok else "bad", f"{exc.status_code} {body.get('code')}", time.monotonic() - started)
    except openai.APIError as exc:  # an error event that ended a stream
        ok = isinstance(exc.body, dict) and bool(exc.body.get("message"))
        return Outcome("clean" if ok else "bad", f"stream error {exc.message[:60]}", time.monotonic() - started)


@pytest.fixture
def procnet(tmp_path, tiny_model_dir):
    net = ProcNetwork(tmp_path, tiny_model_dir)
    try:
        yield net
    finally:
        net.stop()


def test_requests_under_random_sigkills_end_cleanly_and_settle_exactly(procnet):
    """Safety under chaos: every request ends complete or with a clean OpenAI error, none hangs; after
    graceful stops and one settlement no voucher is lost or charged twice and credits are conserved."""
    net = procnet
    rng = random.Random(20261126)
    net.start_relay()
    names = ["node-a", "node-b", "node-c"]
    for name in names:
        net.start_node(name)
    for name in names:
        net.wait_node(name)
    net.start_shim()
    client = openai.OpenAI(base_url=net.shim_url, api_key="local", timeout=CLIENT_TIMEOUT_S, max_retries=0)
    warm = one_request(client, -2, rng)
    assert warm.kind == "complete", warm

    done = threading.Event()
    finished = threading.Semaphore(0)  # one release per finished request: chaos keeps pace with the load
    kills: list[tuple[str, float]] = []
    chaos_errors: list[BaseException] = []

    def chaos() -> None:
        """After every 3-8 finished requests: SIGKILL a live node (keeping one alive) or start a dead one."""
        try:
            while not done.is_set():
                for _ in range(rng.randint(3, 8)):
                    while not finished.acquire(timeout=0.5):
                        if done.is_set():
                            return
                name = rng.choice(names)
                node = net.nodes[name]
                if node.alive and sum(net.nodes[n].alive for n in names) >= 2:
                    node.kill()  # SIGKILL: no goodbye to anyone
                    kills.append((name, time.monotonic()))
                elif not node.alive:
                    node.start()
        except BaseException as exc:  # reported by the test thread
            chaos_errors.append(exc)

    def request(i: int) -> Outcome:
        try:
            return one_request(client, i, random.Random(i))
        finally:
            finished.release()

    killer = threading.Thread(target=chaos, daemon=True)
    killer.start()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            outcomes = list(pool.map(request, range(REQUESTS)))
    finally:
        done.set()
        killer.join(timeout=120)
    assert not chaos_errors, chaos_errors
    by_kind: dict[str, int] = {}
    for o in outcomes:
        by_kind[o.kind] = by_kind.get(o.kind, 0) + 1
    summary = json.dumps({"outcomes": by_kind, "kills": len(kills),
                          "max_s": round(max(o.seconds for o in outcomes), 2),
                          "clean_errors": sorted({o.detail.split(":")[0] for o in outcomes if o.kind == "clean"})})
    print(f"CHAOS {summary}")  # the figure in docs/RELIABILITY.md
    assert len(kills) >= 5, summary
    assert set(by_kind) <= {"complete", "clean"}, summary  # no hang, no dead shim, no silent truncation
    assert max(o.seconds for o in outcomes) < CLIENT_TIMEOUT_S
    # after the storm, with every node restarted and announced
    for name in names:
        if not net.nodes[name].alive:
            net.nodes[name].start()
    for name in names:
        net.wait_node(name)
    after = [one_request(client, 1000 + k, rng) for k in range(4)]
    print(f"CHAOS after the storm: {[o.kind for o in after]}")
    assert {o.kind for o in after} <= {"complete", "clean"}, after
    client.close()
    _check_settlement(net, names)


def _check_settlement(net: ProcNetwork, names: list[str]) -> None:
    """Graceful stops (nodes submit what they hold), one settlement, then: every lane the nodes hold a
    voucher for is settled at exactly that voucher (none lost, none counted twice), the consumer paid
    exactly the sum, and the ledger conserves credits."""
    from darkbloom.identity import load_or_create_identity
    from darkbloom.ledger.book import VoucherBook
    from darkbloom.ledger.store import open_store

    from .netproc import CREDITS

    assert net.shim.interrupt() == 0
    for name in names:
        assert net.nodes[name].interrupt() == 0, "".join(net.nodes[name].output[-20:])
    assert net.relay.interrupt() == 0
    print("SETTLE", net.settle().strip())
    latest: dict[str, object] = {}
    for name in names:
        with VoucherBook(net.root / name / "vouchers.sqlite3") as book:
            lanes = [r[0] for r in book._db.execute("SELECT lane FROM lanes").fetchall()]
            for lane in lanes:
                v = book.latest(lane)
                if v is not None:
                    latest[lane] = v
    assert latest, "no paid request reached a node: the test proves nothing about vouchers"
    consumer = load_or_create_identity(net.root / "shim" / "shim").public_key.hex()
    store = open_store("", net.root / "relay")
    try:
        paid = 0
        for lane, v in latest.items():
            state = store.lane(lane)
            assert state is not None, f"lane {lane[:8]} unknown to the ledger"
            assert state.seq == v.seq, f"lane {lane[:8]}: ledger settled seq {state.seq}, node holds {v.seq}"
            assert state.paid == min(v.cum_cost, state.cap), (lane[:8], state.paid, v.cum_cost)
            paid += state.paid
        balance, reserved = store.balance(consumer)
        assert CREDITS - balance - reserved == paid  # charged exactly once per settled voucher
        assert store.totals().conserved
        print(f"VOUCHERS lanes={len(latest)} paid={paid} seqs={sum(v.seq for v in latest.values())}")
    finally:
        store.close()


def _status(url: str) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + "/status.json", timeout=10) as r:
        return json.load(r)


def _ask(client: openai.OpenAI, model: str, **kw):
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, **kw)


def test_relay_restart_and_shim_killed_mid_stream(procnet):
    net = procnet
    net.start_relay()
    # Both nodes serve unpaid requests too. The ledger lives on the relay: once the shim finds it down it
    # goes unpaid for 60 s (ConsumerMeter, defect 3), and a relayed request whose circuit dies before the
    # node's final countersigned voucher arrives marks that node "serves free" for 600 s (defect 8). A node
    # requiring payment then refuses every request with payment_required until long after the 30 s this
    # test allows; that was this test's flakiness (it passed only when the relay stayed down past 60 s and
    # the countersign won the race with the kill). Both defects are fixed since; serving unpaid keeps this
    # test about the relay restart alone. The paid path without a ledger is tested on its own.
    net.start_node("direct", model_id="tiny-direct", require_payment=False)
    # a long bootstrap backoff: while it sleeps, the node's ledger client (earnings every 5 s) reconnects first
    net.start_node("private", reachability="private", model_id="tiny-relayed", bootstrap_retry_max_s=30.0,
                   require_payment=False)
    net.wait_node("direct")
    net.wait_node("private")
    net.nodes["private"].wait_for(r"reserved on 1 relay", after=0)
    net.start_shim()
    client = openai.OpenAI(base_url=net.shim_url, api_key="local", timeout=CLIENT_TIMEOUT_S, max_retries=0)
    assert _ask(client, "tiny-direct").headers["x-darkbloom-route"] == "direct"
    assert _ask(client, "tiny-relayed").headers["x-darkbloom-route"] == "relayed"

    # --- the relay dies: the direct path keeps serving -------------------------------------
    net.relay.kill()
    killed_at = time.monotonic()
    while_down = [_ask(client, "tiny-direct") for _ in range(5)]
    assert all(r.parse().choices[0].finish_reason in ("stop", "length") for r in while_down)
    assert {r.headers["x-darkbloom-route"] for r in while_down} == {"direct"}

    # --- it comes back on the same address: the private node holds a new reservation in 30 s
    net.nodes["private"].wait_for(r"retrying in 16 s", timeout=60)  # its bootstrap loop sleeps 16 s now
    mark = net.nodes["private"].mark()
    net.relay.start()
    net.wait_relay()
    restarted_at = time.monotonic()
    net.nodes["private"].wait_for(r"reserved on 1 relay", timeout=30, after=mark)
    reserved_in = time.monotonic() - restarted_at
    relayed = None
    while time.monotonic() < restarted_at + 30:  # the shim reaches it through the new reservation
        try:
            relayed = _ask(client, "tiny-relayed")
            break
        except openai.APIStatusError as exc:
            assert exc.status_code in (502, 503), exc  # a clean "not yet", never a hang
            time.sleep(0.25)  # pace the retries
    # reached through the new reservation (on loopback DCUtR may then upgrade the circuit to a direct path)
    assert relayed is not None and relayed.headers["x-darkbloom-route"] in ("relayed", "hole-punched")
    print(f"RELAY down {restarted_at - killed_at:.1f} s, re-reserved {reserved_in:.1f} s after restart, "
          f"relayed answer {time.monotonic() - restarted_at:.1f} s after restart")

    # --- the shim dies mid-stream: the node frees the slot ---------------------------------
    node = net.nodes["direct"]
    stream = client.chat.completions.create(model="tiny-direct", messages=[{"role": "user", "content": "go on"}],
                                            max_tokens=4000, stream=True, extra_body={"logit_bias": NO_END})
    first = next(iter(stream))
    assert first.choices
    assert _status(net.node_status["direct"])["active"] == 1
    mark = node.mark()
    net.shim.kill()
    node.wait_for(r"outcome=cancelled", timeout=30, after=mark)
    # The handler logs the cancellation when it has posted the cancel to the engine thread, which
    # drops the request at its next step: the slot frees a moment later (the status page shows it).
    freed_by = time.monotonic() + 30
    while (status := _status(net.node_status["direct"]))["active"] and time.monotonic() < freed_by:
        time.sleep(0.1)  # pace the polling of another process's status page
    assert status["active"] == 0 and status["queued"] == 0
    assert status["completion_tokens"] < 4000  # it stopped generating; it did not run to max_tokens
    client.close()


def test_paid_direct_path_keeps_serving_while_the_relay_is_down(procnet):
    net = procnet
    net.start_relay()
    net.start_node("direct", model_id="tiny-direct")  # paid serving, the default
    net.wait_node("direct")
    net.start_shim()
    client = openai.OpenAI(base_url=net.shim_url, api_key="local", timeout=CLIENT_TIMEOUT_S, max_retries=0)
    for _ in range(3):
        assert _ask(client, "tiny-direct").headers["x-darkbloom-route"] == "direct"
    net.relay.kill()
    outcomes: list[object] = []

    def one(_: int) -> None:
        try:
            outcomes.append(_ask(client, "tiny-direct").parse().choices[0].finish_reason)
        except openai.APIStatusError as exc:
            outcomes.append(exc.status_code)

    with ThreadPoolExecutor(6) as pool:  # six at once need more lanes than the (at most three) the shim holds
        list(pool.map(one, range(6)))
    client.close()
    assert all(o in ("stop", "length") for o in outcomes), outcomes
