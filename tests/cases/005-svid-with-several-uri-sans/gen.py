#!/usr/bin/env python3
"""Rebuild this case: leaf certificates, properly signed by a trust-domain
authority, that carry more than one URI SAN; plus a one-URI leaf for
contrast. Each leaf comes with its (test-only) private key.

usage: python3 gen.py [--out DIR] [--ca-cert PEM --ca-key PEM]
Without --ca-cert/--ca-key a throw-away root for example.org is made and
written as bundle.pem; with them the leaves are signed by that authority
(for instance the authority of a dmc instance under test).
"""

import argparse
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM
FIXED = (datetime(2025, 1, 1, tzinfo=timezone.utc), datetime(2045, 1, 1, tzinfo=timezone.utc))
USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def key_usage(*on):
    return x509.KeyUsage(**{name: name in on for name in USAGES})


def make_root(td):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{td} fixture root")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(FIXED[0])
        .not_valid_after(FIXED[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(key_usage("key_cert_sign", "crl_sign"), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{td}")]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_leaf(ca_cert, ca_key, uris, validity):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage("digital_signature"), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--ca-cert", type=Path)
    ap.add_argument("--ca-key", type=Path)
    args = ap.parse_args()
    if args.ca_cert:
        ca_cert = x509.load_pem_x509_certificate(args.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(args.ca_key.read_bytes(), None)
        td = ca_cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)[0][9:]
        now = datetime.now(timezone.utc)
        validity = (
            now - timedelta(minutes=5),
            min(now + timedelta(hours=1), ca_cert.not_valid_after_utc),
        )
    else:
        td = "example.org"
        ca_cert, ca_key = make_root(td)
        validity = FIXED
    me = f"spiffe://{td}/workload/api"
    leaves = {
        # A non-SPIFFE URI placed before the SPIFFE ID.
        "svid-https-uri-then-spiffe-id": ["https://inventory.example.org/host/42", me],
        # Two SPIFFE IDs in one leaf.
        "svid-two-spiffe-ids": [me, f"spiffe://{td}/admin"],
        # Contrast: a conforming X.509-SVID.
        "svid-one-uri-ok": [me],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bundle.pem").write_bytes(ca_cert.public_bytes(PEM))
    for name, uris in leaves.items():
        cert, key = make_leaf(ca_cert, ca_key, uris, validity)
        (args.out / f"{name}.pem").write_bytes(cert.public_bytes(PEM))
        (args.out / f"{name}.key").write_bytes(
            key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )


if __name__ == "__main__":
    main()
