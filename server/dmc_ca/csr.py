"""The CSR policy of SPEC §4: what a certificate signing request must be before dmc signs.

A CSR only proves possession of a key; the CA takes the public key from it and nothing
else. Every name, extension and flag of the issued leaf comes from the profile
(`dmc_ca.profile`), never from the CSR.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from dmc.errors import InvalidCsr, InvalidSpiffeId, PermissionDenied, shown
from dmc.spiffe_id import SpiffeId
from dmc_ca.keys import AllowedPublicKey, check_public_key

__all__ = ["MAX_CSR_BYTES", "check_csr"]

# Values from a CSR are echoed in messages; a hostile one must not make them huge.
_SHOWN_MAX = 200
MAX_CSR_BYTES = 16 * 1024


def check_csr(der: bytes, spiffe_id: SpiffeId) -> AllowedPublicKey:
    """Return the CSR's public key if the CSR may be signed for ``spiffe_id``.

    The checks run in the order of SPEC §4, each failure an `InvalidCsr` naming what was
    wrong: the bytes parse as DER, the self-signature verifies, the key type and size are
    allowed, the SAN holds nothing or exactly one URI that is a valid SPIFFE ID, and no CA
    powers are requested. A well-formed SPIFFE ID other than ``spiffe_id`` then raises
    `PermissionDenied` naming both.
    """
    csr = _parse(der)
    _check_signature(csr)
    public_key = _check_key(csr)
    requested = _requested_spiffe_id(csr, spiffe_id)
    _check_no_ca_powers(csr)

    if requested is not None and requested != spiffe_id:
        raise PermissionDenied(
            f"the CSR names {_shown(str(requested))}, but the certificate is for {spiffe_id}"
        )
    return public_key


def _parse(der: bytes) -> x509.CertificateSigningRequest:
    if not der:
        raise InvalidCsr("the CSR is empty; expected a DER-encoded PKCS #10 request")
    if len(der) > MAX_CSR_BYTES:
        # A P-384 or RSA-4096 CSR with a SPIFFE ID is well under 2 KiB; parsing megabytes
        # of extensions the CA then ignores would only cost CPU on the Bootstrap path.
        raise InvalidCsr(f"the CSR is {len(der)} bytes; at most {MAX_CSR_BYTES} are accepted")
    if der.lstrip().startswith(b"-----BEGIN"):
        raise InvalidCsr("the CSR is PEM; expected DER (the bytes between the PEM armour)")
    try:
        csr = x509.load_der_x509_csr(der)
        # cryptography parses extensions lazily; read them now so that a malformed or
        # duplicated extension is reported as a parse failure, not later.
        csr.extensions  # noqa: B018
    except ValueError as exc:
        raise InvalidCsr(f"the CSR does not parse as DER: {exc}") from None
    return csr


def _check_signature(csr: x509.CertificateSigningRequest) -> None:
    # cryptography's CSR signature check returns a bool (STYLE.md); turn it into a raise.
    # A request signed under one algorithm but labelled with another fails here too.
    try:
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise InvalidCsr(f"the CSR signature does not verify: {exc}") from None
    if not valid:
        raise InvalidCsr(
            "the CSR signature does not verify: it was not made by the key the CSR carries"
            " with the algorithm it names"
        )


def _check_key(csr: x509.CertificateSigningRequest) -> AllowedPublicKey:
    try:
        key = csr.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise InvalidCsr(f"the CSR's public key cannot be read: {exc}") from None
    return check_public_key(key, InvalidCsr)


def _requested_spiffe_id(
    csr: x509.CertificateSigningRequest, spiffe_id: SpiffeId
) -> SpiffeId | None:
    """The SPIFFE ID the CSR asks for, or None if its SAN is absent or empty."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None

    names = list(san)
    uris = [name for name in names if isinstance(name, x509.UniformResourceIdentifier)]
    if not uris:
        extras = names
        kept = None
    else:
        # X.509-SVID §2: one URI SAN, the SPIFFE ID. Keep the ID being issued (else the
        # first spiffe:// URI) and name everything else, wherever it sits.
        kept = next(
            (uri for uri in uris if uri.value == str(spiffe_id)),
            next((uri for uri in uris if uri.value.startswith("spiffe://")), uris[0]),
        )
        extras = [name for name in names if name is not kept]
    if extras:
        listed = ", ".join(_describe(name) for name in extras)
        holds = "holds" if kept is None else f"holds, besides {_shown(kept.value)},"
        raise InvalidCsr(
            f"the CSR's subjectAltName may hold one URI, the SPIFFE ID, and nothing else;"
            f" it {holds} {listed}"
        )
    if kept is None:
        return None

    try:
        return SpiffeId.parse(kept.value)
    except InvalidSpiffeId as exc:
        raise InvalidCsr(
            f"the CSR's URI SAN {_shown(kept.value)} is not a valid SPIFFE ID: {exc}"
        ) from None


def _check_no_ca_powers(csr: x509.CertificateSigningRequest) -> None:
    # X.509-SVID §4.1 and §4.3: a leaf is no CA and may not sign certificates or CRLs.
    # Asking for those powers is refused outright rather than silently dropped.
    requested: list[str] = []
    try:
        constraints = csr.extensions.get_extension_for_class(x509.BasicConstraints).value
        if constraints.ca:
            requested.append("CA:TRUE")
    except x509.ExtensionNotFound:
        pass
    try:
        usage = csr.extensions.get_extension_for_class(x509.KeyUsage).value
        if usage.key_cert_sign:
            requested.append("keyCertSign")
        if usage.crl_sign:
            requested.append("cRLSign")
    except x509.ExtensionNotFound:
        pass

    if requested:
        raise InvalidCsr(
            f"the CSR requests CA powers ({', '.join(requested)}); an X.509-SVID leaf may not"
            " be a CA or sign certificates or CRLs"
        )


def _describe(name: x509.GeneralName) -> str:
    """Name a general name by its type and value, e.g. ``DNS name api.example.org``."""
    match name:
        case x509.UniformResourceIdentifier():
            return f"URI {_shown(name.value)}"
        case x509.DNSName():
            return f"DNS name {_shown(name.value)}"
        case x509.IPAddress():
            return f"IP address {name.value}"
        case x509.RFC822Name():
            return f"e-mail address {_shown(name.value)}"
        case x509.OtherName():
            return f"other name of type {name.type_id.dotted_string}"
        case x509.DirectoryName():
            return f"directory name {_shown(name.value.rfc4514_string())}"
        case x509.RegisteredID():
            return f"registered ID {name.value.dotted_string}"
    return f"{type(name).__name__}"


def _shown(text: str) -> str:
    """``text`` fit for a message, unquoted (see `dmc.errors.shown`)."""
    return shown(text, limit=_SHOWN_MAX, quote=False)
