"""`darkbloom ledger ...`: deposit, balance, history, payouts, settle, proof and verify-epoch on the ledger store.

These act on the store in the data dir (`ledger.sqlite3`) or at `[ledger] url`; `deposit`
and `settle` are the ledger operator's (settle signs with the data dir's identity key, the
relay's). `verify-epoch` is for anyone: it checks the signed summary, the row hash chain and
the Merkle root, or one exported proof file against its signed root. Amounts are
micro-credits (1 credit = 1,000,000).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from darkbloom.config import Config
from darkbloom.errors import LedgerError
from darkbloom.wire.ledger import NETWORK_ACCOUNT

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ledger_command", metavar="ACTION")
    p = sub.add_parser("deposit", help="credit an account (the ledger operator only)")
    p.add_argument("account", help="hex public key of the account")
    p.add_argument("amount", type=_amount, help="micro-credits (integer > 0)")
    p = sub.add_parser("balance", help="an account's spendable and reserved credits")
    p.add_argument("account", nargs="?", default="", help="hex public key or 'network' (default: this data dir's key)")
    p = sub.add_parser("history", help="an account's deposits, reserves, releases and settlements, newest first")
    p.add_argument("account", nargs="?", default="", help="hex public key or 'network' (default: this data dir's key)")
    p.add_argument("--limit", type=int, default=50)
    p = sub.add_parser("payouts", help="CSV of what each operator earned in an epoch")
    p.add_argument("--epoch", type=int, required=True)
    sub.add_parser("settle", help="close the current epoch now (settle pending vouchers, expire lanes)")
    p = sub.add_parser("proof", help="write a row's inclusion proof (with the signed summary) to a file")
    p.add_argument("--epoch", type=int, required=True)
    p.add_argument("--row", type=int, required=True)
    p.add_argument("--out", required=True, help="file to write")
    p = sub.add_parser("verify-epoch", help="check an epoch's signature, row chain and Merkle root, or a proof file")
    p.add_argument("--epoch", type=int, default=0, help="epoch number (default: the latest)")
    p.add_argument("--proof", metavar="FILE", help="check this exported proof instead of the local store")
    p.add_argument("--ledger-key", default="", help="the ledger's hex public key to trust (default: the one in the summary)")


def _amount(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of micro-credits") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the amount must be positive")
    return value


def run(args: argparse.Namespace, config: Config) -> int:
    action = args.ledger_command
    if action is None:
        print("darkbloom ledger: choose an action: deposit, balance, history, payouts, settle, proof, verify-epoch", file=sys.stderr)
        return 2
    if action == "verify-epoch" and args.proof:
        return _verify_proof_file(Path(args.proof), args.ledger_key)
    from darkbloom.ledger.store import open_store

    store = open_store(config.ledger.url, config.data_path)
    try:
        return _ACTIONS[action](args, config, store)
    finally:
        store.close()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _own_account(config: Config) -> str:
    from darkbloom.identity import load_or_create_identity

    return load_or_create_identity(config.data_path).public_key.hex()


def _credits(micro: int) -> str:
    return f"{micro / 1_000_000:,.6f}"


def _deposit(args, config, store) -> int:
    balance = store.deposit(args.account, args.amount, now_ms=_now_ms())
    print(f"deposited {args.amount} to {args.account[:16]}; balance {balance} ({_credits(balance)} credits)")
    return 0


def _balance(args, config, store) -> int:
    account = args.account or _own_account(config)
    balance, reserved = store.balance(account)
    print(f"account  {account}")
    print(f"balance  {balance} ({_credits(balance)} credits)")
    print(f"reserved {reserved} ({_credits(reserved)} credits)")
    return 0


def _history(args, config, store) -> int:
    account = args.account or _own_account(config)
    entries = store.history(account, args.limit)
    if not entries:
        print(f"no history for {account[:16]}")
        return 0
    print(f"{'time (UTC)':20} {'kind':8} {'balance':>14} {'reserved':>14}  ref")
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.at_ms / 1000))
        print(f"{when:20} {e.kind:8} {e.d_balance:>+14} {e.d_reserved:>+14}  {e.ref}")
    return 0


def _payouts(args, config, store) -> int:
    summary = store.summary(args.epoch)
    if summary is None or args.epoch <= 0:
        raise LedgerError(f"epoch {args.epoch} is not closed", hint="run `darkbloom ledger settle`, or pick a closed epoch")
    network = sum(r.network_amount for r in store.rows(args.epoch))
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["epoch", "account", "prompt_tokens", "completion_tokens", "paying_consumers", "amount"])
    for n in summary.nodes:
        writer.writerow([summary.epoch, n.node, n.prompt_tokens, n.completion_tokens, n.paying_consumers, n.paid])
    writer.writerow([summary.epoch, NETWORK_ACCOUNT, "", "", "", network])
    return 0


def _settle(args, config, store) -> int:
    from darkbloom.identity import load_or_create_identity
    from darkbloom.ledger.settlement import share_ppm

    outcome = store.settle(
        ledger=load_or_create_identity(config.data_path),
        now_ms=_now_ms(),
        operator_ppm=share_ppm(config.ledger.operator_share),
        grace_ms=config.ledger.epoch_s * 1000,
    )
    s = outcome.summary
    print(f"epoch {s.epoch} closed: {s.row_count} vouchers settled, {len(outcome.rejected)} refused, paid {s.total_paid}, released {s.released}")
    print(f"root {s.root.hex()}")
    for r in outcome.rejected[:20]:
        print(f"  refused lane {r.lane[:16]} seq {r.seq}: {r.code}: {r.reason}")
    return 0


def _proof(args, config, store) -> int:
    from darkbloom.wire.codec import encode
    from darkbloom.wire.ledger import ProofReply

    row, path, summary = store.proof(args.epoch, args.row)
    Path(args.out).write_bytes(encode(ProofReply(row=row, path=path, summary=summary)))
    print(f"wrote the proof of epoch {args.epoch} row {args.row} to {args.out}")
    return 0


def _verify_epoch(args, config, store) -> int:
    from darkbloom.ledger import merkle
    from darkbloom.ledger.receipts import row_hash, summary_hash, verify

    summary = store.summary(args.epoch)
    if summary is None:
        raise LedgerError("no closed epoch to verify" if args.epoch <= 0 else f"epoch {args.epoch} is not closed")
    key = args.ledger_key or summary.ledger
    verify(summary, key)
    rows = store.rows(summary.epoch)
    hashes = [row_hash(r) for r in rows]
    problems = []
    if len(rows) != summary.row_count:
        problems.append(f"{len(rows)} rows stored, summary says {summary.row_count}")
    if merkle.merkle_root(hashes) != summary.root:
        problems.append("the rows do not hash to the signed root")
    for prev_row, row in zip(rows, rows[1:]):
        if row.prev_hash != row_hash(prev_row):
            problems.append(f"row {row.index} does not chain to row {prev_row.index}")
    if rows and summary.head != hashes[-1]:
        problems.append("the summary's head is not the last row")
    if summary.epoch > 1:
        previous = store.summary(summary.epoch - 1)
        if previous is None or summary.prev_summary != summary_hash(previous):
            problems.append("the summary does not chain to the previous epoch's")
        elif rows and rows[0].prev_hash != previous.head:
            problems.append("the first row does not chain to the previous epoch's head")
    if problems:
        for p in problems:
            print(f"FAIL epoch {summary.epoch}: {p}")
        return 1
    print(f"ok: epoch {summary.epoch} signed by {key[:16]}, {len(rows)} rows chain and hash to root {summary.root.hex()[:16]}")
    return 0


def _verify_proof_file(path: Path, ledger_key: str) -> int:
    from darkbloom.ledger import merkle
    from darkbloom.ledger.receipts import decode_strict
    from darkbloom.wire.ledger import ProofReply

    try:
        proof = decode_strict(path.read_bytes(), ProofReply)
    except OSError as exc:
        raise LedgerError(f"cannot read {path}: {exc.strerror}") from None
    key = ledger_key or proof.summary.ledger
    merkle.check_proof(proof, key)
    print(
        f"ok: epoch {proof.summary.epoch} row {proof.row.index} (lane {proof.row.lane[:16]} seq {proof.row.seq}, "
        f"paid {proof.row.paid}) is under the root signed by {key[:16]}"
    )
    return 0


_ACTIONS = {
    "deposit": _deposit,
    "balance": _balance,
    "history": _history,
    "payouts": _payouts,
    "settle": _settle,
    "proof": _proof,
    "verify-epoch": _verify_epoch,
}
