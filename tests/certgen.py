"""Test certificates made at run time: roots, intermediates and leaves, valid or broken.

Every function takes keyword arguments for the one property a test wants to change and
builds a sensible X.509-SVID-shaped certificate otherwise, so a test reads as the defect
it is about::

    root = make_root("example.org")
    leaf = make_leaf(root, uris=["spiffe://example.org/a", "spiffe://example.org/b"])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from typing import TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dmc.scope import DelegationScope, scope_extension

__all__ = [
    "BACKDATE",
    "CertAndKey",
    "IssuerKey",
    "key_usage",
    "make_intermediate",
    "make_leaf",
    "make_root",
    "new_key",
]

IssuerKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

BACKDATE = timedelta(seconds=30)
_KEY_USAGES = (
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


@dataclass(frozen=True, slots=True)
class CertAndKey:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: IssuerKey


def new_key(key_type: str = "ec-p256") -> IssuerKey:
    """A fresh private key: ``ec-p256``, ``ec-p384`` or ``rsa-<bits>``."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise ValueError(f"unknown key type {key_type!r}")


def key_usage(*names: str) -> x509.KeyUsage:
    """A KeyUsage with exactly the named bits set, e.g. ``key_usage("digital_signature")``."""
    unknown = set(names) - set(_KEY_USAGES)
    if unknown:
        raise ValueError(f"unknown key usage bits: {sorted(unknown)}")
    return x509.KeyUsage(**{name: name in names for name in _KEY_USAGES})


def make_root(
    trust_domain: str = "example.org",
    *,
    key: IssuerKey | None = None,
    common_name: str | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    now: datetime | None = None,
) -> CertAndKey:
    """A self-signed authority as dmc creates them (SPEC §2), valid 1 day around ``now``."""
    key = key or new_key()
    now = now or datetime.now(UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dmc"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name or trust_domain),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(hours=1))
        .not_valid_after(not_after or now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(key_usage("key_cert_sign", "crl_sign"), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return CertAndKey(builder.sign(key, hashes.SHA256()), key)


def make_intermediate(
    issuer: CertAndKey,
    trust_domain: str = "example.org",
    *,
    key: IssuerKey | None = None,
    common_name: str = "intermediate",
    ca: bool | None = True,
    usages: Sequence[str] | None = ("key_cert_sign", "crl_sign"),
    path_length: int | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    now: datetime | None = None,
) -> CertAndKey:
    """A signing certificate under ``issuer``; ``ca=None``/``usages=None`` omit the extension."""
    key = key or new_key()
    now = now or datetime.now(UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dmc"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(hours=1))
        .not_valid_after(not_after or now + timedelta(hours=12))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
    if usages is not None:
        builder = builder.add_extension(key_usage(*usages), critical=True)
    return CertAndKey(builder.sign(issuer.key, hashes.SHA256()), key)


def make_leaf(
    issuer: CertAndKey,
    *,
    uris: Sequence[str] = ("spiffe://example.org/workload",),
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    scope: DelegationScope | None = None,
    key: IssuerKey | None = None,
    ca: bool | None = False,
    usages: Sequence[str] | None = ("digital_signature",),
    extended_usages: Sequence[x509.ObjectIdentifier] | None = (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ),
    subject: x509.Name | None = None,
    san_critical: bool | None = None,
    serial_number: int | None = None,
    issued_at: datetime | None = None,
    ttl: timedelta = timedelta(hours=1),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    extra_extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> CertAndKey:
    """An X.509-SVID leaf signed by ``issuer``, shaped like dmc's profile (SPEC §2).

    ``notBefore`` is ``issued_at - 30 s`` and ``notAfter`` is ``issued_at + ttl`` unless
    given. The subject is empty unless given, and the SAN is then critical unless
    ``san_critical`` says otherwise. ``ca``, ``usages`` or ``extended_usages`` set to
    ``None`` leave that extension out; with no ``uris``, ``dns_names`` or ``ip_addresses``
    there is no SAN extension. ``scope`` adds the delegation scope extension, non-critical.
    """
    key = key or new_key()
    issued_at = issued_at or datetime.now(UTC).replace(microsecond=0)
    subject = subject if subject is not None else x509.Name([])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(serial_number or x509.random_serial_number())
        .not_valid_before(not_before or issued_at - BACKDATE)
        .not_valid_after(not_after or issued_at + ttl)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    if usages is not None:
        builder = builder.add_extension(key_usage(*usages), critical=True)
    if extended_usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(extended_usages)), False)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns_names]
    names += [x509.IPAddress(ip_address(a)) for a in ip_addresses]
    if names:
        critical = san_critical if san_critical is not None else len(subject) == 0
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=critical)
    if scope is not None:
        builder = builder.add_extension(scope_extension(scope), critical=False)
    for extension, critical in extra_extensions:
        builder = builder.add_extension(extension, critical=critical)
    return CertAndKey(builder.sign(issuer.key, hashes.SHA256()), key)
