"""kill -9 of a process settling a big batch, at random points, 20 times: nothing lost, nothing paid twice.

A real subprocess submits and settles three rounds of vouchers on a real SQLite file; the
test SIGKILLs it after a random delay (the random delay chooses the kill point; it is not
used to wait for anything), reopens the file and checks the invariants, then lets the
ledger finish and checks the final state is exactly what the vouchers say.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from darkbloom.ledger.store import SqliteStore
from darkbloom.wire.codec import encode

from .helpers import LEDGER, PPM, Pair, open_request, seeded

LANES_PER_NODE = 150
NODES = 3
ROUNDS = 3
RUNS = 20
CHILD = Path(__file__).with_name("crash_child.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A ledger with funded consumers and open lanes, plus ROUNDS of countersigned vouchers."""
    base = tmp_path_factory.mktemp("crash")
    db_path = base / "template.sqlite3"
    store = SqliteStore(db_path)
    consumers = [seeded(100 + i) for i in range(10)]
    nodes = [seeded(200 + i) for i in range(NODES)]
    for c in consumers:
        store.deposit(c.public_key.hex(), 10**12, now_ms=1)
    rng = random.Random(7)
    pairs: dict[int, list[Pair]] = {}
    for n, node in enumerate(nodes):
        pairs[n] = []
        for i in range(LANES_PER_NODE):
            consumer = consumers[(n * LANES_PER_NODE + i) % len(consumers)]
            cap = rng.choice([50, 500, 5_000, 10**6])  # small caps make some lanes hit their reservation
            reservation = store.open_lane(open_request(consumer, node, cap, nonce=rng.randbytes(16)), ledger=LEDGER, now_ms=1000, ttl_ms=10**9)
            pair = Pair(consumer, node, reservation)
            # both ends accept usage beyond the cap, so the ledger's own cap enforcement is exercised
            pair.n.reservation = pair.c.reservation = dataclasses.replace(reservation, cap=10**12)
            pairs[n].append(pair)
    rounds, final = [], {}
    for _ in range(ROUNDS):
        batches = []
        for n, node in enumerate(nodes):
            blobs = []
            for pair in pairs[n]:
                v = pair.use(prompt=rng.randint(0, 400), completion=rng.randint(1, 400))
                blobs.append(encode(v))
                final[v.lane] = v
            batches.append([node.public_key.hex(), blobs])
        rounds.append(batches)
    store.close()
    with sqlite3.connect(db_path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    vouchers_path = base / "vouchers.msgpack"
    vouchers_path.write_bytes(msgpack.packb(rounds, use_bin_type=True))
    caps = {}
    with sqlite3.connect(db_path) as db:
        caps = dict(db.execute("SELECT lane, cap FROM lanes").fetchall())
    return db_path, vouchers_path, final, caps, nodes


def _invariants(store: SqliteStore, db_path: Path, caps: dict[str, int]) -> None:
    totals = store.totals()
    assert totals.conserved, totals
    with sqlite3.connect(db_path) as db:
        paid_by_rows = dict(db.execute("SELECT lane, 0 FROM lanes").fetchall())
        seen = set()
        for (blob,) in db.execute("SELECT row_data FROM settled_rows"):
            row = msgpack.unpackb(blob)
            key = (row["lane"], row["seq"])
            assert key not in seen, f"voucher {key} paid twice"
            seen.add(key)
            paid_by_rows[row["lane"]] += row["paid"]
        for lane, paid, cap in db.execute("SELECT lane, paid, cap FROM lanes"):
            assert paid == paid_by_rows[lane], f"lane {lane}: rows paid {paid_by_rows[lane]}, lane says {paid}"
            assert paid <= cap == caps[lane]
        epochs = db.execute("SELECT count(*) FROM epochs").fetchone()[0]
        assert db.execute("SELECT num FROM meta WHERE key = 'epoch'").fetchone()[0] == epochs
        for (blob,) in db.execute("SELECT summary FROM epochs"):
            summary = msgpack.unpackb(blob)
            count = db.execute("SELECT count(*) FROM settled_rows WHERE epoch = ?", (summary["epoch"],)).fetchone()[0]
            assert count == summary["row_count"]


def test_kill_minus_nine_during_settlement(template, tmp_path):
    db_template, vouchers_path, final, caps, nodes = template
    rng = random.Random(2026)
    killed_in: dict[str, int] = {}
    # one uninterrupted run measures each phase (submit r, settle r), so kill points can be spread inside them
    probe = tmp_path / "probe.sqlite3"
    shutil.copy(db_template, probe)
    child = subprocess.Popen([sys.executable, str(CHILD), str(probe), str(vouchers_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    phases: list[tuple[str, float]] = []  # (line that starts the phase, its duration)
    line, mark = child.stdout.readline().strip(), time.monotonic()
    while line != "done":
        following = child.stdout.readline().strip()
        now = time.monotonic()
        phases.append((line, now - mark))
        line, mark = following, now
    assert child.wait(timeout=120) == 0
    child.stdout.close()
    print("phases:", [(p, round(d, 2)) for p, d in phases])
    assert [p for p, _ in phases] == ["ready", "submitted 1", "settled 1", "submitted 2", "settled 2", "submitted 3", "settled 3"]

    for run in range(RUNS):
        db_path = tmp_path / f"run{run}.sqlite3"
        shutil.copy(db_template, db_path)
        child = subprocess.Popen(
            [sys.executable, str(CHILD), str(db_path), str(vouchers_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        start_line, duration = rng.choice(phases)
        progress = []
        while True:  # wait until the child reports the start of the chosen phase
            line = child.stdout.readline().strip()
            assert line, "the child ended early"
            progress.append(line)
            if line == start_line:
                break
        time.sleep(rng.uniform(0.0, duration))  # the kill point: somewhere inside that phase
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        progress += child.stdout.read().split("\n")
        child.stdout.close()
        last = [line for line in progress if line][-1]
        killed_in[last] = killed_in.get(last, 0) + 1
        submitted = max([int(line.split()[1]) for line in progress if line.startswith("submitted")], default=0)

        store = SqliteStore(db_path)
        try:
            _invariants(store, db_path, caps)
            # nothing committed is lost: every lane has its submitted round settled or still pending
            with sqlite3.connect(db_path) as db:
                have = dict(db.execute("SELECT lane, seq FROM lanes").fetchall())
                for lane, seq in db.execute("SELECT lane, seq FROM pending"):
                    have[lane] = max(have[lane], seq)
            assert all(seq >= submitted for seq in have.values())
            # the node resubmits its latest vouchers; the ledger finishes
            for node in nodes:
                store.submit(node.public_key.hex(), [v for v in final.values() if v.lane in caps and _node_of(v, db_path) == node.public_key.hex()])
            store.settle(ledger=LEDGER, now_ms=99_000, operator_ppm=PPM, grace_ms=600_000)
            _invariants(store, db_path, caps)
            for lane_id, voucher in final.items():
                state = store.lane(lane_id)
                assert state.seq == voucher.seq == ROUNDS
                assert state.paid == min(voucher.cum_cost, caps[lane_id])
        finally:
            store.close()
        db_path.unlink()
    # the kill points really landed in different phases (reported with -s for inspection)
    print("kill points:", killed_in)
    assert sum(killed_in.values()) == RUNS


_NODE_CACHE: dict[str, str] = {}


def _node_of(voucher, db_path: Path) -> str:
    if not _NODE_CACHE:
        with sqlite3.connect(db_path) as db:
            _NODE_CACHE.update(dict(db.execute("SELECT lane, node FROM lanes").fetchall()))
    return _NODE_CACHE[voucher.lane]
