"""Child process of test_ledger_crash: submit and settle rounds of vouchers until killed.

argv: DB_PATH VOUCHERS_FILE. The vouchers file is a msgpack list of rounds, each a list of
[node_hex, [encoded vouchers]]. Prints "ready", then "submitted R" and "settled R" after
each committed step, flushed, so the parent knows what had committed when it killed us.
"""

import sys

import msgpack

from darkbloom.identity import Identity
from darkbloom.ledger.receipts import decode_strict
from darkbloom.ledger.store import SqliteStore
from darkbloom.wire.ledger import Voucher


def main() -> None:
    db_path, vouchers_path = sys.argv[1], sys.argv[2]
    with open(vouchers_path, "rb") as f:
        rounds = msgpack.unpackb(f.read())
    rounds = [[(node, [decode_strict(b, Voucher) for b in blobs]) for node, blobs in r] for r in rounds]
    ledger = Identity.from_seed(bytes([1]) * 32)
    store = SqliteStore(db_path)
    print("ready", flush=True)
    for number, batches in enumerate(rounds, start=1):
        for node, vouchers in batches:
            store.submit(node, vouchers)
        print(f"submitted {number}", flush=True)
        store.settle(ledger=ledger, now_ms=10_000 + number, operator_ppm=950_000, grace_ms=600_000)
        print(f"settled {number}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
