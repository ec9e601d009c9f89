"""dmc_ca.sealing: the key-encryption key file and AES-GCM sealing of authority keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dmc.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from dmc_ca.sealing import KEK_SIZE, generate_kek_file, load_kek, seal, unseal

AAD = b"/dmc/example.org/authorities/0123456789abcdef"
SECRET = b"-----BEGIN PRIVATE KEY----- not really -----END PRIVATE KEY-----"


def _kek_file(tmp_path: Path, data: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "kek"
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_generate_kek_file_writes_32_random_bytes_with_mode_0600(tmp_path: Path) -> None:
    first, second = tmp_path / "a.kek", tmp_path / "b.kek"

    generate_kek_file(first)
    generate_kek_file(second)

    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert len(first.read_bytes()) == KEK_SIZE == 32
    assert first.read_bytes() != second.read_bytes()
    assert load_kek(first) == first.read_bytes()
    # Written atomically: no temporary file is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.kek", "b.kek"]


def test_generate_kek_file_never_replaces_an_existing_kek(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    generate_kek_file(path)
    before = path.read_bytes()

    with pytest.raises(AlreadyExists, match="exists already"):
        generate_kek_file(path)

    assert path.read_bytes() == before


def test_generate_kek_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        generate_kek_file(tmp_path / "kek")
    finally:
        os.umask(old)

    assert stat.S_IMODE((tmp_path / "kek").stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o620])
def test_load_kek_refuses_a_file_open_to_group_or_others(tmp_path: Path, mode: int) -> None:
    path = _kek_file(tmp_path, os.urandom(32), mode)

    with pytest.raises(FailedPrecondition) as caught:
        load_kek(path)

    assert f"mode {mode:04o}" in str(caught.value)
    assert "chmod 600" in str(caught.value)
    assert str(path) in str(caught.value)


def test_load_kek_accepts_an_owner_only_file(tmp_path: Path) -> None:
    data = os.urandom(32)

    assert load_kek(_kek_file(tmp_path, data, 0o400)) == data


@pytest.mark.parametrize(("size", "words"), [(0, "0 bytes"), (31, "31 bytes"), (33, "more than")])
def test_load_kek_refuses_the_wrong_size(tmp_path: Path, size: int, words: str) -> None:
    path = _kek_file(tmp_path, os.urandom(size))

    with pytest.raises(InvalidArgument, match=f"holds {words}.*exactly 32 bytes"):
        load_kek(path)


def test_load_kek_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        load_kek(tmp_path / "absent")


def test_seal_then_unseal_returns_the_plaintext() -> None:
    kek = os.urandom(32)

    sealed = seal(kek, SECRET, AAD)

    assert unseal(kek, sealed, AAD) == SECRET
    assert SECRET not in sealed
    # A 12-byte nonce, the ciphertext, and a 16-byte tag.
    assert len(sealed) == 12 + len(SECRET) + 16


def test_seal_uses_a_fresh_nonce_every_time() -> None:
    kek = os.urandom(32)

    first, second = seal(kek, SECRET, AAD), seal(kek, SECRET, AAD)

    assert first[:12] != second[:12]
    assert first != second


def test_unseal_with_another_kek_fails_clearly() -> None:
    sealed = seal(os.urandom(32), SECRET, AAD)

    with pytest.raises(FailedPrecondition, match="key-encryption key file is not the one"):
        unseal(os.urandom(32), sealed, AAD)


@pytest.mark.parametrize(
    "position", [0, 11, 12, -17, -1], ids=["nonce", "nonce-end", "body", "body-end", "tag"]
)
def test_unseal_refuses_tampered_data(position: int) -> None:
    kek = os.urandom(32)
    tampered = bytearray(seal(kek, SECRET, AAD))
    tampered[position] ^= 0x01

    with pytest.raises(FailedPrecondition, match="does not open"):
        unseal(kek, bytes(tampered), AAD)


def test_unseal_refuses_a_key_moved_to_another_etcd_key() -> None:
    kek = os.urandom(32)
    sealed = seal(kek, SECRET, AAD)

    with pytest.raises(FailedPrecondition, match="moved to another key"):
        unseal(kek, sealed, b"/dmc/example.org/authorities/fedcba9876543210")


def test_unseal_refuses_data_too_short_to_be_sealed() -> None:
    with pytest.raises(InvalidArgument, match="at least 28 bytes"):
        unseal(os.urandom(32), b"\x00" * 27, AAD)


@pytest.mark.parametrize("size", [16, 24, 31, 0])
def test_seal_refuses_a_kek_of_the_wrong_size(size: int) -> None:
    with pytest.raises(InvalidArgument, match="a key-encryption key is 32 bytes"):
        seal(os.urandom(size), SECRET, AAD)
