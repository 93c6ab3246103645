"""The ledger's store: accounts, lanes, pending vouchers, rows and epochs in SQL, one transaction per step.

`LedgerStore` is the interface (blocking; the service runs it on one worker thread through
`AsyncLedger`). `SqlStore` holds all the SQL and the transaction logic; `SqliteStore`
(default: WAL, `synchronous=FULL`, stdlib sqlite3) and `PostgresStore` (in
`darkbloom.ledger.pgstore`, psycopg 3) only differ in connection, placeholders and DDL
details. Every method that writes runs in one transaction and takes the global ledger lock
first (SQLite `BEGIN IMMEDIATE`; PostgreSQL `SELECT ... FOR UPDATE` on the lock row), so
a CLI deposit and the relay's settlement never interleave. Decisions come from the pure
`settlement` module; this module only loads and writes.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from darkbloom.errors import (
    ConfigError,
    InsufficientFunds,
    LedgerError,
    ReceiptReplay,
    UnknownLane,
    VoucherRejected,
)
from darkbloom.identity import Identity
from darkbloom.ledger import merkle
from darkbloom.ledger.receipts import ZERO_HASH, decode_strict, lane_id, sign, summary_hash, verify
from darkbloom.ledger.settlement import DUPLICATE, EpochOutcome, LaneState, check_voucher, settle_epoch
from darkbloom.wire.codec import encode
from darkbloom.wire.ledger import (
    NETWORK_ACCOUNT,
    EpochSummary,
    CloseLane,
    LaneReservation,
    OpenLane,
    ProofStep,
    SettlementRow,
    SubmitResult,
    TopUp,
    Voucher,
    encode_flat,
    is_account,
)

__all__ = ["HistoryEntry", "LedgerStore", "SqlStore", "SqliteStore", "Totals", "open_store"]

log = logging.getLogger(__name__)

_LANE_COLUMNS = (
    "lane, consumer, node, cap, price_in, price_out, opened_ms, expires_ms, is_open, paid, seq, "
    "prompt_tokens, completion_tokens, cost, voucher_hash"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    account TEXT PRIMARY KEY,
    balance BIGINT NOT NULL DEFAULT 0 CHECK (balance >= 0),
    reserved BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0)
);
CREATE TABLE IF NOT EXISTS journal (
    id {serial},
    account TEXT NOT NULL,
    kind TEXT NOT NULL,
    d_balance BIGINT NOT NULL,
    d_reserved BIGINT NOT NULL,
    ref TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_account ON journal (account, id);
CREATE TABLE IF NOT EXISTS lanes (
    lane TEXT PRIMARY KEY,
    consumer TEXT NOT NULL,
    node TEXT NOT NULL,
    cap BIGINT NOT NULL,
    price_in BIGINT NOT NULL,
    price_out BIGINT NOT NULL,
    opened_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    is_open INTEGER NOT NULL,
    paid BIGINT NOT NULL CHECK (paid <= cap),
    seq BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost BIGINT NOT NULL,
    voucher_hash {blob} NOT NULL,
    reservation {blob} NOT NULL
);
CREATE INDEX IF NOT EXISTS lanes_expiry ON lanes (is_open, expires_ms);
CREATE TABLE IF NOT EXISTS pending (
    lane TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash {blob} NOT NULL,
    voucher {blob} NOT NULL
);
CREATE TABLE IF NOT EXISTS settled_rows (
    epoch BIGINT NOT NULL,
    idx BIGINT NOT NULL,
    lane TEXT NOT NULL,
    consumer TEXT NOT NULL,
    node TEXT NOT NULL,
    row_hash {blob} NOT NULL,
    row_data {blob} NOT NULL,
    PRIMARY KEY (epoch, idx)
);
CREATE INDEX IF NOT EXISTS settled_rows_lane ON settled_rows (lane);
CREATE TABLE IF NOT EXISTS epochs (
    epoch BIGINT PRIMARY KEY,
    closed_ms BIGINT NOT NULL,
    summary {blob} NOT NULL
);
CREATE TABLE IF NOT EXISTS rejections (
    id {serial},
    epoch BIGINT NOT NULL,
    lane TEXT NOT NULL,
    seq BIGINT NOT NULL,
    code TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    num BIGINT NOT NULL DEFAULT 0,
    data {blob}
);
"""

_META_KEYS = ("lock", "deposited", "epoch", "head", "last_summary")


@dataclass(frozen=True, slots=True)
class Totals:
    """Conservation check: balance + reserved over all accounts must equal deposited."""

    balance: int
    reserved: int
    deposited: int

    @property
    def conserved(self) -> bool:
        return self.balance + self.reserved == self.deposited


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    kind: str  # deposit, reserve, release, settle
    d_balance: int
    d_reserved: int
    ref: str  # lane id or "epoch N"
    at_ms: int


class LedgerStore(abc.ABC):
    """What the ledger service and CLI need from storage. Blocking; one caller at a time."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def deposit(self, account: str, amount: int, *, now_ms: int) -> int:
        """Credit `account` (the ledger operator's act); returns the new balance."""

    @abc.abstractmethod
    def balance(self, account: str) -> tuple[int, int]:
        """(balance, reserved); (0, 0) for an account never seen."""

    @abc.abstractmethod
    def open_lane(self, request: OpenLane, *, ledger: Identity, now_ms: int, ttl_ms: int) -> LaneReservation: ...

    @abc.abstractmethod
    def top_up(self, request: TopUp, *, ledger: Identity, now_ms: int, ttl_ms: int) -> LaneReservation: ...

    @abc.abstractmethod
    def close_lane(self, request: CloseLane, *, ledger: Identity, now_ms: int, keep_ms: int) -> LaneReservation:
        """Shorten the lane's expiry to `now_ms + keep_ms` (never lengthen it); the reserve is released at expiry."""

    @abc.abstractmethod
    def submit(self, node: str, vouchers: Sequence[Voucher]) -> list[SubmitResult]: ...

    @abc.abstractmethod
    def settle(self, *, ledger: Identity, now_ms: int, operator_ppm: int, grace_ms: int) -> EpochOutcome: ...

    @abc.abstractmethod
    def lane(self, lane: str) -> LaneState | None: ...

    @abc.abstractmethod
    def summary(self, epoch: int = 0) -> EpochSummary | None:
        """A closed epoch's signed summary; 0 means the latest."""

    @abc.abstractmethod
    def rows(self, epoch: int) -> list[SettlementRow]: ...

    @abc.abstractmethod
    def proof(self, epoch: int, index: int) -> tuple[SettlementRow, tuple[ProofStep, ...], EpochSummary]: ...

    @abc.abstractmethod
    def history(self, account: str, limit: int = 100) -> list[HistoryEntry]: ...

    @abc.abstractmethod
    def totals(self) -> Totals: ...

    @abc.abstractmethod
    def pending_count(self) -> int: ...


class SqlStore(LedgerStore):
    """The SQL shared by SQLite and PostgreSQL; subclasses provide the connection and dialect."""

    blob_type = "BLOB"
    serial_type = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def __init__(self) -> None:
        with self._tx(lock=False) as cur:
            for statement in _SCHEMA.format(blob=self.blob_type, serial=self.serial_type).split(";"):
                if statement.strip():
                    cur.execute(statement)
            for key in _META_KEYS:
                cur.execute(self._q("INSERT INTO meta (key, num) VALUES (?, 0) ON CONFLICT (key) DO NOTHING"), (key,))

    # --- dialect hooks ---------------------------------------------------------------

    @abc.abstractmethod
    def _tx(self, *, lock: bool = True) -> contextlib.AbstractContextManager[Any]:
        """A cursor inside one transaction that holds the global lock when `lock`."""

    def _q(self, sql: str) -> str:
        return sql

    # --- helpers ---------------------------------------------------------------------

    def _meta(self, cur: Any, key: str) -> tuple[int, bytes | None]:
        cur.execute(self._q("SELECT num, data FROM meta WHERE key = ?"), (key,))
        num, data = cur.fetchone()
        return int(num), (bytes(data) if data is not None else None)

    def _set_meta(self, cur: Any, key: str, num: int, data: bytes | None = None) -> None:
        cur.execute(self._q("UPDATE meta SET num = ?, data = ? WHERE key = ?"), (num, data, key))

    def _ensure_accounts(self, cur: Any, accounts: Sequence[str]) -> None:
        cur.executemany(
            self._q("INSERT INTO accounts (account, balance, reserved) VALUES (?, 0, 0) ON CONFLICT (account) DO NOTHING"),
            [(a,) for a in accounts],
        )

    def _account(self, cur: Any, account: str) -> tuple[int, int]:
        cur.execute(self._q("SELECT balance, reserved FROM accounts WHERE account = ?"), (account,))
        row = cur.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def _journal(self, cur: Any, entries: Sequence[tuple[str, str, int, int, str, int]]) -> None:
        cur.executemany(
            self._q("INSERT INTO journal (account, kind, d_balance, d_reserved, ref, at_ms) VALUES (?, ?, ?, ?, ?, ?)"),
            entries,
        )

    @staticmethod
    def _lane_state(row: Sequence[Any]) -> LaneState:
        # BIGINT columns come back as int from sqlite3 and psycopg alike; blobs as bytes or memoryview
        return LaneState(
            lane=row[0], consumer=row[1], node=row[2], cap=row[3], price_input_per_m=row[4],
            price_output_per_m=row[5], opened_ms=row[6], expires_ms=row[7], open=bool(row[8]), paid=row[9],
            seq=row[10], prompt_tokens=row[11], completion_tokens=row[12], cost=row[13], voucher_hash=bytes(row[14]),
        )

    def _load_lane(self, cur: Any, lane: str) -> tuple[LaneState, bytes] | None:
        cur.execute(self._q(f"SELECT {_LANE_COLUMNS}, reservation FROM lanes WHERE lane = ?"), (lane,))
        row = cur.fetchone()
        return (self._lane_state(row), bytes(row[15])) if row else None

    # --- accounts --------------------------------------------------------------------

    def deposit(self, account: str, amount: int, *, now_ms: int) -> int:
        if not is_account(account) or account == NETWORK_ACCOUNT:
            raise LedgerError(f"{account!r} is not an account", hint="an account is a 64-character hex Ed25519 public key")
        if amount <= 0:
            raise LedgerError(f"deposit amount must be positive, got {amount}", hint="amounts are micro-credits")
        with self._tx() as cur:
            self._ensure_accounts(cur, [account])
            cur.execute(self._q("UPDATE accounts SET balance = balance + ? WHERE account = ?"), (amount, account))
            deposited, _ = self._meta(cur, "deposited")
            self._set_meta(cur, "deposited", deposited + amount)
            self._journal(cur, [(account, "deposit", amount, 0, "", now_ms)])
            return self._account(cur, account)[0]

    def balance(self, account: str) -> tuple[int, int]:
        with self._tx(lock=False) as cur:
            return self._account(cur, account)

    # --- lanes -----------------------------------------------------------------------

    def open_lane(self, request: OpenLane, *, ledger: Identity, now_ms: int, ttl_ms: int) -> LaneReservation:
        """Reserve `request.cap` from the consumer's balance; the same request again returns the same lane."""
        if not (is_account(request.consumer) and is_account(request.node)) or NETWORK_ACCOUNT in (request.consumer, request.node):
            raise LedgerError("consumer and node must be hex public keys")
        if request.consumer == request.node:
            raise LedgerError("a consumer cannot open a lane to itself")
        verify(request, request.consumer)
        lane = lane_id(request.consumer, request.node, request.nonce)
        with self._tx() as cur:
            existing = self._load_lane(cur, lane)
            if existing is not None:
                return decode_strict(existing[1], LaneReservation)
            if request.cap <= 0:
                raise LedgerError("a lane needs a positive cap", hint="ask for a cap in micro-credits")
            balance, _ = self._account(cur, request.consumer)
            if balance < request.cap:
                raise InsufficientFunds(request.consumer, request.cap, balance)
            reservation = sign(
                ledger,
                LaneReservation(
                    lane=lane,
                    consumer=request.consumer,
                    node=request.node,
                    cap=request.cap,
                    price_input_per_m=request.price_input_per_m,
                    price_output_per_m=request.price_output_per_m,
                    opened_ms=now_ms,
                    expires_ms=now_ms + ttl_ms,
                    ledger=ledger.public_key.hex(),
                ),
            )
            cur.execute(
                self._q(
                    f"INSERT INTO lanes ({_LANE_COLUMNS}, reservation) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, 0, 0, 0, 0, 0, ?, ?)"
                ),
                (
                    lane, request.consumer, request.node, request.cap, request.price_input_per_m,
                    request.price_output_per_m, now_ms, now_ms + ttl_ms, ZERO_HASH, encode(reservation),
                ),
            )
            cur.execute(
                self._q("UPDATE accounts SET balance = balance - ?, reserved = reserved + ? WHERE account = ?"),
                (request.cap, request.cap, request.consumer),
            )
            self._journal(cur, [(request.consumer, "reserve", -request.cap, request.cap, lane, now_ms)])
            return reservation

    def top_up(self, request: TopUp, *, ledger: Identity, now_ms: int, ttl_ms: int) -> LaneReservation:
        """Raise the lane's cap to `request.cap` and extend its expiry; a lower or equal cap is a no-op."""
        with self._tx() as cur:
            state, current = self._consumer_request_on_lane(cur, request)
            if request.cap <= state.cap:
                return current
            if not state.open:
                raise VoucherRejected(request.lane, "the lane has expired and closed; open a new lane")
            need = request.cap - state.cap
            balance, _ = self._account(cur, state.consumer)
            if balance < need:
                raise InsufficientFunds(state.consumer, need, balance)
            reservation = sign(
                ledger,
                LaneReservation(
                    lane=state.lane,
                    consumer=state.consumer,
                    node=state.node,
                    cap=request.cap,
                    price_input_per_m=state.price_input_per_m,
                    price_output_per_m=state.price_output_per_m,
                    opened_ms=state.opened_ms,
                    expires_ms=max(state.expires_ms, now_ms + ttl_ms),
                    ledger=ledger.public_key.hex(),
                ),
            )
            cur.execute(
                self._q("UPDATE lanes SET cap = ?, expires_ms = ?, reservation = ? WHERE lane = ?"),
                (request.cap, reservation.expires_ms, encode(reservation), state.lane),
            )
            cur.execute(
                self._q("UPDATE accounts SET balance = balance - ?, reserved = reserved + ? WHERE account = ?"),
                (need, need, state.consumer),
            )
            self._journal(cur, [(state.consumer, "reserve", -need, need, state.lane, now_ms)])
            return reservation

    def close_lane(self, request: CloseLane, *, ledger: Identity, now_ms: int, keep_ms: int) -> LaneReservation:
        with self._tx() as cur:
            state, current = self._consumer_request_on_lane(cur, request)
            expires = now_ms + keep_ms
            if not state.open or expires >= state.expires_ms:
                return current
            reservation = sign(ledger, dataclasses.replace(current, expires_ms=expires, signature=b""))
            cur.execute(
                self._q("UPDATE lanes SET expires_ms = ?, reservation = ? WHERE lane = ?"),
                (expires, encode(reservation), state.lane),
            )
            return reservation

    def lane(self, lane: str) -> LaneState | None:
        with self._tx(lock=False) as cur:
            loaded = self._load_lane(cur, lane)
        return loaded[0] if loaded else None

    # --- vouchers --------------------------------------------------------------------

    def submit(self, node: str, vouchers: Sequence[Voucher]) -> list[SubmitResult]:
        """Queue each voucher for the next settlement if it could settle; idempotent.

        Cheap checks here (lane, owner, seq, totals, price); signatures are verified by the
        settlement transaction. Only the lane's node may submit (the batch is signed by it).
        """
        results: list[SubmitResult] = []
        with self._tx() as cur:
            lanes = self._load_lanes(cur, sorted({v.lane for v in vouchers}))
            pending = self._load_pending(cur, sorted({v.lane for v in vouchers}))
            upserts: dict[str, tuple[str, int, bytes, bytes]] = {}
            for voucher in vouchers:
                try:
                    verdict = check_voucher(voucher, lanes.get(voucher.lane), node=node, signatures=False)
                    blob = encode_flat(voucher)
                    digest = hashlib.sha256(blob).digest()
                    if verdict != DUPLICATE and voucher.lane in pending:
                        p_seq, p_hash = pending[voucher.lane]
                        if voucher.seq == p_seq and digest == p_hash:
                            verdict = DUPLICATE
                        elif voucher.seq == p_seq:
                            raise VoucherRejected(voucher.lane, f"a different voucher with seq {p_seq} is already queued")
                        elif voucher.seq < p_seq:
                            raise ReceiptReplay(voucher.lane, voucher.seq, p_seq)
                except LedgerError as exc:  # refused with its reason; the rest of the batch goes on
                    results.append(SubmitResult(lane=voucher.lane, seq=voucher.seq, status="rejected", reason=str(exc), code=type(exc).__name__))
                    continue
                if verdict == DUPLICATE:
                    results.append(SubmitResult(lane=voucher.lane, seq=voucher.seq, status="duplicate"))
                    continue
                pending[voucher.lane] = (voucher.seq, digest)
                upserts[voucher.lane] = (voucher.lane, voucher.seq, digest, blob)
                results.append(SubmitResult(lane=voucher.lane, seq=voucher.seq, status="queued"))
            cur.executemany(
                self._q(
                    "INSERT INTO pending (lane, seq, hash, voucher) VALUES (?, ?, ?, ?) ON CONFLICT (lane) DO UPDATE "
                    "SET seq = excluded.seq, hash = excluded.hash, voucher = excluded.voucher"
                ),
                list(upserts.values()),
            )
        return results

    def _consumer_request_on_lane(self, cur: Any, request: Any) -> tuple[LaneState, LaneReservation]:
        """The lane a consumer-signed request (TopUp, CloseLane) names, its signature checked; UnknownLane if none."""
        loaded = self._load_lane(cur, request.lane)
        if loaded is None:
            raise UnknownLane(request.lane)
        state, blob = loaded
        verify(request, state.consumer)
        return state, decode_strict(blob, LaneReservation)

    def _load_lanes(self, cur: Any, lanes: Sequence[str]) -> dict[str, LaneState]:
        out: dict[str, LaneState] = {}
        for start in range(0, len(lanes), 500):
            chunk = lanes[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            cur.execute(self._q(f"SELECT {_LANE_COLUMNS} FROM lanes WHERE lane IN ({marks})"), tuple(chunk))
            for row in cur.fetchall():
                out[row[0]] = self._lane_state(row)
        return out

    def _load_pending(self, cur: Any, lanes: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        out: dict[str, tuple[int, bytes]] = {}
        for start in range(0, len(lanes), 500):
            chunk = lanes[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            cur.execute(self._q(f"SELECT lane, seq, hash FROM pending WHERE lane IN ({marks})"), tuple(chunk))
            for lane, seq, digest in cur.fetchall():
                out[lane] = (int(seq), bytes(digest))
        return out

    def pending_count(self) -> int:
        with self._tx(lock=False) as cur:
            cur.execute("SELECT count(*) FROM pending")
            return int(cur.fetchone()[0])

    # --- settlement ------------------------------------------------------------------

    def settle(self, *, ledger: Identity, now_ms: int, operator_ppm: int, grace_ms: int) -> EpochOutcome:
        """Close the current epoch: settle every pending voucher and expire lanes, in one transaction."""
        with self._tx() as cur:
            last_epoch, _ = self._meta(cur, "epoch")
            _, head = self._meta(cur, "head")
            _, last_summary = self._meta(cur, "last_summary")
            cur.execute("SELECT voucher, hash FROM pending")
            pending = [(bytes(r[0]), bytes(r[1])) for r in cur.fetchall()]
            cur.execute(
                self._q(
                    f"SELECT {_LANE_COLUMNS} FROM lanes WHERE lane IN (SELECT lane FROM pending) "
                    "OR (is_open = 1 AND expires_ms <= ?)"
                ),
                (now_ms - grace_ms,),
            )
            lanes = {row[0]: self._lane_state(row) for row in cur.fetchall()}
            epoch = last_epoch + 1
            outcome = settle_epoch(
                epoch=epoch,
                now_ms=now_ms,
                pending=pending,
                lanes=lanes,
                prev_row_hash=head or ZERO_HASH,
                prev_summary_hash=last_summary or ZERO_HASH,
                operator_ppm=operator_ppm,
                grace_ms=grace_ms,
                ledger=ledger,
            )
            self._write_outcome(cur, outcome, now_ms)
        log.info(
            "epoch %d settled: %d rows, %d rejected, paid %d, released %d",
            outcome.summary.epoch, len(outcome.rows), len(outcome.rejected), outcome.summary.total_paid, outcome.summary.released,
        )
        return outcome

    def _write_outcome(self, cur: Any, outcome: EpochOutcome, now_ms: int) -> None:
        summary = outcome.summary
        epoch = summary.epoch
        # Lanes still open only settled (they were open: closed lanes never settle), so is_open is
        # left out of their update and the (is_open, expires_ms) index is not rewritten for each.
        settled = [s for s in outcome.lanes.values() if s.open]
        closed = [s for s in outcome.lanes.values() if not s.open]
        cur.executemany(
            self._q(
                "UPDATE lanes SET paid = ?, seq = ?, prompt_tokens = ?, completion_tokens = ?, "
                "cost = ?, voucher_hash = ? WHERE lane = ?"
            ),
            [(s.paid, s.seq, s.prompt_tokens, s.completion_tokens, s.cost, s.voucher_hash, s.lane) for s in settled],
        )
        cur.executemany(
            self._q(
                "UPDATE lanes SET is_open = 0, paid = ?, seq = ?, prompt_tokens = ?, completion_tokens = ?, "
                "cost = ?, voucher_hash = ? WHERE lane = ?"
            ),
            [(s.paid, s.seq, s.prompt_tokens, s.completion_tokens, s.cost, s.voucher_hash, s.lane) for s in closed],
        )
        accounts = sorted(outcome.deltas)
        self._ensure_accounts(cur, accounts)
        cur.executemany(
            self._q("UPDATE accounts SET balance = balance + ?, reserved = reserved + ? WHERE account = ?"),
            [(outcome.deltas[a][0], outcome.deltas[a][1], a) for a in accounts],
        )
        self._journal(
            cur,
            [(a, "settle", outcome.deltas[a][0], outcome.deltas[a][1], f"epoch {epoch}", now_ms) for a in accounts],
        )
        cur.executemany(
            self._q(
                "INSERT INTO settled_rows (epoch, idx, lane, consumer, node, row_hash, row_data) VALUES (?, ?, ?, ?, ?, ?, ?)"
            ),
            [
                (epoch, row.index, row.lane, row.consumer, row.node, h, data)
                for row, h, data in zip(outcome.rows, outcome.row_hashes, outcome.row_data)
            ],
        )
        cur.executemany(
            self._q("INSERT INTO rejections (epoch, lane, seq, code, reason) VALUES (?, ?, ?, ?, ?)"),
            [(epoch, r.lane, r.seq, r.code, r.reason) for r in outcome.rejected],
        )
        encoded = encode(summary)
        cur.execute(self._q("INSERT INTO epochs (epoch, closed_ms, summary) VALUES (?, ?, ?)"), (epoch, now_ms, encoded))
        cur.execute("DELETE FROM pending")
        self._set_meta(cur, "epoch", epoch)
        self._set_meta(cur, "head", 0, summary.head)
        self._set_meta(cur, "last_summary", epoch, summary_hash(summary))

    # --- reads -----------------------------------------------------------------------

    def summary(self, epoch: int = 0) -> EpochSummary | None:
        with self._tx(lock=False) as cur:
            if epoch <= 0:
                cur.execute("SELECT summary FROM epochs ORDER BY epoch DESC LIMIT 1")
            else:
                cur.execute(self._q("SELECT summary FROM epochs WHERE epoch = ?"), (epoch,))
            row = cur.fetchone()
        return decode_strict(bytes(row[0]), EpochSummary) if row else None

    def rows(self, epoch: int) -> list[SettlementRow]:
        with self._tx(lock=False) as cur:
            cur.execute(self._q("SELECT row_data FROM settled_rows WHERE epoch = ? ORDER BY idx"), (epoch,))
            return [decode_strict(bytes(r[0]), SettlementRow) for r in cur.fetchall()]

    def proof(self, epoch: int, index: int) -> tuple[SettlementRow, tuple[ProofStep, ...], EpochSummary]:
        summary = self.summary(epoch)
        if summary is None or epoch <= 0:
            raise LedgerError(f"epoch {epoch} is not closed", hint="see `darkbloom ledger history` for closed epochs")
        with self._tx(lock=False) as cur:
            cur.execute(self._q("SELECT idx, row_hash, row_data FROM settled_rows WHERE epoch = ? ORDER BY idx"), (epoch,))
            fetched = cur.fetchall()
        if not 0 <= index < len(fetched):
            raise LedgerError(f"epoch {epoch} has {len(fetched)} rows; there is no row {index}")
        hashes = [bytes(r[1]) for r in fetched]
        row = decode_strict(bytes(fetched[index][2]), SettlementRow)
        # the node stats are covered by the signed stats_hash; a proof does not need them
        return row, merkle.inclusion_proof(hashes, index), dataclasses.replace(summary, nodes=())

    def history(self, account: str, limit: int = 100) -> list[HistoryEntry]:
        with self._tx(lock=False) as cur:
            cur.execute(
                self._q("SELECT kind, d_balance, d_reserved, ref, at_ms FROM journal WHERE account = ? ORDER BY id DESC LIMIT ?"),
                (account, limit),
            )
            return [HistoryEntry(r[0], int(r[1]), int(r[2]), r[3], int(r[4])) for r in cur.fetchall()]

    def rejections(self, epoch: int) -> list[tuple[str, int, str, str]]:
        with self._tx(lock=False) as cur:
            cur.execute(self._q("SELECT lane, seq, code, reason FROM rejections WHERE epoch = ? ORDER BY id"), (epoch,))
            return [(r[0], int(r[1]), r[2], r[3]) for r in cur.fetchall()]

    def totals(self) -> Totals:
        with self._tx(lock=False) as cur:
            cur.execute("SELECT coalesce(sum(balance), 0), coalesce(sum(reserved), 0) FROM accounts")
            balance, reserved = cur.fetchone()
            deposited, _ = self._meta(cur, "deposited")
        return Totals(int(balance), int(reserved), deposited)


CACHE_KIB = 64 * 1024  # SQLite page cache per connection
MMAP_BYTES = 256 << 20  # memory-mapped reads of the database file, up to this size
BUSY_TIMEOUT_MS = 30_000  # a 100,000-voucher settlement holds the write lock for seconds


class SqliteStore(SqlStore):
    """The default store: one SQLite file in WAL mode, fsynced at every commit."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            # A settlement touches every lane it pays in random order: keep the hot pages in memory
            # (the default 2 MB cache re-reads them through the OS at each lookup) and read the
            # file through a memory map instead of a read() per page.
            self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self._db.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
            super().__init__()
        except sqlite3.DatabaseError as exc:
            raise ConfigError(
                f"cannot use the ledger database {self.path}: {exc}",
                key="ledger.url",
                hint="check --data-dir (it must be writable) or restore the file from a backup",
            ) from None

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _tx(self, *, lock: bool = True) -> Iterator[sqlite3.Cursor]:
        cur = self._db.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE" if lock else "BEGIN")
        except sqlite3.OperationalError as exc:  # another process holds the write lock past the busy timeout
            cur.close()
            raise LedgerError(
                f"the ledger database is busy: {exc}", hint="a settlement may be running; retry in a minute"
            ) from None
        committed = False
        try:
            yield cur
            cur.execute("COMMIT")
            committed = True
        finally:
            if not committed:
                cur.execute("ROLLBACK")
            cur.close()


def open_store(url: str, data_dir: Path) -> LedgerStore:
    """The store for `[ledger] url`: empty means SQLite at `data_dir/ledger.sqlite3`."""
    if not url:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        return SqliteStore(Path(data_dir) / "ledger.sqlite3")
    if url.startswith(("postgresql://", "postgres://")):
        from darkbloom.ledger.pgstore import PostgresStore

        return PostgresStore(url)
    if url.startswith("sqlite:///"):
        return SqliteStore(url[len("sqlite:///") :])  # sqlite:///relative or sqlite:////absolute
    raise ConfigError(
        f"unsupported ledger url {url!r}", key="ledger.url", hint='use "" (SQLite in the data dir), sqlite:///PATH or postgresql://...'
    )
