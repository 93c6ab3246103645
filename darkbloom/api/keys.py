"""Hosted-mode API keys: stored hashed (scrypt) in the shim's SQLite, with limits, quotas and usage.

A key reads `dbk-<key id>-<secret>`; only scrypt(secret, salt) is stored, under the key id.
`KeyStore` is stdlib `sqlite3` on one worker thread at a time (a CapacityLimiter of 1, WAL
mode); its `*_sync` methods are the same operations for the CLI. `KeyAuthenticator` is the
app's `Authenticator`: 401 for a missing, unknown or revoked key, 429 with Retry-After for a
rate limit or an exhausted quota, and usage per key and model after each answer. Each key
names the ledger account it spends from.

Paying per key (hosted mode): a key created without `--account` gets its own ledger account,
an Ed25519 key the shim generates and keeps (its seed in the key store, a 0600 file in a
0700 directory, like the shim's identity). The host deposits to that account
(`darkbloom ledger deposit <account>`); the shim opens that key's lanes and signs its vouchers
with it, so the ledger debits the key's account and its history is the key's bill. `authenticate`
sets `darkbloom.api.metering.PAYER` for the request. A key created with `--account` names an
account whose key the shim does not hold: its requests are paid from the shim's own account.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from darkbloom.api import errors as api_errors
from darkbloom.api.app import Principal
from darkbloom.api.limits import KeyLimits, RateLimiter
from darkbloom.api.metering import PAYER
from darkbloom.errors import ApiError, ConfigError
from darkbloom.identity import Identity

__all__ = ["ApiKey", "KeyAuthenticator", "KeyStore", "KEYS_FILE"]

log = logging.getLogger(__name__)

KEYS_FILE = "keys.sqlite3"
PREFIX = "dbk"
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
RECHECK_S = 10.0  # how often a cached key is checked for revocation

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    account TEXT NOT NULL,
    requests_per_min INTEGER NOT NULL DEFAULT 0,
    tokens_per_min INTEGER NOT NULL DEFAULT 0,
    quota_tokens INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS key_usage (
    key_id TEXT NOT NULL REFERENCES api_keys(id),
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, model)
);
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKey:
    id: str
    name: str
    account: str
    limits: KeyLimits
    created_at: float
    revoked_at: float | None = None
    used_tokens: int = 0
    requests: int = 0
    payer: Identity | None = field(default=None, repr=False, compare=False)  # signs for `account`, when the shim holds it


def _hash(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)


def _split(api_key: str) -> tuple[str, str] | None:
    parts = api_key.split("-", 2)
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


class KeyStore:
    """The key table in `<dir>/keys.sqlite3`. Sync methods for the CLI, async ones for the app."""

    def __init__(self, directory: Path) -> None:
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.path = directory / KEYS_FILE
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self.path.chmod(0o600)  # it holds the keys' account seeds
            self._db.executescript(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(api_keys)")}
            if "account_seed" not in columns:  # a key store from before per-key accounts
                self._db.execute("ALTER TABLE api_keys ADD COLUMN account_seed BLOB")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the key store in {directory}: {exc}", hint="choose a writable --data-dir") from exc
        self._limiter = trio.CapacityLimiter(1)

    def close(self) -> None:
        self._db.close()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # --- operations (sync: CLI, or inside the worker thread) ---------------------------------

    def create_sync(self, name: str, *, account: str = "", limits: KeyLimits = KeyLimits()) -> tuple[str, ApiKey]:
        """A new key: returns the full key (shown once) and its record."""
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        now = time.time()
        payer = None
        if not account:  # the key's own ledger account, held by the shim (see the module docstring)
            payer = Identity.generate()
            account = payer.public_key.hex()
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO api_keys (id, name, salt, hash, account, requests_per_min, tokens_per_min, quota_tokens,"
                " created_at, account_seed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, name, salt, _hash(secret, salt), account, limits.requests_per_min, limits.tokens_per_min,
                 limits.quota_tokens, now, payer.seed if payer is not None else None),
            )
        return f"{PREFIX}-{key_id}-{secret}", ApiKey(id=key_id, name=name, account=account, limits=limits, created_at=now,
                                                      payer=payer)

    def list_sync(self) -> list[ApiKey]:
        rows = self._db.execute(
            "SELECT k.id, k.name, k.account, k.requests_per_min, k.tokens_per_min, k.quota_tokens, k.created_at,"
            " k.revoked_at, COALESCE(SUM(u.prompt_tokens + u.completion_tokens), 0), COALESCE(SUM(u.requests), 0)"
            " FROM api_keys k LEFT JOIN key_usage u ON u.key_id = k.id GROUP BY k.id ORDER BY k.created_at"
        ).fetchall()
        return [
            ApiKey(id=r[0], name=r[1], account=r[2], limits=KeyLimits(requests_per_min=r[3], tokens_per_min=r[4],
                                                                       quota_tokens=r[5]),
                   created_at=r[6], revoked_at=r[7], used_tokens=r[8], requests=r[9])
            for r in rows
        ]

    def revoke_sync(self, key_id: str) -> bool:
        with self._db:
            self._db.execute("BEGIN")
            cur = self._db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                                   (time.time(), key_id))
        return cur.rowcount == 1

    def verify_sync(self, api_key: str) -> ApiKey | None:
        parts = _split(api_key)
        if parts is None:
            return None
        key_id, secret = parts
        row = self._db.execute(
            "SELECT salt, hash, name, account, requests_per_min, tokens_per_min, quota_tokens, created_at, revoked_at,"
            " account_seed FROM api_keys WHERE id = ?", (key_id,)
        ).fetchone()
        if row is None or row[8] is not None:
            return None
        if not hmac.compare_digest(_hash(secret, row[0]), row[1]):
            return None
        used = self._db.execute(
            "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM key_usage WHERE key_id = ?", (key_id,)
        ).fetchone()[0]
        payer = Identity.from_seed(bytes(row[9])) if row[9] is not None else None
        return ApiKey(id=key_id, name=row[2], account=row[3],
                      limits=KeyLimits(requests_per_min=row[4], tokens_per_min=row[5], quota_tokens=row[6]),
                      created_at=row[7], used_tokens=used, payer=payer)

    def is_active_sync(self, key_id: str) -> bool:
        row = self._db.execute("SELECT revoked_at FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return row is not None and row[0] is None

    def record_sync(self, key_id: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO key_usage (key_id, model, requests, prompt_tokens, completion_tokens) VALUES (?, ?, 1, ?, ?)"
                " ON CONFLICT (key_id, model) DO UPDATE SET requests = requests + 1,"
                " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                " completion_tokens = completion_tokens + excluded.completion_tokens",
                (key_id, model, prompt_tokens, completion_tokens),
            )

    def usage_sync(self, key_id: str) -> dict[str, tuple[int, int, int]]:
        rows = self._db.execute(
            "SELECT model, requests, prompt_tokens, completion_tokens FROM key_usage WHERE key_id = ? ORDER BY model",
            (key_id,)).fetchall()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    # --- async, for the app -------------------------------------------------------------------

    async def verify(self, api_key: str) -> ApiKey | None:
        return await self._run(self.verify_sync, api_key)

    async def is_active(self, key_id: str) -> bool:
        return await self._run(self.is_active_sync, key_id)

    async def record(self, key_id: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        await self._run(self.record_sync, key_id, model, prompt_tokens, completion_tokens)


class KeyAuthenticator:
    """The app's `Authenticator` over a `KeyStore`: keys, per-key limits and quotas, usage."""

    def __init__(self, store: KeyStore, *, clock: Any = time.monotonic) -> None:
        self.store = store
        self.clock = clock
        self.limiter = RateLimiter()
        # sha256(full key) -> (key, when last confirmed not revoked): skips scrypt after the first use
        self._verified: dict[bytes, tuple[ApiKey, float]] = {}
        self._used: dict[str, int] = {}  # key id -> tokens used (quota), kept current in memory

    async def authenticate(self, api_key: str | None) -> Principal:
        if not api_key:
            raise api_errors.invalid_api_key("You didn't provide an API key: send 'Authorization: Bearer <key>'.")
        fast = hashlib.sha256(api_key.encode()).digest()
        now = self.clock()
        cached = self._verified.get(fast)
        if cached is not None and now - cached[1] > RECHECK_S:
            # `darkbloom shim keys revoke` runs in another process: look again now and then.
            if not await self.store.is_active(cached[0].id):
                del self._verified[fast]
                raise api_errors.invalid_api_key("This API key has been revoked.")
            cached = self._verified[fast] = (cached[0], now)
        if cached is None:
            key = await self.store.verify(api_key)
            if key is None:
                raise api_errors.invalid_api_key()
            cached = self._verified[fast] = (key, now)
            self._used.setdefault(key.id, key.used_tokens)
        key = cached[0]
        PAYER.set(key.payer)  # this request's lanes are opened and its vouchers signed by the key's account
        return Principal(key_id=key.id, account=key.account)

    def _key(self, principal: Principal) -> ApiKey:
        for k, _ in self._verified.values():
            if k.id == principal.key_id:
                return k
        raise api_errors.invalid_api_key()

    async def admit(self, principal: Principal, *, estimated_tokens: int) -> None:
        key = self._key(principal)
        if key.limits.quota_tokens and self._used.get(key.id, 0) >= key.limits.quota_tokens:
            raise ApiError(429, f"you exceeded your quota of {key.limits.quota_tokens} tokens for this key",
                           type="insufficient_quota", code="insufficient_quota")
        blocked = self.limiter.check(key.id, key.limits, estimated_tokens, self.clock())
        if blocked is not None:
            what, wait_s = blocked
            log.info("key %s rate limited (%s)", key.id, what)
            raise api_errors.rate_limited(what, wait_s)

    async def record(self, principal: Principal, *, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        total = prompt_tokens + completion_tokens
        self.limiter.spend(principal.key_id, total, self.clock())
        self._used[principal.key_id] = self._used.get(principal.key_id, 0) + total
        await self.store.record(principal.key_id, model, prompt_tokens, completion_tokens)
