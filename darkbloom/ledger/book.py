"""VoucherBook: the latest voucher and reservation per lane on disk, crash-safe, until settled.

Both the shim (consumer) and the node keep one (`<data dir>/vouchers.sqlite3`). It is a
small SQLite file in WAL mode with `synchronous=FULL`, so a `put` that returned survives a
crash or power loss. Calls are blocking and quick: call them from trio through
`trio.to_thread.run_sync(..., limiter=book.limiter)`, which keeps them on one thread at a
time.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import trio

from darkbloom.ledger.receipts import decode_strict
from darkbloom.wire.codec import encode
from darkbloom.wire.ledger import LaneReservation, Voucher

__all__ = ["VoucherBook"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lanes (
    lane TEXT PRIMARY KEY,
    reservation BLOB,
    seq INTEGER NOT NULL DEFAULT 0,
    voucher BLOB,
    settled_seq INTEGER NOT NULL DEFAULT 0
);
"""


class VoucherBook:
    """Latest voucher (highest seq) and reservation per lane, kept until the ledger settled it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.limiter = trio.CapacityLimiter(1)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> VoucherBook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put_reservation(self, reservation: LaneReservation) -> None:
        """Keep the reservation with the highest cap for its lane."""
        blob = encode(reservation)
        with self._lock, self._db:
            row = self._db.execute("SELECT reservation FROM lanes WHERE lane = ?", (reservation.lane,)).fetchone()
            if row is not None and row[0] is not None:
                if decode_strict(row[0], LaneReservation).cap > reservation.cap:
                    return
            self._db.execute(
                "INSERT INTO lanes (lane, reservation) VALUES (?, ?) "
                "ON CONFLICT(lane) DO UPDATE SET reservation = excluded.reservation",
                (reservation.lane, blob),
            )

    def put(self, voucher: Voucher) -> bool:
        """Keep `voucher` if its seq is higher than the kept one's; True when kept."""
        with self._lock, self._db:
            cur = self._db.execute(
                "INSERT INTO lanes (lane, seq, voucher) VALUES (?, ?, ?) "
                "ON CONFLICT(lane) DO UPDATE SET seq = excluded.seq, voucher = excluded.voucher "
                "WHERE excluded.seq > lanes.seq",
                (voucher.lane, voucher.seq, encode(voucher)),
            )
            return cur.rowcount > 0

    def reservation(self, lane: str) -> LaneReservation | None:
        with self._lock:
            row = self._db.execute("SELECT reservation FROM lanes WHERE lane = ?", (lane,)).fetchone()
        return decode_strict(row[0], LaneReservation) if row and row[0] is not None else None

    def latest(self, lane: str) -> Voucher | None:
        with self._lock:
            row = self._db.execute("SELECT voucher FROM lanes WHERE lane = ?", (lane,)).fetchone()
        return decode_strict(row[0], Voucher) if row and row[0] is not None else None

    def unsettled(self, limit: int = 1000) -> list[Voucher]:
        """Vouchers newer than what the ledger settled, oldest lanes first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT voucher FROM lanes WHERE voucher IS NOT NULL AND seq > settled_seq ORDER BY lane LIMIT ?",
                (limit,),
            ).fetchall()
        return [decode_strict(r[0], Voucher) for r in rows]

    def mark_settled(self, lane: str, seq: int) -> None:
        """The ledger has this lane up to `seq` (queued or settled): stop resubmitting it."""
        with self._lock, self._db:
            self._db.execute(
                "UPDATE lanes SET settled_seq = ? WHERE lane = ? AND settled_seq < ?", (seq, lane, seq)
            )

    def forget(self, lane: str) -> None:
        """Drop a lane whose reservation expired and whose last voucher settled."""
        with self._lock, self._db:
            self._db.execute("DELETE FROM lanes WHERE lane = ?", (lane,))
