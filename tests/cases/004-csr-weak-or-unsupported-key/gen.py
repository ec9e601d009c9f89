#!/usr/bin/env python3
"""Rebuild this case: correctly self-signed CSRs whose public key is too
weak or of a type the CA does not issue for, plus CSRs for every key type
the contract allows.

usage: python3 gen.py [--out DIR] [--id SPIFFE_ID]
"""

import argparse
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa


def csr(key, spiffe_id):
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)])
    builder = builder.add_extension(san, critical=False)
    # Ed25519 and Ed448 sign without a separate hash.
    digest = (
        None
        if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey))
        else hashes.SHA256()
    )
    return builder.sign(key, digest).public_bytes(serialization.Encoding.PEM)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--id", default="spiffe://example.org/workload/api")
    args = ap.parse_args()
    keys = {
        # Must be refused: too small, or a key type outside the contract.
        "reject-rsa-1024.pem": rsa.generate_private_key(65537, 1024),
        "reject-rsa-2047.pem": rsa.generate_private_key(65537, 2047),
        "reject-ec-secp256k1.pem": ec.generate_private_key(ec.SECP256K1()),
        "reject-ec-p192.pem": ec.generate_private_key(ec.SECP192R1()),
        "reject-ed448.pem": ed448.Ed448PrivateKey.generate(),
        "reject-dsa-2048.pem": dsa.generate_private_key(2048),
        # Sound, but gRPC's TLS stack cannot use it in a certificate.
        "reject-ed25519.pem": ed25519.Ed25519PrivateKey.generate(),
        # Must be accepted: the key types the contract lists.
        "accept-ec-p256.pem": ec.generate_private_key(ec.SECP256R1()),
        "accept-ec-p384.pem": ec.generate_private_key(ec.SECP384R1()),
        "accept-rsa-2048.pem": rsa.generate_private_key(65537, 2048),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, key in keys.items():
        (args.out / f"csr-{name}").write_bytes(csr(key, args.id))


if __name__ == "__main__":
    main()
