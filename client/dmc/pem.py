"""Strict readers and writers for certificate and key files.

Bundles arrive in real-world formatting: CRLF line ends, blank lines, explanatory text
around the blocks (RFC 7468 §2 allows it). All of that is read. What is never tolerated is
a block that cannot be read whole: ``cryptography``'s own multi-certificate PEM loader
skips a cut-off block silently and returns a shorter bundle, so this module finds every
``-----BEGIN CERTIFICATE-----`` itself and fails naming the file and the block number.
"""

from __future__ import annotations

import binascii
import contextlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from dmc.errors import InvalidPem

__all__ = [
    "certificates_to_pem",
    "load_certificates",
    "load_certificates_file",
    "load_private_key",
    "load_private_key_file",
    "private_key_to_pem",
]

_CERTIFICATE = "CERTIFICATE"
_KEY_LABELS = ("PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY")
_ENCRYPTED_KEY_LABEL = "ENCRYPTED PRIVATE KEY"
_DER_SEQUENCE = b"\x30"
# RFC 7468 §3: a label is printable ASCII without '-', words separated by single spaces.
_LABEL = r"([\x21-\x2c\x2e-\x7e](?:[\x21-\x2c\x2e-\x7e ]*[\x21-\x2c\x2e-\x7e])?)"
_BEGIN = re.compile(rf"-----BEGIN {_LABEL}-----")
_END = re.compile(rf"-----END {_LABEL}-----")
_BASE64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


@dataclass(frozen=True, slots=True)
class _Block:
    label: str
    number: int  # 1-based among the blocks with the same label
    first_line: int
    der: bytes


def load_certificates(data: bytes, source: str) -> list[x509.Certificate]:
    """Every certificate in ``data`` (PEM, or one DER certificate), in file order.

    ``source`` names the input in messages (usually the file name). A cut-off or corrupt
    block, or input without any certificate, raises :class:`InvalidPem`.
    """
    if not data.strip():
        raise InvalidPem(f"{source}: no certificate found: the input is empty")
    if data.startswith(_DER_SEQUENCE):
        with contextlib.suppress(ValueError):
            return [x509.load_der_x509_certificate(data)]
    if b"-----BEGIN " not in data:
        raise InvalidPem(
            f"{source}: no PEM certificate found, and it is not a DER certificate either"
        )

    certificates = []
    for block in _pem_blocks(data, source):
        if block.label != _CERTIFICATE:
            continue
        try:
            certificates.append(x509.load_der_x509_certificate(block.der))
        except ValueError as exc:
            raise InvalidPem(
                f"{source}: certificate block {block.number} (line {block.first_line}) "
                f"is not a valid X.509 certificate: {exc}"
            ) from exc
    if not certificates:
        raise InvalidPem(f"{source}: no PEM certificate found (no '-----BEGIN CERTIFICATE-----')")
    return certificates


def load_certificates_file(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """Every certificate in the file at ``path``; see :func:`load_certificates`."""
    return load_certificates(_read(path), os.fspath(path))


def load_private_key(data: bytes, source: str) -> PrivateKeyTypes:
    """The one unencrypted private key in ``data`` (PEM PKCS#8, SEC 1 or PKCS#1, or DER)."""
    if not data.strip():
        raise InvalidPem(f"{source}: no private key found: the input is empty")
    if b"-----BEGIN " not in data:
        return _load_der_private_key(data, source)

    all_blocks = _pem_blocks(data, source)
    if any(block.label == _ENCRYPTED_KEY_LABEL for block in all_blocks):
        raise InvalidPem(f"{source}: the private key is encrypted; dmc reads unencrypted keys")
    blocks = [block for block in all_blocks if block.label in _KEY_LABELS]
    if len(blocks) != 1:
        raise InvalidPem(f"{source}: expected exactly one PEM private key, found {len(blocks)}")
    return _load_der_private_key(blocks[0].der, source)


def load_private_key_file(path: str | os.PathLike[str]) -> PrivateKeyTypes:
    """The private key in the file at ``path``; see :func:`load_private_key`."""
    return load_private_key(_read(path), os.fspath(path))


def certificates_to_pem(certificates: Iterable[x509.Certificate]) -> bytes:
    """The certificates as concatenated PEM blocks, in the given order."""
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certificates)


def private_key_to_pem(key: PrivateKeyTypes) -> bytes:
    """The key as unencrypted PKCS#8 PEM (write it with mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_blocks(data: bytes, source: str) -> list[_Block]:
    """Every PEM block in ``data``, each checked to be whole and pure base64."""
    # Latin-1 maps every byte to one character, so text around the blocks may be in any
    # encoding; the block lines themselves must be ASCII base64.
    lines = data.decode("latin-1").splitlines()
    counts: dict[str, int] = {}
    blocks: list[_Block] = []
    open_label: str | None = None
    open_number = open_line = 0
    body: list[str] = []

    for line_number, raw in enumerate(lines, start=1):
        line = raw.strip()
        begin, end = _BEGIN.fullmatch(line), _END.fullmatch(line)
        if open_label is None:
            if begin:
                open_label = begin.group(1)
                counts[open_label] = open_number = counts.get(open_label, 0) + 1
                open_line, body = line_number, []
            elif end:
                raise InvalidPem(
                    f"{source}: line {line_number} ends a {end.group(1)} block that never began"
                )
            continue
        if begin:
            raise _cut_off(source, open_label, open_number, open_line)
        if end:
            if end.group(1) != open_label:
                raise InvalidPem(
                    f"{source}: {_name(open_label, open_number)} (line {open_line}) "
                    f"ends with the END line of a {end.group(1)} block"
                )
            der = _decode_body(body, source, open_label, open_number, open_line)
            blocks.append(_Block(open_label, open_number, open_line, der))
            open_label = None
            continue
        body.append(line)

    if open_label is not None:
        raise _cut_off(source, open_label, open_number, open_line)
    return blocks


def _decode_body(lines: list[str], source: str, label: str, number: int, first: int) -> bytes:
    where = f"{source}: {_name(label, number)} (line {first})"
    for offset, line in enumerate(lines, start=1):
        if ":" in line:
            # RFC 1421 headers (Proc-Type, DEK-Info) mark legacy encrypted PEM.
            raise InvalidPem(f"{where} has a header line; encrypted or legacy PEM is not read")
        for char in line:
            if ord(char) > 0x7F or ord(char) not in _BASE64_CHARS:
                raise InvalidPem(
                    f"{where} has a character outside base64 ({_show(char)}) "
                    f"on line {first + offset}"
                )
    text = "".join(lines)
    if not text:
        raise InvalidPem(f"{where} is empty")
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except binascii.Error as exc:
        raise InvalidPem(f"{where} is not valid base64 (cut short?): {exc}") from exc


def _cut_off(source: str, label: str, number: int, first: int) -> InvalidPem:
    return InvalidPem(
        f"{source}: {_name(label, number)} (line {first}) is cut off: "
        f"no '-----END {label}-----' line"
    )


def _name(label: str, number: int) -> str:
    return f"certificate block {number}" if label == _CERTIFICATE else f"{label} block {number}"


def _show(char: str) -> str:
    return f"'{char}'" if char.isprintable() and ord(char) < 0x7F else f"byte 0x{ord(char):02x}"


def _load_der_private_key(der: bytes, source: str) -> PrivateKeyTypes:
    try:
        return serialization.load_der_private_key(der, password=None)
    except TypeError as exc:
        raise InvalidPem(
            f"{source}: the private key is encrypted; dmc reads unencrypted keys"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidPem(f"{source}: not a readable private key: {exc}") from exc


def _read(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise InvalidPem(f"{os.fspath(path)}: cannot read: {exc.strerror}") from exc
