"""The ledger: signed lane reservations, cumulative vouchers, epoch settlement, balances and payouts.

Pure core: `receipts` (sign, verify, hash, price), `merkle`, `settlement`, `lanes`
(ConsumerLane / NodeLane). I/O: `book` (VoucherBook on disk), `store` (SQLite) and
`pgstore` (PostgreSQL), `service` (the `/darkbloom/ledger/1.0.0` handler and epoch loop),
`client` (the other end of that protocol), `commands` (the CLI).
"""

from darkbloom.ledger.book import VoucherBook
from darkbloom.ledger.client import LedgerClient, run_submitter, submit_unsettled
from darkbloom.ledger.lanes import ConsumerLane, NodeLane, check_reservation
from darkbloom.ledger.receipts import chain_next, cost_of, request_hash, sign, sign_voucher, verify, verify_voucher
from darkbloom.ledger.service import AsyncLedger, LedgerService, LedgerStream
from darkbloom.ledger.settlement import LaneState, check_voucher, settle_epoch
from darkbloom.ledger.store import LedgerStore, SqliteStore, open_store

__all__ = [
    "AsyncLedger",
    "ConsumerLane",
    "LaneState",
    "LedgerClient",
    "LedgerService",
    "LedgerStore",
    "LedgerStream",
    "NodeLane",
    "SqliteStore",
    "VoucherBook",
    "chain_next",
    "check_reservation",
    "check_voucher",
    "cost_of",
    "open_store",
    "request_hash",
    "run_submitter",
    "settle_epoch",
    "sign",
    "sign_voucher",
    "submit_unsettled",
    "verify",
    "verify_voucher",
]
