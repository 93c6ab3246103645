"""The ledger store on PostgreSQL (`[ledger] url = "postgresql://..."`), through psycopg 3.

Same tables and SQL as the SQLite store (`SqlStore`); differences: `%s` placeholders,
BYTEA and BIGSERIAL, and the global ledger lock is a `SELECT ... FOR UPDATE` on the `lock`
row of `meta`, taken first in every writing transaction, so several relays or a CLI can
share one database without interleaving settlements.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from darkbloom.errors import ConfigError, LedgerError
from darkbloom.ledger.store import SqlStore

__all__ = ["PostgresStore"]


class PostgresStore(SqlStore):
    blob_type = "BYTEA"
    serial_type = "BIGSERIAL PRIMARY KEY"

    def __init__(self, url: str) -> None:
        import psycopg  # only when PostgreSQL is configured

        try:
            self._conn = psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError as exc:
            raise ConfigError(
                f"cannot connect to the ledger database: {str(exc).strip().splitlines()[0]}",
                key="ledger.url",
                hint="check that PostgreSQL is running and the url's host, port, user and database",
            ) from None
        super().__init__()

    def close(self) -> None:
        self._conn.close()

    def _q(self, sql: str) -> str:
        return _placeholders(sql)

    @contextlib.contextmanager
    def _tx(self, *, lock: bool = True) -> Iterator[Any]:
        import psycopg

        try:
            with self._conn.transaction(), self._conn.cursor() as cur:
                if lock:
                    cur.execute("SELECT num FROM meta WHERE key = 'lock' FOR UPDATE")
                yield cur
        except psycopg.OperationalError as exc:  # connection lost or server down: the transaction did not happen
            raise LedgerError(
                f"the ledger database is unavailable: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
                hint="check the PostgreSQL server; nothing was written",
            ) from None


@functools.lru_cache(maxsize=256)
def _placeholders(sql: str) -> str:
    return sql.replace("?", "%s")
