#!/usr/bin/env python3
"""Rebuild this case: CSRs that ask for signing-certificate powers
(basicConstraints CA:TRUE, keyCertSign, cRLSign), plus a CSR that states
CA:FALSE explicitly and must be accepted.

usage: python3 gen.py [--out DIR] [--id SPIFFE_ID]
"""

import argparse
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

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


def csr(spiffe_id, *extensions):
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)])
    builder = builder.add_extension(san, critical=False)
    for ext in extensions:
        builder = builder.add_extension(ext, critical=True)
    key = ec.generate_private_key(ec.SECP256R1())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--id", default="spiffe://example.org/workload/api")
    args = ap.parse_args()
    i = args.id
    files = {
        # A whole intermediate CA: CA:TRUE, pathLen 0, keyCertSign + cRLSign.
        "csr-ca-true.pem": csr(
            i,
            x509.BasicConstraints(ca=True, path_length=0),
            key_usage("digital_signature", "key_cert_sign", "crl_sign"),
        ),
        # Claims to be a leaf but still asks for keyCertSign.
        "csr-leaf-with-keycertsign.pem": csr(
            i,
            x509.BasicConstraints(ca=False, path_length=None),
            key_usage("digital_signature", "key_cert_sign"),
        ),
        # Asks only for cRLSign next to digitalSignature.
        "csr-crlsign.pem": csr(i, key_usage("digital_signature", "crl_sign")),
        # Contrast: an explicit CA:FALSE and plain digitalSignature are fine.
        "csr-ca-false-ok.pem": csr(
            i, x509.BasicConstraints(ca=False, path_length=None), key_usage("digital_signature")
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (args.out / name).write_bytes(data)


if __name__ == "__main__":
    main()
