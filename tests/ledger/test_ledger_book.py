"""VoucherBook: the latest voucher and reservation per lane on disk, kept across restarts until settled."""

from __future__ import annotations

import pytest

from darkbloom.errors import ConfigError, LedgerError
from darkbloom.ledger.book import VoucherBook
from darkbloom.ledger.store import SqliteStore

from .helpers import Pair, make_reservation, seeded

CONSUMER, NODE = seeded(40), seeded(41)


def test_keeps_the_highest_seq_and_survives_a_reopen(tmp_path):
    pair = Pair(CONSUMER, NODE, make_reservation(CONSUMER, NODE, 10**6))
    v1, v2 = pair.use(prompt=10), pair.use(completion=10)
    with VoucherBook(tmp_path / "book.sqlite3") as book:
        book.put_reservation(pair.reservation)
        assert book.put(v2) is True
        assert book.put(v1) is False  # older: ignored
        assert book.put(v2) is False  # same: no-op
        assert book.latest(v1.lane) == v2
    with VoucherBook(tmp_path / "book.sqlite3") as book:
        assert book.latest(v1.lane) == v2
        assert book.reservation(v1.lane) == pair.reservation
        assert book.unsettled() == [v2]
        book.mark_settled(v2.lane, v2.seq)
        assert book.unsettled() == []
        v3 = pair.use(completion=5)
        book.put(v3)
        assert book.unsettled() == [v3]  # a newer voucher after settlement is submitted again
        book.forget(v3.lane)
        assert book.latest(v3.lane) is None


def test_keeps_the_reservation_with_the_highest_cap(tmp_path):
    small = make_reservation(CONSUMER, NODE, 100)
    big = make_reservation(CONSUMER, NODE, 1000)
    with VoucherBook(tmp_path / "book.sqlite3") as book:
        book.put_reservation(big)
        book.put_reservation(small)
        assert book.reservation(big.lane) == big


def test_consumer_final_voucher_covers_the_rest():
    pair = Pair(CONSUMER, NODE, make_reservation(CONSUMER, NODE, 10**6))
    pair.use(prompt=40)
    assert pair.c.final_voucher(now_ms=3000) is None
    pair.c.add_usage(completion_tokens=3)
    pair.n.served(completion_tokens=3)
    last = pair.c.final_voucher(now_ms=3000)
    assert last is not None and last.cum_completion_tokens == 3
    pair.c.countersigned(pair.n.accept(last, now_ms=3000))
    assert pair.n.lag_tokens == 0


def test_unusable_ledger_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "ledger.sqlite3"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="cannot use the ledger database"):
        SqliteStore(bad)


def test_a_busy_database_is_a_typed_error(tmp_path):
    import sqlite3

    import darkbloom.ledger.store as store_module

    store = SqliteStore(tmp_path / "ledger.sqlite3")
    store._db.execute("PRAGMA busy_timeout=50")
    other = sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(LedgerError, match="busy"):
            store.deposit(CONSUMER.public_key.hex(), 10, now_ms=1)
    finally:
        other.execute("ROLLBACK")
        other.close()
        store.close()
    assert store_module.BUSY_TIMEOUT_MS >= 10_000
