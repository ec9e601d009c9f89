"""Signing authorities: creation, import, sealing and the trust bundle built from them.

An authority is a signing certificate and key, stored in etcd with the key sealed under
the key-encryption key (SPEC §5). The bundle publishes roots only: a created authority is
its own root; an imported intermediate publishes the root its chain ends in, and the
intermediates travel in every SVID chain (SPEC §2).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from dmc.errors import FailedPrecondition, InvalidArgument
from dmc.pem import certificates_to_pem, load_certificates, load_private_key

from dmc_ca.keys import KeyType
from dmc_ca.model import AuthorityRecord, AuthorityState
from dmc_ca.profile import SigningAuthority, check_imported_authority, create_authority
from dmc_ca.sealing import seal, unseal

__all__ = [
    "DEFAULT_AUTHORITY_TTL",
    "BundleAuthority",
    "TrustBundle",
    "bundle_of",
    "new_authority",
    "unseal_authority",
]

_log = logging.getLogger(__name__)

DEFAULT_AUTHORITY_TTL = timedelta(days=365)

# States whose root the bundle publishes. A PREPARED authority is trusted before it signs
# anything, and a PREVIOUS one until everything it signed has expired.
_PUBLISHED = (AuthorityState.PREPARED, AuthorityState.ACTIVE, AuthorityState.PREVIOUS)


@dataclass(frozen=True, slots=True)
class BundleAuthority:
    """One authority as the trust bundle shows it."""

    id: str
    state: AuthorityState
    root: x509.Certificate
    signing_certificate: x509.Certificate


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The roots a verifier of this trust domain trusts, with the sequence of SPEC §4."""

    trust_domain: str
    sequence: int
    authorities: tuple[BundleAuthority, ...]

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        """The distinct roots, in authority order."""
        seen: dict[bytes, x509.Certificate] = {}
        for authority in self.authorities:
            der = authority.root.public_bytes(serialization.Encoding.DER)
            seen.setdefault(der, authority.root)
        return tuple(seen.values())

    def to_pem(self) -> bytes:
        """The bundle as concatenated PEM roots (`bundle.pem`)."""
        return certificates_to_pem(list(self.roots))

    def signing_certificates(self) -> tuple[x509.Certificate, ...]:
        """Certificates that may have signed a current SVID of this trust domain."""
        return tuple(a.signing_certificate for a in self.authorities)


def _sealing_aad(trust_domain: str, authority_id: str) -> bytes:
    # Binds a sealed key to the etcd key it belongs to: a sealed key copied to another
    # authority's record does not unseal.
    return f"{trust_domain}/authorities/{authority_id}".encode()


def new_authority(
    trust_domain: str,
    kek: bytes,
    now: datetime,
    *,
    state: AuthorityState,
    key_type: KeyType = KeyType.EC_P256,
    ttl: timedelta = DEFAULT_AUTHORITY_TTL,
    imported_chain_pem: bytes | None = None,
    imported_key_pem: bytes | None = None,
) -> tuple[AuthorityRecord, SigningAuthority]:
    """Create a new authority, or import an existing CA, as a record ready for etcd.

    With ``imported_chain_pem`` the chain (signing certificate first, ending in a root) and
    its key are checked by :func:`check_imported_authority` before anything is built.
    """
    if imported_chain_pem is not None:
        if imported_key_pem is None:
            raise InvalidArgument("an imported CA certificate needs its private key")
        signing = check_imported_authority(
            load_certificates(imported_chain_pem, "--ca-cert"),
            load_private_key(imported_key_pem, "--ca-key"),
            now,
        )
    else:
        certificate, created_key = create_authority(trust_domain, key_type, ttl, now)
        signing = SigningAuthority(
            private_key=created_key, certificate=certificate, chain=(certificate,)
        )

    authority_id = secrets.token_hex(8)
    key_der = signing.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    record = AuthorityRecord(
        id=authority_id,
        state=state,
        certificate_chain_pem=certificates_to_pem(list(signing.chain)),
        sealed_key=seal(kek, key_der, _sealing_aad(trust_domain, authority_id)),
        created_at=now,
    )
    return record, signing


def unseal_authority(trust_domain: str, record: AuthorityRecord, kek: bytes) -> SigningAuthority:
    """Open a stored authority's key with the key-encryption key."""
    key_der = unseal(kek, record.sealed_key, _sealing_aad(trust_domain, record.id))
    key = serialization.load_der_private_key(key_der, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise FailedPrecondition(f"authority {record.id} holds a key dmc cannot sign with")
    chain = load_certificates(record.certificate_chain_pem, f"authority {record.id}")
    return SigningAuthority(private_key=key, certificate=chain[0], chain=tuple(chain))


def bundle_of(trust_domain: str, sequence: int, records: list[AuthorityRecord]) -> TrustBundle:
    """Build the trust bundle from the stored authority records."""
    authorities = []
    for record in sorted(records, key=lambda r: (r.created_at, r.id)):
        if record.state not in _PUBLISHED:
            continue
        chain = load_certificates(record.certificate_chain_pem, f"authority {record.id}")
        authorities.append(
            BundleAuthority(
                id=record.id, state=record.state, root=chain[-1], signing_certificate=chain[0]
            )
        )
    return TrustBundle(
        trust_domain=trust_domain, sequence=sequence, authorities=tuple(authorities)
    )
