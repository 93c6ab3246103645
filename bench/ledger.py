"""Benchmark the ledger: vouchers verified and settled per second (SQLite, PostgreSQL), and a 100,000-voucher epoch.

    .venv/bin/python bench/ledger.py [--vouchers 20000] [--epoch-vouchers 100000] [--no-postgres]
                                     [--pg-url postgresql://...] [--out bench/results/ledger.json]

One process, one thread (the PostgreSQL server runs in its own processes). Each voucher is
on its own lane (a lane settles its latest voucher once per epoch), countersigned by its
node. Setup (deposits and lanes) is bulk-inserted; what is timed goes through the store
API: `submit` in batches of 2000 (the protocol maximum) and one `settle`, which verifies
both signatures of every voucher and writes rows, lanes and accounts in one transaction.
Without --pg-url, a throwaway PostgreSQL 15 cluster is started on 127.0.0.1 (as the
postgres user when root) and removed after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from darkbloom.identity import Identity
from darkbloom.ledger.receipts import GENESIS_CHAIN, cost_of, lane_id, sign, sign_voucher
from darkbloom.ledger.settlement import LaneState, check_voucher
from darkbloom.ledger.store import SqliteStore, SqlStore
from darkbloom.wire.codec import encode
from darkbloom.wire.ledger import LaneReservation, ProofReply, Voucher

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PRICE_IN, PRICE_OUT = 100_000, 400_000
LEDGER = Identity.from_seed(b"\x01" * 32)
CONSUMERS = [Identity.from_seed(bytes([2, i]) + b"\x00" * 30) for i in range(50)]
NODES = [Identity.from_seed(bytes([3, i]) + b"\x00" * 30) for i in range(10)]
NOW_MS = 1_800_000_000_000


def make_work(count: int, tag: int) -> tuple[list[LaneReservation], dict[str, list[Voucher]]]:
    """`count` reservations and one countersigned voucher on each, grouped by node."""
    reservations, by_node = [], {}
    for i in range(count):
        consumer, node = CONSUMERS[i % len(CONSUMERS)], NODES[i % len(NODES)]
        lane = lane_id(consumer.public_key.hex(), node.public_key.hex(), tag.to_bytes(4, "big") + i.to_bytes(12, "big"))
        reservation = sign(
            LEDGER,
            LaneReservation(
                lane=lane, consumer=consumer.public_key.hex(), node=node.public_key.hex(), cap=10_000_000,
                price_input_per_m=PRICE_IN, price_output_per_m=PRICE_OUT, opened_ms=NOW_MS, expires_ms=NOW_MS + 86_400_000,
                ledger=LEDGER.public_key.hex(),
            ),
        )
        prompt, completion = 200 + i % 1000, 50 + i % 500
        voucher = Voucher(
            lane=lane, seq=1, cum_prompt_tokens=prompt, cum_completion_tokens=completion,
            cum_cost=cost_of(prompt, completion, PRICE_IN, PRICE_OUT), chain=GENESIS_CHAIN, model_digest="sha256:bench",
            time_ms=NOW_MS,
        )
        voucher = sign_voucher(node, sign_voucher(consumer, voucher, "consumer"), "node")
        reservations.append(reservation)
        by_node.setdefault(node.public_key.hex(), []).append(voucher)
    return reservations, by_node


def bulk_setup(store: SqlStore, reservations: list[LaneReservation]) -> None:
    """Setup only: deposits and lanes inserted in one transaction (open_lane one by one is not what is measured)."""
    total = sum(r.cap for r in reservations)
    before = store.totals().deposited
    per_consumer: dict[str, int] = {}
    for r in reservations:
        per_consumer[r.consumer] = per_consumer.get(r.consumer, 0) + r.cap
    for consumer, amount in per_consumer.items():
        store.deposit(consumer, amount, now_ms=NOW_MS)
    with store._tx() as cur:
        cur.executemany(
            store._q(
                "INSERT INTO lanes (lane, consumer, node, cap, price_in, price_out, opened_ms, expires_ms, is_open, paid, seq, "
                "prompt_tokens, completion_tokens, cost, voucher_hash, reservation) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, 0, 0, 0, 0, 0, ?, ?)"
            ),
            [
                (r.lane, r.consumer, r.node, r.cap, r.price_input_per_m, r.price_output_per_m, r.opened_ms, r.expires_ms,
                 bytes(32), encode(r))
                for r in reservations
            ],
        )
        cur.executemany(
            store._q("UPDATE accounts SET balance = balance - ?, reserved = reserved + ? WHERE account = ?"),
            [(amount, amount, consumer) for consumer, amount in per_consumer.items()],
        )
    assert store.totals().deposited == before + total


def run_store(store: SqlStore, count: int, tag: int) -> dict[str, float]:
    reservations, by_node = make_work(count, tag)
    bulk_setup(store, reservations)
    t0, c0 = time.perf_counter(), time.process_time()
    for node, vouchers in by_node.items():
        for start in range(0, len(vouchers), 2000):
            results = store.submit(node, vouchers[start : start + 2000])
            assert all(r.status == "queued" for r in results)
    t1, c1 = time.perf_counter(), time.process_time()
    outcome = store.settle(ledger=LEDGER, now_ms=NOW_MS + 1000, operator_ppm=950_000, grace_ms=600_000)
    t2, c2 = time.perf_counter(), time.process_time()
    assert len(outcome.rows) == count and not outcome.rejected
    assert store.totals().conserved
    row, path, summary = store.proof(outcome.summary.epoch, count // 2)
    proof_bytes = len(encode(ProofReply(row=row, path=path, summary=summary)))
    return {
        "vouchers": count,
        "submit_s": t1 - t0,
        "settle_s": t2 - t1,
        "submit_per_s": count / (t1 - t0),
        "settle_per_s": count / (t2 - t1),
        "verified_and_settled_per_s": count / (t2 - t0),
        # per second of this process's own CPU time: what one core does when it is not shared
        # (for PostgreSQL the server's CPU is not in it)
        "verified_and_settled_per_cpu_s": count / (c2 - c0),
        "proof_bytes": proof_bytes,
        "proof_steps": len(path),
    }


def verify_only(count: int) -> dict[str, float]:
    """Pure check_voucher with both signatures, no store: the ceiling."""
    reservations, by_node = make_work(count, 99)
    lanes = {
        r.lane: LaneState(lane=r.lane, consumer=r.consumer, node=r.node, cap=r.cap, price_input_per_m=r.price_input_per_m,
                          price_output_per_m=r.price_output_per_m, opened_ms=r.opened_ms, expires_ms=r.expires_ms)
        for r in reservations
    }
    vouchers = [v for vs in by_node.values() for v in vs]
    t0, c0 = time.perf_counter(), time.process_time()
    for v in vouchers:
        check_voucher(v, lanes[v.lane])
    return {"per_s": count / (time.perf_counter() - t0), "per_cpu_s": count / (time.process_time() - c0)}


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    base = Path(tempfile.mkdtemp(prefix="darkbloom-bench-pg-"))
    root = os.geteuid() == 0
    as_pg = (lambda cmd: ["runuser", "-u", "postgres", "--"] + cmd) if root else (lambda cmd: cmd)
    if root:
        shutil.chown(base, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = base / "data"
    subprocess.run(as_pg([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"]), check=True, capture_output=True)
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
    subprocess.run(as_pg([str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start"]), check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_pg([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vouchers", type=int, default=20_000)
    ap.add_argument("--epoch-vouchers", type=int, default=100_000)
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--pg-url", default="")
    ap.add_argument("--out", default="bench/results/ledger.json")
    args = ap.parse_args()
    results: dict[str, dict] = {}
    results["verify only (pure, 2 sigs)"] = verify_only(min(args.vouchers, 20_000))
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "ledger.sqlite3")
        results[f"sqlite {args.vouchers}"] = run_store(store, args.vouchers, 1)
        if args.epoch_vouchers:
            results[f"sqlite epoch {args.epoch_vouchers}"] = run_store(store, args.epoch_vouchers, 2)
        store.close()
    if not args.no_postgres and (args.pg_url or (PG_BIN / "initdb").exists()):
        from darkbloom.ledger.pgstore import PostgresStore

        with contextlib.ExitStack() as stack:
            url = args.pg_url or stack.enter_context(postgres_cluster())
            store = PostgresStore(url)
            results[f"postgres {args.vouchers}"] = run_store(store, args.vouchers, 3)
            if args.epoch_vouchers:
                results[f"postgres epoch {args.epoch_vouchers}"] = run_store(store, args.epoch_vouchers, 4)
            store.close()

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (rates per wall second, and per CPU second)")
    print(f"{'run':28} {'vouchers':>9} {'submit/s':>9} {'settle/s':>9} {'both/s':>8} {'both/cpu-s':>11} {'settle s':>9} {'proof B':>8} {'steps':>6}")
    for name, r in results.items():
        if "per_cpu_s" in r and "vouchers" not in r:
            print(f"{name:28} {'':>9} {'':>9} {r['per_s']:>9.0f} {'':>8} {r['per_cpu_s']:>11.0f}")
            continue
        print(
            f"{name:28} {r['vouchers']:>9} {r['submit_per_s']:>9.0f} {r['settle_per_s']:>9.0f} "
            f"{r['verified_and_settled_per_s']:>8.0f} {r['verified_and_settled_per_cpu_s']:>11.0f} {r['settle_s']:>9.2f} "
            f"{r['proof_bytes']:>8} {r['proof_steps']:>6}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                            "load_avg": os.getloadavg()},
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
