"""Identity: created once with mode 0600, reused, and refused when corrupt or exposed."""

from __future__ import annotations

import os
import stat

import pytest

from darkbloom.errors import IdentityError
from darkbloom.identity import KEY_FILE, Identity, load_or_create_identity, verify_signature


def test_created_once_then_reused(tmp_path):
    first = load_or_create_identity(tmp_path / "node")
    path = tmp_path / "node" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_identity(tmp_path / "node")
    assert again.public_key == first.public_key
    assert len(first.public_key) == 32


def test_distinct_dirs_distinct_keys(tmp_path):
    assert load_or_create_identity(tmp_path / "a").public_key != load_or_create_identity(tmp_path / "b").public_key


def test_signatures_verify_and_reject_tampering():
    ident = Identity.generate()
    sig = ident.sign(b"hello")
    assert verify_signature(ident.public_key, b"hello", sig)
    assert not verify_signature(ident.public_key, b"hellO", sig)
    assert not verify_signature(Identity.generate().public_key, b"hello", sig)
    assert not verify_signature(ident.public_key, b"hello", sig[:-1])
    assert not verify_signature(b"short", b"hello", sig)


def test_repr_hides_the_seed():
    ident = Identity.generate()
    assert ident.seed.hex() not in repr(ident)


@pytest.mark.parametrize("content", ["not hex\n", "abcd\n", ""])
def test_corrupt_key_is_refused(tmp_path, content):
    path = tmp_path / KEY_FILE
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError) as info:
        load_or_create_identity(tmp_path)
    assert str(path) in str(info.value)
    assert "delete it" in info.value.hint


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_exposed_key_is_refused(tmp_path, mode):
    load_or_create_identity(tmp_path)
    path = tmp_path / KEY_FILE
    path.chmod(mode)
    with pytest.raises(IdentityError, match="readable by others") as info:
        load_or_create_identity(tmp_path)
    assert "chmod 600" in info.value.hint


def test_unwritable_data_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(IdentityError, match="cannot create data dir"):
        load_or_create_identity(blocker / "sub")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_data_dir(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(IdentityError, match="cannot write"):
            load_or_create_identity(tmp_path)
    finally:
        tmp_path.chmod(0o700)
