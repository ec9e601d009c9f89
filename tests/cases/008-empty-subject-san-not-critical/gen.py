#!/usr/bin/env python3
"""Rebuild this case: a CSR with an empty subject and a non-critical SAN
(the usual shape of a SPIFFE CSR), and two reference leaves with an empty
subject: one whose SAN extension is non-critical (non-conforming) and one
whose SAN extension is critical (conforming).

usage: python3 gen.py [--out DIR] [--id SPIFFE_ID]
"""

import argparse
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM
FIXED = (datetime(2025, 1, 1, tzinfo=timezone.utc), datetime(2045, 1, 1, tzinfo=timezone.utc))


def key_usage(ca):
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def cert(subject, issuer, pub, signer, uri, ca, san_critical):
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(FIXED[0])
        .not_valid_after(FIXED[1])
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(key_usage(ca), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
            critical=san_critical,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
    )
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--id", default="spiffe://example.org/workload/api")
    args = ap.parse_args()
    td = "spiffe://" + args.id.split("/")[2]
    empty = x509.Name([])
    args.out.mkdir(parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(empty)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(args.id)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    (args.out / "csr-empty-subject.pem").write_bytes(csr.public_bytes(PEM))

    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example.org fixture root")])
    root = cert(root_name, root_name, root_key.public_key(), root_key, td, True, False)
    (args.out / "bundle.pem").write_bytes(root.public_bytes(PEM))
    for name, critical in (
        ("leaf-empty-subject-san-noncritical.pem", False),
        ("leaf-empty-subject-san-critical.pem", True),
    ):
        leaf = cert(empty, root_name, key.public_key(), root_key, args.id, False, critical)
        (args.out / name).write_bytes(leaf.public_bytes(PEM))


if __name__ == "__main__":
    main()
