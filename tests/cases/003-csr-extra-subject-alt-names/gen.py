#!/usr/bin/env python3
"""Rebuild this case: CSRs that carry the caller's own SPIFFE ID plus names
a SPIFFE CA cannot vouch for (a second URI, DNS, IP, e-mail), plus one CSR
with exactly one URI SAN for contrast.

usage: python3 gen.py [--out DIR] [--id SPIFFE_ID]
"""

import argparse
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


def csr(*names):
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    key = ec.generate_private_key(ec.SECP256R1())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--id", default="spiffe://example.org/workload/api")
    args = ap.parse_args()
    own = x509.UniformResourceIdentifier(args.id)
    td = args.id.split("/")[2]
    files = {
        # The caller's ID first, then a second SPIFFE ID it was never given.
        "csr-two-spiffe-ids.pem": csr(own, x509.UniformResourceIdentifier(f"spiffe://{td}/admin")),
        # A non-SPIFFE URI ahead of the SPIFFE ID (order must not matter).
        "csr-https-uri-first.pem": csr(
            x509.UniformResourceIdentifier("https://inventory.example.org/host/42"), own
        ),
        # The SPIFFE ID plus a DNS name.
        "csr-uri-plus-dns.pem": csr(own, x509.DNSName("api.internal.example.org")),
        # The SPIFFE ID plus an IP address and an e-mail address.
        "csr-uri-plus-ip-and-email.pem": csr(
            own,
            x509.IPAddress(ipaddress.ip_address("10.0.0.7")),
            x509.RFC822Name("ops@example.org"),
        ),
        # Contrast: exactly one URI SAN.
        "csr-one-uri-ok.pem": csr(own),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (args.out / name).write_bytes(data)


if __name__ == "__main__":
    main()
