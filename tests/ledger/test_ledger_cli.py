"""`darkbloom ledger ...` end to end on a real SQLite store in a temp data dir."""

from __future__ import annotations

import csv
import io
import sqlite3
import time

from darkbloom.cli import main
from darkbloom.identity import load_or_create_identity
from darkbloom.ledger.receipts import row_hash
from darkbloom.ledger.store import SqliteStore
from darkbloom.wire.codec import encode

from .helpers import open_pair, seeded

ALICE, BOB, NODE = seeded(30), seeded(31), seeded(32)


def now_ms() -> int:
    return int(time.time() * 1000)  # the CLI settles at the real time; lanes must not have expired


def ledger(tmp_path, *args) -> int:
    return main(["ledger", "--data-dir", str(tmp_path), *args])


def test_deposit_balance_settle_payouts_verify(tmp_path, capsys):
    alice = ALICE.public_key.hex()
    assert ledger(tmp_path, "deposit", alice, "5_000_000") == 0
    assert "balance 5000000" in capsys.readouterr().out
    store = SqliteStore(tmp_path / "ledger.sqlite3")
    store.deposit(BOB.public_key.hex(), 5_000_000, now_ms=1)
    a = open_pair(store, ALICE, NODE, 1_000_000, now_ms=now_ms())
    b = open_pair(store, BOB, NODE, 1_000_000, now_ms=now_ms())
    vouchers = [a.use(prompt=1000, completion=1000), b.use(completion=5000)]
    store.submit(NODE.public_key.hex(), vouchers)
    store.close()

    assert ledger(tmp_path, "settle") == 0
    out = capsys.readouterr().out
    assert "epoch 1 closed: 2 vouchers settled, 0 refused" in out

    assert ledger(tmp_path, "balance", alice) == 0
    out = capsys.readouterr().out
    assert "balance  4000000" in out and f"reserved {1_000_000 - vouchers[0].cum_cost}" in out

    assert ledger(tmp_path, "history", alice) == 0
    kinds = [line.split()[2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert kinds == ["settle", "reserve", "deposit"]

    assert ledger(tmp_path, "payouts", "--epoch", "1") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    by_account = {r["account"]: r for r in rows}
    total = sum(v.cum_cost for v in vouchers)
    assert int(by_account[NODE.public_key.hex()]["amount"]) + int(by_account["network"]["amount"]) == total
    assert by_account[NODE.public_key.hex()]["paying_consumers"] == "2"
    assert int(by_account[NODE.public_key.hex()]["completion_tokens"]) == 6000

    assert ledger(tmp_path, "verify-epoch", "--epoch", "1") == 0
    assert "ok: epoch 1" in capsys.readouterr().out

    proof_file = tmp_path / "proof.bin"
    assert ledger(tmp_path, "proof", "--epoch", "1", "--row", "1", "--out", str(proof_file)) == 0
    ledger_key = load_or_create_identity(tmp_path).public_key.hex()
    assert ledger(tmp_path, "verify-epoch", "--proof", str(proof_file), "--ledger-key", ledger_key) == 0
    assert "row 1" in capsys.readouterr().out
    # a proof checked against another ledger's key fails
    assert ledger(tmp_path, "verify-epoch", "--proof", str(proof_file), "--ledger-key", ALICE.public_key.hex()) == 2
    assert "invalid signature" in capsys.readouterr().err


def test_verify_epoch_detects_a_tampered_row(tmp_path, capsys):
    store = SqliteStore(tmp_path / "ledger.sqlite3")
    store.deposit(ALICE.public_key.hex(), 5_000_000, now_ms=1)
    pairs = [open_pair(store, ALICE, NODE, 100_000, now_ms=now_ms()) for _ in range(3)]
    store.submit(NODE.public_key.hex(), [p.use(completion=100) for p in pairs])
    store.close()
    assert ledger(tmp_path, "settle") == 0
    store = SqliteStore(tmp_path / "ledger.sqlite3")
    row = store.rows(1)[1]
    store.close()
    import dataclasses

    inflated = dataclasses.replace(row, operator_amount=row.operator_amount + 1000)
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        db.execute("UPDATE settled_rows SET row_data = ? WHERE epoch = 1 AND idx = 1", (encode(inflated),))
    capsys.readouterr()
    assert ledger(tmp_path, "verify-epoch") == 1
    out = capsys.readouterr().out
    assert "do not hash to the signed root" in out and "does not chain" in out
    assert row_hash(inflated) != row_hash(row)


def test_bad_input_gets_one_clear_line(tmp_path, capsys):
    assert ledger(tmp_path, "deposit", "not-a-key", "10") == 2
    assert "not an account" in capsys.readouterr().err
    assert ledger(tmp_path, "payouts", "--epoch", "7") == 2
    assert "epoch 7 is not closed" in capsys.readouterr().err
    assert ledger(tmp_path, "verify-epoch") == 2
    assert "no closed epoch" in capsys.readouterr().err
    assert ledger(tmp_path) == 2
