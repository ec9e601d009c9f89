"""The key-encryption key (KEK) that seals authority keys before they go to etcd (SPEC §5).

The KEK is 32 random bytes in a file of mode 0600 beside the CA; it never enters etcd. A
sealed key is ``nonce || AES-256-GCM(ciphertext || tag)`` with a fresh 12-byte nonce, and the
associated data binds it to its etcd key, so a sealed key copied under another authority's
key does not open.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dmc.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from dmc.files import write_atomic

__all__ = ["KEK_SIZE", "generate_kek_file", "load_kek", "seal", "unseal"]

_log = logging.getLogger(__name__)

KEK_SIZE = 32
_NONCE_SIZE = 12
_TAG_SIZE = 16
_KEK_MODE = 0o600


def generate_kek_file(path: str | os.PathLike[str]) -> None:
    """Write a new KEK of 32 random bytes to ``path`` (mode 0600, atomically).

    An existing file is never replaced: every key sealed under it would be lost.
    """
    path = Path(path)
    if path.exists():
        raise AlreadyExists(f"key-encryption key file {path} exists already; it is kept")

    write_atomic(path, os.urandom(KEK_SIZE), _KEK_MODE)

    _log.info("created key-encryption key file %s", path)


def load_kek(path: str | os.PathLike[str]) -> bytes:
    """Read the KEK from ``path``, refusing a file of the wrong size or open to others."""
    path = Path(path)
    try:
        with path.open("rb") as kek_file:
            mode = os.fstat(kek_file.fileno()).st_mode
            data = kek_file.read(KEK_SIZE + 1)
    except FileNotFoundError:
        raise NotFound(f"key-encryption key file {path} does not exist") from None
    except OSError as exc:
        raise FailedPrecondition(
            f"key-encryption key file {path} cannot be read: {exc.strerror}"
        ) from None

    # Like ssh with private keys: a secret that group or others can reach is refused.
    if stat.S_IMODE(mode) & 0o077:
        raise FailedPrecondition(
            f"key-encryption key file {path} is open to group or others"
            f" (mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    if len(data) != KEK_SIZE:
        size = f"{len(data)} bytes" if len(data) <= KEK_SIZE else "more than 32 bytes"
        raise InvalidArgument(
            f"key-encryption key file {path} holds {size}; a KEK is exactly {KEK_SIZE} bytes"
        )
    return data


def seal(kek: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt ``plaintext`` under ``kek``, bound to ``aad`` (the etcd key it is stored at)."""
    nonce = os.urandom(_NONCE_SIZE)
    return nonce + _aead(kek).encrypt(nonce, plaintext, aad)


def unseal(kek: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Decrypt what `seal` made; `FailedPrecondition` if the KEK, data or ``aad`` differ."""
    if len(sealed) < _NONCE_SIZE + _TAG_SIZE:
        raise InvalidArgument(
            f"a sealed key is at least {_NONCE_SIZE + _TAG_SIZE} bytes; this one has {len(sealed)}"
        )

    try:
        return _aead(kek).decrypt(sealed[:_NONCE_SIZE], sealed[_NONCE_SIZE:], aad)
    except InvalidTag:
        # AES-GCM cannot tell a wrong key from changed data: name both causes.
        raise FailedPrecondition(
            "a sealed authority key does not open: the key-encryption key file is not the"
            " one it was sealed with, or the sealed data was changed or moved to another key"
        ) from None


def _aead(kek: bytes) -> AESGCM:
    if len(kek) != KEK_SIZE:
        raise InvalidArgument(f"a key-encryption key is {KEK_SIZE} bytes, not {len(kek)}")
    return AESGCM(kek)
