"""X.509-SVIDs: reading a leaf as a SPIFFE identity, and verifying its chain.

https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md

:func:`parse_svid` applies the leaf rules a validator must check (X.509-SVID §5.2);
:func:`verify_chain` adds RFC 5280 path validation to a root of the trust bundle first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from cryptography import x509
from cryptography.x509.oid import ExtensionOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from dmc.errors import InvalidScope, InvalidSpiffeId, InvalidSvid, Unauthenticated
from dmc.scope import EMPTY_SCOPE, SCOPE_OID, DelegationScope, decode_scope
from dmc.spiffe_id import SpiffeId

__all__ = ["NOT_BEFORE_BACKDATE", "Svid", "parse_svid", "verify_chain"]

_E = TypeVar("_E", bound=x509.ExtensionType)

NOT_BEFORE_BACKDATE = timedelta(seconds=30)
"""SPEC §2: ``notBefore`` is back-dated by exactly this much for clock skew."""

# Extensions a leaf may mark critical. RFC 5280 §4.2: a critical extension that is not
# understood makes the certificate unusable.
_UNDERSTOOD_CRITICAL = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        SCOPE_OID,
    }
)


@dataclass(frozen=True, slots=True)
class Svid:
    """A leaf certificate read as an X.509-SVID, with its delegation scope."""

    spiffe_id: SpiffeId
    scope: DelegationScope
    serial: int
    not_before: datetime
    not_after: datetime
    dns_names: tuple[str, ...]
    certificate: x509.Certificate

    @property
    def issued_at(self) -> datetime:
        """When the CA issued it: ``notBefore`` plus the 30 s back-dating of SPEC §2."""
        return self.not_before + NOT_BEFORE_BACKDATE


def parse_svid(certificate: x509.Certificate) -> Svid:
    """Read ``certificate`` as an X.509-SVID leaf, or raise :class:`InvalidSvid`.

    This checks the leaf alone, not who signed it; see :func:`verify_chain`.
    """
    spiffe_id = _spiffe_id_of(certificate)

    # X.509-SVID §4.1 and §5.2: a leaf is not a CA.
    constraints = _extension(certificate, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise InvalidSvid(
            f"certificate for '{spiffe_id}' is a CA (basicConstraints CA:TRUE); "
            "an X.509-SVID leaf must not be"
        )
    # X.509-SVID §4.3 and §5.2: a leaf never sets keyCertSign or cRLSign.
    usage = _extension(certificate, x509.KeyUsage)
    if usage is not None:
        for allowed, name in ((usage.key_cert_sign, "keyCertSign"), (usage.crl_sign, "cRLSign")):
            if allowed:
                raise InvalidSvid(
                    f"certificate for '{spiffe_id}' has keyUsage {name}; "
                    "an X.509-SVID leaf must not"
                )
    for extension in certificate.extensions:
        if extension.critical and extension.oid not in _UNDERSTOOD_CRITICAL:
            raise InvalidSvid(
                f"certificate for '{spiffe_id}' has a critical extension dmc does not "
                f"understand ({extension.oid.dotted_string}; RFC 5280 §4.2)"
            )

    san = _extension(certificate, x509.SubjectAlternativeName)
    dns_names = tuple(san.get_values_for_type(x509.DNSName)) if san is not None else ()
    return Svid(
        spiffe_id=spiffe_id,
        scope=_scope_of(certificate, spiffe_id),
        serial=certificate.serial_number,
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        dns_names=dns_names,
        certificate=certificate,
    )


def verify_chain(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], now: datetime
) -> Svid:
    """Verify ``chain`` (leaf first, then intermediates) up to one of ``roots`` at ``now``.

    Path validation follows RFC 5280 (signatures, validity, CA flags, path lengths) as
    X.509-SVID §5.1 requires, then the leaf is read with :func:`parse_svid`. A chain that
    does not verify raises :class:`Unauthenticated`; a leaf that verifies but is no
    X.509-SVID raises :class:`InvalidSvid`.
    """
    if not chain:
        raise Unauthenticated("no certificate was presented")
    if not roots:
        raise Unauthenticated("the trust bundle holds no authority")
    leaf = chain[0]

    # Named first because they are the common cases and the clearest messages.
    if now < leaf.not_valid_before_utc:
        raise Unauthenticated(
            f"certificate is not valid before {leaf.not_valid_before_utc.isoformat()}"
        )
    if now > leaf.not_valid_after_utc:
        raise Unauthenticated(f"certificate expired at {leaf.not_valid_after_utc.isoformat()}")

    verifier = (
        PolicyBuilder()
        .store(Store(list(roots)))
        .time(now)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_LEAF_POLICY)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, list(chain[1:]))
    except VerificationError as exc:
        raise Unauthenticated(
            f"certificate chain does not verify against the trust bundle: {_reason(exc)}"
        ) from exc
    return parse_svid(leaf)


def _spiffe_id_of(certificate: x509.Certificate) -> SpiffeId:
    san = _extension(certificate, x509.SubjectAlternativeName)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier) if san is not None else []
    # X.509-SVID §2: exactly one URI SAN; never pick one out of several.
    if len(uris) != 1:
        raise InvalidSvid(
            f"certificate has {len(uris)} URI SANs; an X.509-SVID has exactly one (its SPIFFE ID)"
        )
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise InvalidSvid(f"certificate's URI SAN is not a valid SPIFFE ID: {exc}") from exc
    # X.509-SVID §3.1 and §5.2: a leaf's SPIFFE ID has a non-root path.
    if spiffe_id.is_trust_domain_id:
        raise InvalidSvid(
            f"certificate's SPIFFE ID '{spiffe_id}' has no path; "
            "an X.509-SVID leaf names a workload, not the trust domain"
        )
    return spiffe_id


def _scope_of(certificate: x509.Certificate, spiffe_id: SpiffeId) -> DelegationScope:
    try:
        extension = certificate.extensions.get_extension_for_oid(SCOPE_OID)
    except x509.ExtensionNotFound:
        # SPEC §3: an SVID issued elsewhere authenticates with an empty scope.
        return EMPTY_SCOPE
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise InvalidSvid(f"certificate for '{spiffe_id}' has an unreadable scope extension")
    try:
        return decode_scope(value.value)
    except InvalidScope as exc:
        raise InvalidSvid(f"certificate for '{spiffe_id}' has a malformed scope: {exc}") from exc


def _extension(certificate: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:
        # cryptography parses extensions lazily and raises on malformed ones.
        raise InvalidSvid(f"certificate has a malformed extension: {exc}") from exc


def _require_key_cert_sign(
    _policy: Policy, certificate: x509.Certificate, usage: x509.KeyUsage | None
) -> None:
    # RFC 5280 §4.2.1.3 and X.509-SVID §4.3: a signing certificate asserts keyCertSign.
    if usage is not None and not usage.key_cert_sign:
        raise ValueError(
            f"signing certificate {certificate.subject.rfc4514_string()!r} "
            "lacks keyUsage keyCertSign"
        )


# Roots and intermediates: basicConstraints must be present (cryptography then requires
# CA:TRUE and honours pathLen); keyCertSign when keyUsage is present. Everything else is
# permitted, so authorities imported from other CAs keep working.
_CA_POLICY = (
    ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)
    .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _require_key_cert_sign)
)
# Leaves: the X.509-SVID rules are applied by parse_svid with messages of its own, not by
# the Web PKI defaults (which, for one, demand an authority key identifier).
_LEAF_POLICY = ExtensionPolicy.permit_all()


def _reason(exc: VerificationError) -> str:
    # cryptography wraps its finding in prefixes and appends "(encountered processing
    # <Certificate(...)>)"; the finding alone is what a user can act on.
    text = str(exc).split(" (encountered processing", 1)[0]
    for prefix in (
        "validation failed: ",
        "candidates exhausted: ",
        "Python extension validator failed: ValueError: ",
    ):
        text = text.removeprefix(prefix)
    return text
