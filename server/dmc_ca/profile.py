"""The certificate profiles: X.509-SVID leaves and the authorities that sign them (SPEC §2).

Everything a certificate says comes from here. A leaf's names, flags and lifetime are set
by the CA; the CSR contributes its public key and nothing else (SPEC §4).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dmc.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from dmc.scope import DelegationScope, scope_extension
from dmc.spiffe_id import SpiffeId
from dmc_ca.keys import (
    AllowedPrivateKey,
    KeyType,
    check_public_key,
    generate_private_key,
    signature_hash,
)

__all__ = [
    "BACKDATE",
    "SigningAuthority",
    "check_imported_authority",
    "create_authority",
    "issue_svid",
]

_log = logging.getLogger(__name__)

# SPEC §2: notBefore is back-dated by exactly 30 s for clock skew, so that the issuance
# time is notBefore + 30 s.
BACKDATE = timedelta(seconds=30)

# RFC 5280 Appendix A: ub-common-name is 64 characters.
_COMMON_NAME_MAX = 64
# RFC 1034 §3.1 and RFC 5280 §4.2.1.6: a DNS SAN is a preferred-name-syntax host name of
# lower-case letters, digits and hyphens; a wildcard may stand only as the whole first label.
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_DNS_NAME_MAX = 253

_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
_DER = serialization.Encoding.DER


@dataclass(frozen=True, slots=True)
class SigningAuthority:
    """A key and certificate that sign SVIDs.

    ``chain`` runs from ``certificate`` itself up to and including the self-signed root;
    for an authority dmc created it is just ``(certificate,)``.
    """

    private_key: AllowedPrivateKey
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if not self.chain or self.chain[0] != self.certificate:
            raise InvalidArgument("an authority's chain must start with its own certificate")

    @property
    def root(self) -> x509.Certificate:
        """The self-signed root at the end of the chain: what the trust bundle holds."""
        return self.chain[-1]

    def svid_chain(self, leaf: x509.Certificate) -> tuple[x509.Certificate, ...]:
        """``leaf`` followed by every certificate up to, but not including, the root.

        SPEC §2: the bundle holds roots only, so an imported intermediate travels in every
        SVID chain.
        """
        return (leaf, *self.chain[:-1])


def issue_svid(
    authority: SigningAuthority,
    public_key: PublicKeyTypes,
    spiffe_id: SpiffeId,
    scope: DelegationScope,
    ttl_seconds: int,
    now: datetime,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[IPv4Address | IPv6Address] = (),
) -> x509.Certificate:
    """Sign an X.509-SVID leaf for ``public_key`` under the profile of SPEC §2.

    ``notAfter`` is ``now + ttl_seconds``, cut at the scope's ``not_after`` and at the
    end of the authority's chain. DNS and IP SANs come from the registration entry (or the
    CA's own settings), never from a CSR.
    """
    if ttl_seconds <= 0:
        raise InvalidArgument(f"an SVID's TTL must be positive, not {ttl_seconds} s")
    allowed_key = check_public_key(public_key, InvalidArgument)
    for name in dns_names:
        _check_dns_name(name)
    now = _whole_seconds_utc(now)
    not_after = _leaf_not_after(authority, scope, now + timedelta(seconds=ttl_seconds), now)

    # X.509-SVID §2: the SPIFFE ID is the one URI SAN; DNS and IP SANs may stand beside it.
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    names += [x509.DNSName(name) for name in dns_names]
    names += [x509.IPAddress(address) for address in ip_addresses]
    subject = x509.Name([])
    rsa_key = isinstance(allowed_key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(authority.certificate.subject)
        .public_key(allowed_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        # RFC 5280 §4.1.2.6: with an empty subject the SAN extension must be critical.
        .add_extension(x509.SubjectAlternativeName(names), critical=len(subject) == 0)
        # X.509-SVID §4.1: a leaf asserts CA:FALSE.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # X.509-SVID §4.3: digitalSignature, never keyCertSign or cRLSign; RSA keys may
        # also encipher keys (RSA key transport in TLS 1.2).
        .add_extension(_key_usage(digital_signature=True, key_encipherment=rsa_key), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(allowed_key), critical=False)
        .add_extension(_authority_key_identifier(authority.certificate), critical=False)
        # SPEC §3: non-critical, so that generic TLS stacks still accept the certificate.
        .add_extension(scope_extension(scope), critical=False)
    )
    leaf = builder.sign(authority.private_key, signature_hash(authority.private_key))

    _log.debug(
        "signed SVID for %s, serial %x, expires %s", spiffe_id, leaf.serial_number, not_after
    )
    return leaf


def create_authority(
    trust_domain: str,
    key_type: KeyType,
    ttl: timedelta,
    now: datetime,
) -> tuple[x509.Certificate, AllowedPrivateKey]:
    """Create a self-signed authority for ``trust_domain`` and return it with its key.

    SPEC §2: a non-empty subject (``O=dmc, CN=<trust domain>``), CA:TRUE, keyCertSign,
    cRLSign, and the trust domain's SPIFFE ID as URI SAN.
    """
    trust_domain_id = SpiffeId.for_trust_domain(trust_domain)
    if ttl <= timedelta(0):
        raise InvalidArgument(f"an authority's TTL must be positive, not {ttl}")
    now = _whole_seconds_utc(now)

    # RFC 5280 §4.1.2.4: an issuer's subject is never empty. A trust domain longer than
    # ub-common-name leaves the CN out; O=dmc keeps the subject non-empty.
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dmc")]
    if len(trust_domain) <= _COMMON_NAME_MAX:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, trust_domain))
    subject = x509.Name(attributes)
    key = generate_private_key(key_type)
    public_key = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain_id))]),
            critical=False,
        )
        .add_extension(ski, critical=False)
        # RFC 5280 §4.2.1.1 lets a self-signed certificate omit this; carrying it lets path
        # builders pick the right key among authorities of the same trust domain and name.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    certificate = builder.sign(key, signature_hash(key))

    _log.info(
        "created authority for %s, serial %x, expires %s",
        trust_domain,
        certificate.serial_number,
        certificate.not_valid_after_utc,
    )
    return certificate, key


def check_imported_authority(
    chain: Sequence[x509.Certificate],
    key: PrivateKeyTypes,
    now: datetime,
) -> SigningAuthority:
    """Check an operator's CA certificate, its chain and key; return them as an authority.

    ``chain`` starts with the signing certificate and must end in a self-signed root
    (SPEC §6, ``--ca-cert``). Raise `InvalidArgument` with one clear message if the key
    does not match, a certificate is expired or not yet valid, a certificate is not a CA
    with keyCertSign, or a link of the chain does not verify.
    """
    if not chain:
        raise InvalidArgument("the imported CA certificate file holds no certificate")
    signing = chain[0]
    check_public_key(key.public_key(), InvalidArgument)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise InvalidArgument(f"the imported CA key is not an ECDSA or RSA key: {key!r}")
    if _spki(key.public_key()) != _spki(signing.public_key()):
        raise InvalidArgument(
            f"the imported CA key does not match the CA certificate {_subject(signing)}"
        )

    now = _whole_seconds_utc(now)
    for position, certificate in enumerate(chain):
        _check_ca_certificate(certificate, position, now)
    for child, parent in itertools.pairwise(chain):
        _check_link(child, parent)
    root = chain[-1]
    if root.issuer != root.subject:
        raise InvalidArgument(
            f"the imported chain ends in {_subject(root)}, issued by"
            f" '{root.issuer.rfc4514_string()}'; it must end in a self-signed root:"
            " append the root to the certificate file"
        )
    _check_link(root, root)

    return SigningAuthority(private_key=key, certificate=signing, chain=tuple(chain))


def _check_ca_certificate(certificate: x509.Certificate, position: int, now: datetime) -> None:
    """RFC 5280 §4.2.1.3 and §4.2.1.9: every certificate of a signing chain is a CA."""
    name = _subject(certificate)
    check_public_key(certificate.public_key(), InvalidArgument)
    if certificate.not_valid_after_utc <= now:
        raise InvalidArgument(
            f"the imported CA certificate {name} expired at {certificate.not_valid_after_utc}"
        )
    if certificate.not_valid_before_utc > now:
        raise InvalidArgument(
            f"the imported CA certificate {name} is not valid before"
            f" {certificate.not_valid_before_utc}"
        )

    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise InvalidArgument(f"the imported certificate {name} is not a CA (no CA:TRUE)")
    # RFC 5280 §4.2.1.9: pathLenConstraint bounds the CA certificates below this one.
    if constraints.path_length is not None and constraints.path_length < position:
        raise InvalidArgument(
            f"the imported CA certificate {name} allows {constraints.path_length} CA"
            f" certificates below it, but the chain has {position}"
        )
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or not usage.key_cert_sign:
        raise InvalidArgument(
            f"the imported CA certificate {name} may not sign certificates (no keyCertSign)"
        )


def _check_link(child: x509.Certificate, parent: x509.Certificate) -> None:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature) as exc:
        detail = str(exc) or "the signature does not verify"
        raise InvalidArgument(
            f"the imported chain is broken: {_subject(child)} is not issued by"
            f" {_subject(parent)}: {detail}"
        ) from None


def _leaf_not_after(
    authority: SigningAuthority, scope: DelegationScope, wanted: datetime, now: datetime
) -> datetime:
    """``wanted``, cut at the end of the delegation and of the authority's chain."""
    chain_end = min(certificate.not_valid_after_utc for certificate in authority.chain)
    if chain_end <= now:
        raise FailedPrecondition(f"the signing authority expired at {chain_end}")
    not_after = min(wanted, chain_end)

    # SPEC §3: a certificate's notAfter never passes its delegation's notAfter.
    if scope.not_after is not None:
        if scope.not_after <= now:
            raise PermissionDenied(f"the delegation ended at {scope.not_after}")
        not_after = min(not_after, scope.not_after)
    return not_after


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    # RFC 5280 §4.2.1.1: the AKI carries the issuer's subject key identifier where it
    # has one, so that chain builders find the right key among same-named authorities.
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        issuer_key = check_public_key(issuer.public_key(), InvalidArgument)
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _check_dns_name(name: str) -> None:
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
    if (
        len(name) > _DNS_NAME_MAX
        or len(labels) == 0
        or not all(_DNS_LABEL.fullmatch(label) for label in labels)
    ):
        raise InvalidArgument(
            f"DNS name {name!r} is not a lower-case host name (letters, digits, '-' and '.',"
            " at most a leading '*.' wildcard)"
        )


def _whole_seconds_utc(moment: datetime) -> datetime:
    # X.509 validity has whole seconds; cutting them here keeps notBefore + 30 s exact.
    if moment.tzinfo is None:
        raise ValueError("certificate times must be timezone-aware")
    return moment.astimezone(UTC).replace(microsecond=0)


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(_DER, _SPKI)


def _subject(certificate: x509.Certificate) -> str:
    text = certificate.subject.rfc4514_string()
    return f"'{text}'" if text else "with an empty subject"
