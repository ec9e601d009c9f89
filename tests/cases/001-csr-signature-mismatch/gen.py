#!/usr/bin/env python3
"""Rebuild this case: CSRs whose signature does not prove possession of the
key they carry, plus one sound CSR for contrast.

usage: python3 gen.py [--out DIR] [--id SPIFFE_ID]
"""

import argparse
import base64
import textwrap
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

DER = serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
# DER of the OIDs ecdsa-with-SHA256 and ecdsa-with-SHA384 (same length).
SHA256_OID = bytes.fromhex("06082a8648ce3d040302")
SHA384_OID = bytes.fromhex("06082a8648ce3d040303")


def pem(der):
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n"


def csr_der(key, spiffe_id):
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)])
    return builder.add_extension(san, critical=False).sign(key, hashes.SHA256()).public_bytes(DER)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--id", default="spiffe://example.org/workload/api")
    args = ap.parse_args()
    key_a = ec.generate_private_key(ec.SECP256R1())
    key_b = ec.generate_private_key(ec.SECP256R1())
    good = csr_der(key_a, args.id)

    # 1. One bit of the signature value flipped.
    flipped = bytearray(good)
    flipped[-1] ^= 0x01

    # 2. Signed by key B, but carrying key A (no proof of possession of A).
    spki_a = key_a.public_key().public_bytes(DER, SPKI)
    spki_b = key_b.public_key().public_bytes(DER, SPKI)
    swapped = csr_der(key_b, args.id).replace(spki_b, spki_a)

    # 3. Signed with SHA-256 but labelled ecdsa-with-SHA384.
    relabelled = good.replace(SHA256_OID, SHA384_OID)

    files = {
        "csr-ok.pem": good,
        "csr-signature-bit-flipped.pem": bytes(flipped),
        "csr-key-swapped.pem": swapped,
        "csr-algorithm-relabelled.pem": relabelled,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, der in files.items():
        valid = x509.load_der_x509_csr(der).is_signature_valid
        assert valid == (name == "csr-ok.pem"), name
        (args.out / name).write_text(pem(der))


if __name__ == "__main__":
    main()
