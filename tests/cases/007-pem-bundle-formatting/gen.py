#!/usr/bin/env python3
"""Rebuild this case: one two-certificate trust bundle written out in the
ways operators actually hand bundles over (extra blank lines, CRLF, text
around the blocks, DER) and in two broken ways (a cut-off block, a block
with a stray character).

usage: python3 gen.py [--out DIR]
"""

import argparse
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

FIXED = (datetime(2025, 1, 1, tzinfo=timezone.utc), datetime(2045, 1, 1, tzinfo=timezone.utc))


def make_root(label):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"example.org fixture root {label}")]
    )
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(FIXED[0])
        .not_valid_after(FIXED[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    a, b = make_root("A"), make_root("B")
    pa = a.public_bytes(serialization.Encoding.PEM).decode()
    pb = b.public_bytes(serialization.Encoding.PEM).decode()
    lines_b = pb.splitlines()
    files = {
        "bundle-clean.pem": pa + pb,
        "bundle-trailing-blank-lines.pem": pa + pb + "\n\n  \n\t\n",
        "bundle-leading-and-between-blank-lines.pem": "\n\n" + pa + "\n\n" + pb,
        "bundle-crlf.pem": (pa + pb).replace("\n", "\r\n"),
        "bundle-explanatory-text.pem": (
            f"subject={a.subject.rfc4514_string()}\n"
            + pa
            + f"\nsubject={b.subject.rfc4514_string()}\n# second authority\n"
            + pb
            + "# end of bundle\n"
        ),
        # Broken: the second block lost its last base64 line and END line.
        "bundle-second-block-truncated.pem": pa + "\n".join(lines_b[:-2]) + "\n",
        # Broken: a character outside base64 inside the second block.
        "bundle-second-block-bad-char.pem": pa
        + "\n".join(lines_b[:3] + [lines_b[3][:10] + "!" + lines_b[3][11:]] + lines_b[4:])
        + "\n",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_bytes(text.encode())
    # DER has room for one certificate only.
    (args.out / "root-a.der").write_bytes(a.public_bytes(serialization.Encoding.DER))


if __name__ == "__main__":
    main()
