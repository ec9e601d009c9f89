#!/usr/bin/env python3
"""Rebuild this case: spiffe-ids.txt, a table of SPIFFE ID strings that are
valid or invalid because of their path segments, and a CSR whose URI SAN
carries a '..' segment.

Each line of spiffe-ids.txt is: verdict <TAB> id <TAB> offending part.
usage: python3 gen.py [--out DIR]
"""

import argparse
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

TD = "spiffe://example.org"
CASES = [
    ("valid", f"{TD}/ns/prod/sa/api", ""),
    ("valid", f"{TD}/Payments/Web-FE_2/v1.2", ""),
    # Only "." and ".." are special; other dotted segments are ordinary names.
    ("valid", f"{TD}/.../tools", ""),
    ("valid", f"{TD}/.hidden/..cache/a..b", ""),
    ("invalid", f"{TD}/ns/./api", "segment '.'"),
    ("invalid", f"{TD}/ns/prod/../admin", "segment '..'"),
    ("invalid", f"{TD}/..", "segment '..'"),
    ("invalid", f"{TD}/.", "segment '.'"),
    ("invalid", f"{TD}//api", "empty segment"),
    ("invalid", f"{TD}/ns//api", "empty segment"),
    ("invalid", f"{TD}/api/", "trailing '/'"),
    ("invalid", f"{TD}/", "trailing '/'"),
    ("invalid", f"{TD}/ns/prod/sa/api//", "empty segment / trailing '/'"),
    ("invalid", f"{TD}/ns/prod sa", "character ' '"),
    ("invalid", f"{TD}/ns/p*d", "character '*'"),
    ("invalid", f"{TD}/ns/prod:8080", "character ':'"),
    ("invalid", f"{TD}/ns/prod@eu", "character '@'"),
    ("invalid", f"{TD}/ns\\prod", "character '\\'"),
    ("invalid", f"{TD}/{'a' * 2030}", "longer than 2048 bytes"),
    ("valid", f"{TD}/{'a' * 2027}", ""),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"{verdict}\t{spiffe_id}\t{part}".rstrip("\t") for verdict, spiffe_id, part in CASES]
    (args.out / "spiffe-ids.txt").write_text("\n".join(lines) + "\n")

    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"{TD}/workload/../admin")])
    key = ec.generate_private_key(ec.SECP256R1())
    csr = builder.add_extension(san, critical=False).sign(key, hashes.SHA256())
    (args.out / "csr-uri-dot-dot-segment.pem").write_bytes(
        csr.public_bytes(serialization.Encoding.PEM)
    )


if __name__ == "__main__":
    main()
