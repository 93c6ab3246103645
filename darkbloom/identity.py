"""A role's Ed25519 identity: created on first start in its data dir (mode 0600), reused after.

The same 32-byte seed gives the libp2p peer id (see `darkbloom.p2p`) and signs capability
records and vouchers. The file holds the raw seed, hex-encoded, on one line.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from darkbloom.errors import IdentityError

__all__ = ["Identity", "KEY_FILE", "load_or_create_identity", "verify_signature"]

KEY_FILE = "identity.key"


@dataclass(frozen=True, slots=True)
class Identity:
    """An Ed25519 signing key. `public_key` is the raw 32 bytes others verify against."""

    signing_key: nacl.signing.SigningKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        return cls(nacl.signing.SigningKey(seed))

    @property
    def seed(self) -> bytes:
        return bytes(self.signing_key)

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte detached signature of `data`."""
        return self.signing_key.sign(data).signature

    def __repr__(self) -> str:  # never print the seed
        return f"Identity(public_key={self.public_key.hex()[:16]}...)"


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True when `signature` is `public_key`'s Ed25519 signature of `data`."""
    try:
        nacl.signing.VerifyKey(public_key).verify(data, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError, ValueError):
        return False
    return True


def load_or_create_identity(data_dir: Path) -> Identity:
    """Read `data_dir/identity.key`, or create it (0600) when it does not exist.

    Raises IdentityError when the file is corrupt or readable by group or others, or when
    the data dir cannot be written.
    """
    path = Path(data_dir) / KEY_FILE
    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise IdentityError(
            f"cannot create data dir {data_dir}: {exc.strerror}", hint="choose a writable --data-dir"
        ) from exc
    if path.exists():
        return _read(path)
    identity = Identity.generate()
    tmp = path.with_suffix(".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(identity.seed.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise IdentityError(
            f"cannot write {path}: {exc.strerror}", hint="choose a writable --data-dir"
        ) from exc
    return identity


def _read(path: Path) -> Identity:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"{path} is readable by others (mode {stat.S_IMODE(mode):o})",
            hint=f"run `chmod 600 {path}`",
        )
    try:
        text = path.read_text().strip()
        seed = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IdentityError(
            f"{path} is not a Darkbloom key file", hint="restore it from backup, or delete it to make a new identity"
        ) from exc
    if len(seed) != 32:
        raise IdentityError(
            f"{path} holds {len(seed)} bytes, expected 32",
            hint="restore it from backup, or delete it to make a new identity",
        )
    return Identity.from_seed(seed)
