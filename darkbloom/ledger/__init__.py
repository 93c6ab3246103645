"""The ledger: signed lane reservations, cumulative vouchers, epoch settlement, balances and payouts.

Pure core: `receipts` (sign, verify, hash, price), `merkle`, `settlement`, `lanes`
(ConsumerLane / NodeLane). I/O: `book` (VoucherBook on disk), `store` (SQLite) and
`pgstore` (PostgreSQL), `service` (the `/darkbloom/ledger/1.0.0` handler and epoch loop),
`client` (the other end of that protocol), `commands` (the CLI).

Names are imported on first use, so `darkbloom ledger ...` and a settling process do not
pay for trio and the service when they only need the store.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AsyncLedger": "service",
    "ConsumerLane": "lanes",
    "LaneState": "settlement",
    "LedgerClient": "client",
    "LedgerService": "service",
    "LedgerStore": "store",
    "LedgerStream": "service",
    "NodeLane": "lanes",
    "SqliteStore": "store",
    "VoucherBook": "book",
    "chain_next": "receipts",
    "check_reservation": "lanes",
    "check_voucher": "settlement",
    "cost_of": "receipts",
    "open_store": "store",
    "request_hash": "receipts",
    "run_submitter": "client",
    "settle_epoch": "settlement",
    "sign": "receipts",
    "sign_voucher": "receipts",
    "submit_unsettled": "client",
    "verify": "receipts",
    "verify_voucher": "receipts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'darkbloom.ledger' has no attribute {name!r}")
    return getattr(importlib.import_module(f"darkbloom.ledger.{module}"), name)
