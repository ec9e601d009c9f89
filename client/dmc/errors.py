"""The error tree of dmc, and the one place where it meets gRPC status codes.

Every check in dmc raises one of these; nothing returns ``False`` for a caller to forget.
The tree follows SPEC §4, "Errors map to status codes in one place"::

    DmcError
    ├── InvalidArgument            INVALID_ARGUMENT   malformed input
    │   ├── InvalidSpiffeId        an ID outside the SPIFFE ID grammar (SPEC §2)
    │   ├── InvalidScope           a scope pattern or extension that cannot be read
    │   ├── InvalidCsr             a CSR refused by the policy of SPEC §4
    │   └── InvalidPem             a certificate or key file that cannot be read whole
    ├── Unauthenticated            UNAUTHENTICATED    bad or spent token, peer not an SVID
    │   └── InvalidSvid            a certificate that chains but is not an X.509-SVID
    ├── PermissionDenied           PERMISSION_DENIED  widening, depth, revoked, method
    │   └── ScopeWidening          a delegation that would widen the parent's scope
    ├── NotFound                   NOT_FOUND
    ├── AlreadyExists              ALREADY_EXISTS
    ├── FailedPrecondition         FAILED_PRECONDITION  too early, no active authority
    ├── Unavailable                UNAVAILABLE        etcd unreachable for a write
    └── Unimplemented              UNIMPLEMENTED      a part of the contract not built yet

Anything that is not a ``DmcError`` is a bug: servers report it as ``INTERNAL`` with a
fixed message and log the traceback, never sending it to the caller.
"""

from __future__ import annotations

import grpc

__all__ = [
    "AlreadyExists",
    "DmcError",
    "FailedPrecondition",
    "InvalidArgument",
    "InvalidCsr",
    "InvalidPem",
    "InvalidScope",
    "InvalidSpiffeId",
    "InvalidSvid",
    "NotFound",
    "PermissionDenied",
    "ScopeWidening",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "error_for_status",
    "shown",
    "status_code_of",
]


class DmcError(Exception):
    """Root of every error dmc raises on purpose; ``str(exc)`` is the detail for users."""


class InvalidArgument(DmcError):
    """The input is malformed; retrying it unchanged cannot succeed."""


class InvalidSpiffeId(InvalidArgument):
    """A string is not a SPIFFE ID under the grammar of SPEC §2."""


class InvalidScope(InvalidArgument):
    """A permission or audience pattern, or a scope extension, is malformed."""


class InvalidCsr(InvalidArgument):
    """A certificate signing request is refused by the CSR policy of SPEC §4."""


class InvalidPem(InvalidArgument):
    """A certificate, chain, bundle or key file cannot be read completely."""


class Unauthenticated(DmcError):
    """The caller could not be authenticated (bad token, peer that is no SVID)."""


class InvalidSvid(Unauthenticated):
    """A certificate is not a valid X.509-SVID (e.g. several URI SANs, signing powers)."""


class PermissionDenied(DmcError):
    """The caller is known but may not do this."""


class ScopeWidening(PermissionDenied):
    """A delegation asked for more than the delegator holds (SPEC §3, subset rule)."""


class NotFound(DmcError):
    """The named entry, authority or revocation does not exist."""


class AlreadyExists(DmcError):
    """The object to create exists already."""


class FailedPrecondition(DmcError):
    """The system is not in a state that allows this yet (or any more)."""


class Unavailable(DmcError):
    """A dependency (etcd, the CA) cannot be reached; the same call may succeed later."""


class Unimplemented(DmcError):
    """The request is well formed but this version of dmc does not serve it."""


# The single mapping between the tree and gRPC status codes (SPEC §4). Order matters:
# the most specific class is looked up first through the MRO.
_STATUS_OF: dict[type[DmcError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}

_ERROR_OF: dict[grpc.StatusCode, type[DmcError]] = {v: k for k, v in _STATUS_OF.items()}


def status_code_of(error: DmcError) -> grpc.StatusCode:
    """Return the gRPC status code for ``error`` (``INTERNAL`` for an unmapped subclass)."""
    for cls in type(error).__mro__:
        code = _STATUS_OF.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def error_for_status(code: grpc.StatusCode, details: str) -> DmcError:
    """Turn a status received from a dmc server back into the matching error class."""
    return _ERROR_OF.get(code, DmcError)(details)


def shown(value: str, *, limit: int = 200, quote: bool = True) -> str:
    """``value`` fit for an error message: non-printables escaped, long values cut.

    Messages name what was wrong, but a value echoed whole could be megabytes long, past
    what a gRPC status trailer may carry (16 KiB), or could carry control characters.
    """
    escaped = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in value
    )
    if len(escaped) > limit:
        escaped = f"{escaped[:limit]}... ({len(value)} characters)"
    return f"'{escaped}'" if quote else escaped
