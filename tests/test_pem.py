"""Strict certificate and key readers, driven by cases/007 (PEM bundle formatting)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certgen import make_root, new_key
from dmc.errors import InvalidArgument, InvalidPem
from dmc.pem import (
    certificates_to_pem,
    load_certificates,
    load_certificates_file,
    load_private_key,
    load_private_key_file,
    private_key_to_pem,
)

CASE = Path(__file__).parent / "cases" / "007-pem-bundle-formatting"
READABLE = [
    "bundle-clean.pem",
    "bundle-trailing-blank-lines.pem",
    "bundle-leading-and-between-blank-lines.pem",
    "bundle-crlf.pem",
    "bundle-explanatory-text.pem",
]
BROKEN = {
    "bundle-second-block-truncated.pem": "certificate block 2 (line 12) is cut off",
    "bundle-second-block-bad-char.pem": "certificate block 2 (line 12) has a character "
    "outside base64 ('!') on line 15",
}


def _clean() -> list[x509.Certificate]:
    # The reference: two certificates, read by cryptography's own loader.
    return x509.load_pem_x509_certificates((CASE / "bundle-clean.pem").read_bytes())


def test_case_folder_holds_all_seven_bundles_and_the_der_root() -> None:
    assert sorted(p.name for p in CASE.glob("*.pem")) == sorted([*READABLE, *BROKEN])
    assert (CASE / "root-a.der").is_file()


@pytest.mark.parametrize("name", READABLE)
def test_harmless_formatting_reads_the_same_two_certificates(name: str) -> None:
    certificates = load_certificates_file(CASE / name)

    assert certificates == _clean()
    assert len(certificates) == 2


@pytest.mark.parametrize(("name", "detail"), sorted(BROKEN.items()))
def test_broken_block_fails_naming_file_and_block(name: str, detail: str) -> None:
    path = CASE / name

    with pytest.raises(InvalidPem) as caught:
        load_certificates_file(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert detail in message
    assert "\n" not in message


def test_cryptography_alone_would_return_a_shorter_bundle() -> None:
    # Why the reader exists: the library loader drops the cut-off block silently.
    data = (CASE / "bundle-second-block-truncated.pem").read_bytes()

    assert len(x509.load_pem_x509_certificates(data)) == 1
    with pytest.raises(InvalidPem, match="block 2"):
        load_certificates(data, "bundle")


def test_der_file_loads_as_its_one_certificate() -> None:
    assert load_certificates_file(CASE / "root-a.der") == _clean()[:1]


@pytest.mark.parametrize("data", [b"", b"\n\n  \r\n\t"])
def test_empty_input_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidPem, match=re.escape("bundle.pem: no certificate found")):
        load_certificates(data, "bundle.pem")


@pytest.mark.parametrize(
    "data",
    [
        bytes(range(256)),
        b"\x30\x82\x01\x00garbage",
        b"just some text\n",
        (CASE / "root-a.der").read_bytes()[:-1],
        (CASE / "root-a.der").read_bytes() + b"\x00",
    ],
    ids=["all-bytes", "fake-der-header", "text", "der-cut-short", "der-trailing-byte"],
)
def test_garbage_is_refused_saying_no_certificate_was_found(data: bytes) -> None:
    with pytest.raises(InvalidPem) as caught:
        load_certificates(data, "junk.bin")

    assert str(caught.value) == (
        "junk.bin: no PEM certificate found, and it is not a DER certificate either"
    )


def _pem_text() -> str:
    return (CASE / "bundle-clean.pem").read_text()


def test_block_with_base64_that_is_not_a_certificate_is_refused() -> None:
    text = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"

    with pytest.raises(InvalidPem, match=r"certificate block 1 .* not a valid X.509"):
        load_certificates(text.encode(), "x.pem")


def test_block_missing_middle_lines_is_refused() -> None:
    lines = _pem_text().splitlines()
    # Drop two full base64 lines of the first block: still valid base64, broken DER.
    damaged = "\n".join(lines[:3] + lines[5:]) + "\n"

    with pytest.raises(InvalidPem, match="certificate block 1"):
        load_certificates(damaged.encode(), "x.pem")


def test_block_with_bad_padding_is_refused() -> None:
    lines = _pem_text().splitlines()
    # Cut one character off the last base64 line of block 2, keeping the END line.
    lines[20] = lines[20][:-2]
    with pytest.raises(InvalidPem, match="certificate block 2"):
        load_certificates(("\n".join(lines) + "\n").encode(), "x.pem")


def test_end_line_without_begin_is_refused() -> None:
    text = _pem_text() + "-----END CERTIFICATE-----\n"

    with pytest.raises(InvalidPem, match="line 23 ends a CERTIFICATE block that never began"):
        load_certificates(text.encode(), "x.pem")


def test_begin_inside_an_open_block_means_the_first_was_cut_off() -> None:
    lines = _pem_text().splitlines()
    text = "\n".join(lines[:5] + lines[11:]) + "\n"  # block 1 lost its tail and END line

    with pytest.raises(InvalidPem, match=r"certificate block 1 .* is cut off"):
        load_certificates(text.encode(), "x.pem")


def test_empty_block_and_mismatched_end_are_refused() -> None:
    with pytest.raises(InvalidPem, match=r"certificate block 1 .* is empty"):
        load_certificates(b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n", "x")
    with pytest.raises(InvalidPem, match="ends with the END line of a X509 CRL block"):
        load_certificates(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END X509 CRL-----\n", "x")


def test_non_ascii_character_in_a_block_is_named() -> None:
    lines = _pem_text().splitlines()
    lines[2] = lines[2][:5] + "\u00e9" + lines[2][6:]
    data = ("\n".join(lines) + "\n").encode("utf-8")

    with pytest.raises(InvalidPem, match=r"certificate block 1 .*\(byte 0xc3\) on line 3"):
        load_certificates(data, "x.pem")


def test_other_blocks_are_skipped_but_must_be_whole() -> None:
    key_pem = private_key_to_pem(new_key()).decode()

    assert load_certificates((key_pem + _pem_text()).encode(), "x") == _clean()
    with pytest.raises(InvalidPem, match=r"PRIVATE KEY block 1 .* is cut off"):
        load_certificates((key_pem[:-30] + "\n" + _pem_text()).encode(), "x")


def test_pem_with_only_a_key_has_no_certificate() -> None:
    with pytest.raises(InvalidPem, match="no PEM certificate found"):
        load_certificates(private_key_to_pem(new_key()), "svid.key")


def test_utf8_explanatory_text_is_fine() -> None:
    text = "Zertifikat für example.org — Wurzel\n" + _pem_text() + "Ende ✓\n"

    assert load_certificates(text.encode("utf-8"), "x") == _clean()


def test_indented_blocks_are_read() -> None:
    text = "".join(f"    {line}\n" for line in _pem_text().splitlines())

    assert load_certificates(text.encode(), "x") == _clean()


def test_certificates_to_pem_round_trips_in_order() -> None:
    roots = [make_root().certificate, make_root("other.org").certificate]

    pem = certificates_to_pem(roots)

    assert load_certificates(pem, "x") == roots
    assert pem == b"".join(c.public_bytes(serialization.Encoding.PEM) for c in roots)


def test_missing_file_is_an_invalid_argument_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.pem"

    with pytest.raises(InvalidArgument, match=re.escape(f"{path}: cannot read")):
        load_certificates_file(path)
    with pytest.raises(InvalidPem, match=re.escape(f"{path}: cannot read")):
        load_private_key_file(os.fspath(path))


# ---------------------------------------------------------------- private keys


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa-2048"])
@pytest.mark.parametrize(
    "private_format",
    [
        serialization.PrivateFormat.PKCS8,
        serialization.PrivateFormat.TraditionalOpenSSL,
    ],
)
def test_private_key_reads_pkcs8_and_traditional_pem_and_der(
    key_type: str, private_format: serialization.PrivateFormat
) -> None:
    key = new_key(key_type)
    pem = key.private_bytes(
        serialization.Encoding.PEM, private_format, serialization.NoEncryption()
    )
    der = key.private_bytes(
        serialization.Encoding.DER, private_format, serialization.NoEncryption()
    )

    for data in (pem, pem.replace(b"\n", b"\r\n"), b"my key\n" + pem, der):
        loaded = load_private_key(data, "svid.key")
        assert loaded.private_numbers() == key.private_numbers()  # type: ignore[union-attr]


def test_private_key_to_pem_round_trips(tmp_path: Path) -> None:
    key = new_key()
    path = tmp_path / "svid.key"
    path.write_bytes(private_key_to_pem(key))

    assert private_key_to_pem(load_private_key_file(path)) == private_key_to_pem(key)
    assert private_key_to_pem(key).startswith(b"-----BEGIN PRIVATE KEY-----\n")


def test_encrypted_private_key_is_refused() -> None:
    key = new_key()
    for private_format in (
        serialization.PrivateFormat.PKCS8,
        serialization.PrivateFormat.TraditionalOpenSSL,
    ):
        data = key.private_bytes(
            serialization.Encoding.PEM,
            private_format,
            serialization.BestAvailableEncryption(b"secret"),
        )
        with pytest.raises(InvalidPem, match=r"svid.key: .*encrypted"):
            load_private_key(data, "svid.key")


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"", "no private key found"),
        (b"\x00\x01garbage", "not a readable private key"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "found 0"),
    ],
)
def test_unreadable_private_key_is_refused(data: bytes, detail: str) -> None:
    with pytest.raises(InvalidPem, match=f"svid.key: .*{detail}"):
        load_private_key(data, "svid.key")


def test_two_private_keys_are_refused() -> None:
    data = private_key_to_pem(new_key()) + private_key_to_pem(new_key())

    with pytest.raises(InvalidPem, match="exactly one PEM private key, found 2"):
        load_private_key(data, "svid.key")


def test_cut_off_private_key_is_refused() -> None:
    data = private_key_to_pem(new_key())

    with pytest.raises(InvalidPem, match=r"PRIVATE KEY block 1 .* is cut off"):
        load_private_key(data[:-30], "svid.key")
