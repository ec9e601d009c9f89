"""Signing authorities: creation, import, sealing and the trust bundle built from them.

An authority is a signing certificate and key, stored in etcd with the key sealed under
the key-encryption key (SPEC §5). The bundle publishes roots only: a created authority is
its own root; an imported intermediate publishes the root its chain ends in, and the
intermediates travel in every SVID chain (SPEC §2).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from dmc.errors import FailedPrecondition, InvalidArgument, NotFound
from dmc.pem import certificates_to_pem, load_certificates, load_private_key
from dmc_ca.keys import KeyType
from dmc_ca.model import AuthorityRecord, AuthorityState
from dmc_ca.profile import SigningAuthority, check_imported_authority, create_authority
from dmc_ca.sealing import seal, unseal

__all__ = [
    "DEFAULT_AUTHORITY_TTL",
    "VIEW_LAG_ALLOWANCE",
    "BundleAuthority",
    "TrustBundle",
    "bundle_of",
    "new_authority",
    "plan_activation",
    "plan_retirement",
    "retirable_at",
    "unseal_authority",
]

_log = logging.getLogger(__name__)

DEFAULT_AUTHORITY_TTL = timedelta(days=365)

# States whose root the bundle publishes. A PREPARED authority is trusted before it signs
# anything, and a PREVIOUS one until everything it signed has expired.
_PUBLISHED = (AuthorityState.PREPARED, AuthorityState.ACTIVE, AuthorityState.PREVIOUS)

# How long a replica may go on signing with an authority after another replica made it
# PREVIOUS: the time its etcd watch takes to bring the change (milliseconds when healthy).
VIEW_LAG_ALLOWANCE = timedelta(seconds=5)


@dataclass(frozen=True, slots=True)
class BundleAuthority:
    """One authority as the trust bundle shows it."""

    id: str
    state: AuthorityState
    root: x509.Certificate
    signing_certificate: x509.Certificate
    created_at: datetime
    state_since: datetime
    # PREVIOUS only: when RetireAuthority accepts it without force (see retirable_at).
    retirable_at: datetime | None = None


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


def bundle_of(
    trust_domain: str,
    sequence: int,
    records: list[AuthorityRecord],
    longest_svid_ttl: timedelta | None = None,
) -> TrustBundle:
    """Build the trust bundle from the stored authority records.

    With ``longest_svid_ttl`` each PREVIOUS authority carries its :func:`retirable_at`.
    """
    authorities = []
    for record in sorted(records, key=lambda r: (r.created_at, r.id)):
        if record.state not in _PUBLISHED:
            continue
        chain = load_certificates(record.certificate_chain_pem, f"authority {record.id}")
        retire = None
        if longest_svid_ttl is not None and record.state is AuthorityState.PREVIOUS:
            retire = retirable_at(record, longest_svid_ttl)
        authorities.append(
            BundleAuthority(
                id=record.id,
                state=record.state,
                root=chain[-1],
                signing_certificate=chain[0],
                created_at=record.created_at,
                state_since=record.state_since or record.created_at,
                retirable_at=retire,
            )
        )
    return TrustBundle(
        trust_domain=trust_domain, sequence=sequence, authorities=tuple(authorities)
    )


# -- the life cycle: PREPARED -> ACTIVE -> PREVIOUS -> retired (SPEC §4, §5) ----------------


def retirable_at(record: AuthorityRecord, longest_svid_ttl: timedelta) -> datetime:
    """The earliest moment no SVID signed by ``record`` can still be valid.

    The rule: an authority signs only while ACTIVE, and every SVID lives at most the
    longest SVID TTL of the registration entries (the admin entry included), cut at the
    authority's own notAfter (SPEC §2). So its last SVID expires no later than the moment
    it stopped being ACTIVE (``state_since`` of a PREVIOUS record) plus that TTL, plus
    :data:`VIEW_LAG_ALLOWANCE` for replicas that learnt of the change late. The CA's own
    serving SVIDs are left out: every replica reissues its serving SVID from the new
    authority as soon as the bundle changes, so no server presents an old one afterwards.
    A deleted entry with a longer TTL than every remaining one is not counted; its SVIDs
    can outlive this bound, which a forced retirement would cut.
    """
    chain = load_certificates(record.certificate_chain_pem, f"authority {record.id}")
    chain_end = min(certificate.not_valid_after_utc for certificate in chain)
    stopped = record.state_since or record.created_at
    return min(stopped + longest_svid_ttl, chain_end) + VIEW_LAG_ALLOWANCE


def _find(records: Mapping[str, AuthorityRecord], authority_id: str) -> AuthorityRecord:
    record = records.get(authority_id)
    if record is None:
        raise NotFound(f"no authority {authority_id!r} in the trust bundle")
    return record


def _newest(records: Mapping[str, AuthorityRecord], state: AuthorityState) -> AuthorityRecord:
    found = [r for r in records.values() if r.state is state]
    if not found:
        raise FailedPrecondition(f"there is no {state.value} authority")
    return max(found, key=lambda r: (r.created_at, r.id))


def plan_activation(
    records: Mapping[str, AuthorityRecord], authority_id: str = ""
) -> tuple[AuthorityRecord, dict[str, AuthorityState]]:
    """The state changes that make a PREPARED authority the signer.

    ``authority_id`` empty means the newest PREPARED one. Every ACTIVE authority becomes
    PREVIOUS in the same change, so exactly one signs afterwards. Only a PREPARED
    authority can be activated: it has been in the bundle, so verifiers trust what it
    will sign (``FailedPrecondition`` otherwise).
    """
    target = (
        _find(records, authority_id) if authority_id else _newest(records, AuthorityState.PREPARED)
    )
    if target.state is not AuthorityState.PREPARED:
        raise FailedPrecondition(
            f"authority {target.id} is {target.state.value}; only a PREPARED authority, "
            "which verifiers already trust, can be activated"
        )
    states = {
        r.id: AuthorityState.PREVIOUS for r in records.values() if r.state is AuthorityState.ACTIVE
    }
    states[target.id] = AuthorityState.ACTIVE
    return target, states


def plan_retirement(
    records: Mapping[str, AuthorityRecord],
    authority_id: str,
    *,
    now: datetime,
    longest_svid_ttl: timedelta,
    force: bool,
) -> AuthorityRecord:
    """The authority to remove from the bundle, once checked that it may go.

    ``authority_id`` empty means the oldest PREVIOUS authority. A PREPARED authority has
    signed nothing and may always go. A PREVIOUS one may go once :func:`retirable_at` has
    passed, or at once with ``force`` (after a compromise: everything it signed stops
    verifying). The ACTIVE authority never goes: activate another first.
    """
    if authority_id:
        target = _find(records, authority_id)
    else:
        previous = [r for r in records.values() if r.state is AuthorityState.PREVIOUS]
        if not previous:
            raise FailedPrecondition("there is no PREVIOUS authority to retire")
        target = min(previous, key=lambda r: (r.created_at, r.id))

    if target.state is AuthorityState.ACTIVE:
        raise FailedPrecondition(
            f"authority {target.id} is ACTIVE and signs every new SVID; prepare and activate "
            "another before retiring it"
        )
    if target.state is AuthorityState.PREVIOUS and not force:
        ready = retirable_at(target, longest_svid_ttl)
        if now < ready:
            left = int((ready - now).total_seconds()) + 1
            raise FailedPrecondition(
                f"authority {target.id} signed SVIDs that can be valid until "
                f"{ready.isoformat().replace('+00:00', 'Z')} ({left} s from now); retire it "
                "then, or with force after a compromise"
            )
    return target
