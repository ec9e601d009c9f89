"""The certificate authority's logic, free of gRPC: who may get which certificate.

Renew and Delegate read only the store's in-memory view (SPEC §5), so they need no etcd
round trip; Bootstrap spends its token in an etcd transaction, and Admin writes go to etcd.
Revocations are in the view too: refusing a revoked caller costs a few dict lookups.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from dmc.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from dmc.revocation import Revocation, RevocationKind, normalize_serial
from dmc.scope import (
    MAX_DEPTH,
    DelegationScope,
    derive_delegated_scope,
    permission_covers,
    permits_method,
    validate_audience,
    validate_permission,
)
from dmc.spiffe_id import SpiffeId
from dmc.svid import Svid, parse_svid
from dmc.v1 import admin_pb2
from dmc_ca.authorities import (
    BundleAuthority,
    TrustBundle,
    bundle_of,
    new_authority,
    plan_activation,
    plan_retirement,
    unseal_authority,
)
from dmc_ca.csr import check_csr
from dmc_ca.keys import KeyType
from dmc_ca.model import AuthorityState, Entry, JoinToken
from dmc_ca.profile import SigningAuthority, issue_svid
from dmc_ca.store import Store, StoreView, hash_token

__all__ = [
    "ADMIN_PATH",
    "DEFAULT_SVID_TTL_SECONDS",
    "CertificateAuthority",
    "IssuedSvid",
    "admin_entry",
]

_log = logging.getLogger(__name__)

DEFAULT_SVID_TTL_SECONDS = 3600
# Upper bounds that keep durations inside what X.509 and datetime can hold, and inside what
# an operator would mean; anything longer is a mistake in the request.
MAX_TTL_SECONDS = 366 * 24 * 3600
MAX_TOKEN_TTL_SECONDS = 30 * 24 * 3600
# SPEC §4: the admin identity's entry, created by `init` and `dev`, never deleted.
ADMIN_PATH = "/dmc/admin"
ADMIN_PERMISSIONS = ("/dmc.v1.Admin/*",)
# The CA's own serving identity.
CA_PATH = "/dmc/ca"

_PARSED_CACHE_LIMIT = 4096
_TOKEN_PREFIX = "dmcjt_"  # noqa: S105 - a public prefix, not a secret
# SPEC §5: a revocation's lease outlives the last certificate it could affect, plus this
# much for clock skew between replicas and etcd's lease granularity.
REVOCATION_MARGIN_SECONDS = 300
MAX_REASON_CHARS = 1024


@dataclass(frozen=True, slots=True)
class IssuedSvid:
    """A freshly issued SVID: its chain (leaf first, no root) and the bundle of the day."""

    chain: tuple[x509.Certificate, ...]
    bundle: TrustBundle

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def admin_entry(trust_domain: str, svid_ttl_seconds: int, now: datetime) -> Entry:
    """The admin identity's registration entry (SPEC §4)."""
    return Entry(
        spiffe_id=SpiffeId.parse(f"spiffe://{trust_domain}{ADMIN_PATH}"),
        permissions=ADMIN_PERMISSIONS,
        audiences=(),
        max_depth=0,
        svid_ttl_seconds=svid_ttl_seconds,
        dns_names=(),
        created_at=now,
    )


def _check_ttl(ttl_seconds: int, what: str, maximum: int) -> None:
    if ttl_seconds <= 0:
        raise InvalidArgument(f"{what} must be positive, got {ttl_seconds} s")
    if ttl_seconds > maximum:
        raise InvalidArgument(f"{what} of {ttl_seconds} s is longer than the maximum {maximum} s")


# The Admin service's methods, read from its descriptor so that a new one is covered.
_ADMIN_METHODS = tuple(
    f"/{service.full_name}/{method.name}"
    for service in (admin_pb2.DESCRIPTOR.services_by_name["Admin"],)
    for method in service.methods
)


def _check_admin_grant(granter: DelegationScope, permissions: Sequence[str], what: str) -> None:
    """Refuse to hand out Admin powers the caller does not hold itself.

    An entry, and a join token for it, give away that entry's scope. Delegation only ever
    narrows (SPEC §3); without this, a credential allowed only CreateJoinToken could mint a
    token for the admin entry and come back with the whole Admin service.
    """
    for method in _ADMIN_METHODS:
        granted = any(permission_covers(p, method) for p in permissions)
        if granted and not permits_method(granter, method):
            raise PermissionDenied(
                f"{what} would grant {method}, which the caller's scope does not permit"
            )


class CertificateAuthority:
    """Issues SVIDs for one trust domain from the store's view of etcd."""

    def __init__(
        self,
        store: Store,
        kek: bytes,
        trust_domain: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._kek = kek
        self.trust_domain = trust_domain
        self._clock = clock
        self._signing: dict[str, SigningAuthority] = {}
        self._parsed: dict[bytes, Svid] = {}
        self._bundle_cache: tuple[StoreView, TrustBundle] | None = None

    # -- state read from the view ----------------------------------------------------------

    def bundle(self) -> TrustBundle:
        """The current trust bundle, from the in-memory view (built once per view)."""
        view = self._store.view
        cached = self._bundle_cache
        if cached is not None and cached[0] is view:
            return cached[1]
        bundle = bundle_of(
            self.trust_domain,
            view.bundle_sequence,
            list(view.authorities.values()),
            self.longest_svid_ttl(),
        )
        self._bundle_cache = (view, bundle)
        return bundle

    def longest_svid_ttl(self) -> timedelta:
        """The longest lifetime of an SVID under the current entries (the admin's included)."""
        return timedelta(
            seconds=max(
                (e.svid_ttl_seconds for e in self._store.view.entries.values()),
                default=DEFAULT_SVID_TTL_SECONDS,
            )
        )

    def signing_authority(self) -> SigningAuthority:
        """The ACTIVE authority, unsealed once and cached by its id."""
        active = [
            r for r in self._store.view.authorities.values() if r.state is AuthorityState.ACTIVE
        ]
        if not active:
            raise FailedPrecondition("no active authority; run `dmc-ca init` first")
        record = max(active, key=lambda r: r.created_at)
        signing = self._signing.get(record.id)
        if signing is None:
            signing = unseal_authority(self.trust_domain, record, self._kek)
            self._signing = {record.id: signing}
        return signing

    def _entry(self, spiffe_id: SpiffeId) -> Entry | None:
        return self._store.view.entries.get(spiffe_id)

    # -- callers ------------------------------------------------------------------------------

    def authenticate(self, leaf_pem: bytes) -> Svid:
        """The verified caller behind a client certificate that passed the TLS handshake.

        The handshake has checked the chain against the bundle; this checks what TLS does
        not: the X.509-SVID rules (SPEC §2), the trust domain, and that an authority still in
        the bundle signed it, which also covers connections opened before a forced
        retirement (SPEC §5).
        """
        # Parsed certificates are cached by their bytes, so a renewal parses no X.509.
        svid = self._parsed.get(leaf_pem)
        if svid is None:
            svid = parse_svid(x509.load_pem_x509_certificate(leaf_pem))
            if len(self._parsed) >= _PARSED_CACHE_LIMIT:
                self._parsed.clear()
            self._parsed[leaf_pem] = svid

        if svid.spiffe_id.trust_domain != self.trust_domain:
            raise Unauthenticated(
                f"caller {svid.spiffe_id} is not in trust domain {self.trust_domain}"
            )
        now = self._clock()
        if not svid.not_before <= now <= svid.not_after:
            raise Unauthenticated(f"certificate of {svid.spiffe_id} is not valid now")
        for signer in self.bundle().signing_certificates():
            try:
                svid.certificate.verify_directly_issued_by(signer)
            except (ValueError, TypeError, InvalidSignature):
                continue
            # SPEC §4: every CA RPC needs an unrevoked SVID; a revoked caller is
            # PERMISSION_DENIED, named by its revocation (SPEC §3).
            self._store.view.revocations.check(svid)
            return svid
        raise Unauthenticated(
            f"certificate of {svid.spiffe_id} was not signed by an authority of the bundle"
        )

    def authorize_admin(self, caller: Svid, method: str) -> None:
        """SPEC §4: the Admin service needs a scope whose permissions cover the method."""
        if not permits_method(caller.scope, method):
            raise PermissionDenied(f"{caller.spiffe_id} may not call {method}")

    # -- issuance -----------------------------------------------------------------------------

    def issue(
        self,
        public_key: CertificatePublicKeyTypes,
        spiffe_id: SpiffeId,
        scope: DelegationScope,
        ttl_seconds: int,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[IPv4Address | IPv6Address] = (),
    ) -> IssuedSvid:
        """Issue an SVID for ``public_key``; the RPCs call it once their checks have passed,
        the CA itself for its serving SVID and the admin credential."""
        signing = self.signing_authority()
        now = self._issuance_time(spiffe_id, scope.delegators)
        if scope.not_after is not None and scope.not_after <= now:
            raise PermissionDenied(f"the delegation of {spiffe_id} ended at {scope.not_after}")
        leaf = issue_svid(
            signing,
            public_key,
            spiffe_id,
            scope,
            ttl_seconds,
            now,
            dns_names=tuple(dns_names),
            ip_addresses=tuple(ip_addresses),
        )
        _log.info(
            "issued %s serial %x until %s",
            spiffe_id,
            leaf.serial_number,
            leaf.not_valid_after_utc.isoformat(),
        )
        # The chain carries intermediates, never the root (SPEC §2, §4).
        return IssuedSvid(chain=signing.svid_chain(leaf), bundle=self.bundle())

    def _issuance_time(self, spiffe_id: SpiffeId, delegators: Sequence[str]) -> datetime:
        """Now, or the next whole second after a revocation made in this second.

        Certificates carry whole seconds, and SPEC §3 catches a certificate issued up to
        the moment its ID (or a delegator's) was revoked: one issued in the same second
        would be caught by the revocation it follows, so an identity enrolled again just
        after a revocation would be born revoked. Issuing as of the next second (less than
        one second ahead; notBefore stays 29 s in the past) keeps it clear.
        """
        now = self._clock()
        by_id = self._store.view.revocations.by_id
        if not by_id:
            return now
        latest = max(
            (r.revoked_at for r in map(by_id.get, [str(spiffe_id), *delegators]) if r),
            default=None,
        )
        second = now.replace(microsecond=0)
        if latest is None or latest < second or latest - now > timedelta(seconds=1):
            return now
        return latest.replace(microsecond=0) + timedelta(seconds=1)

    @staticmethod
    def entry_scope(entry: Entry) -> DelegationScope:
        """The scope of a root SVID: its entry's current permissions, audiences and depth."""
        return DelegationScope(
            permissions=tuple(entry.permissions),
            audiences=tuple(entry.audiences),
            max_depth=entry.max_depth,
            delegators=(),
            not_after=None,
        )

    async def bootstrap(self, token: str, csr_der: bytes) -> IssuedSvid:
        """SPEC §4 Bootstrap: a single-use token bound to one entry; refused leaves it unspent."""
        if not token:
            raise Unauthenticated("a join token is required")
        hashed = hash_token(token)
        record, mod_revision = await self._store.get_token(hashed)
        entry = self._entry(record.spiffe_id)
        if entry is None:
            raise Unauthenticated(f"the entry {record.spiffe_id} of this join token is gone")

        public_key = check_csr(csr_der, entry.spiffe_id)
        # Everything that can refuse the request has run: spending is the last step, so a
        # refused Bootstrap leaves the token unspent, and the transaction lets one of many
        # concurrent users win.
        await self._store.spend_token(hashed, mod_revision)
        return self.issue(
            public_key,
            entry.spiffe_id,
            self.entry_scope(entry),
            entry.svid_ttl_seconds,
            entry.dns_names,
        )

    def _origin_entry(self, caller: Svid) -> Entry:
        # A root SVID renews from its own entry; a delegated one from its origin's, so that
        # deleting the origin's entry ends every delegation below it.
        origin_text = caller.scope.delegators[0] if caller.scope.delegators else None
        origin = SpiffeId.parse(origin_text) if origin_text else caller.spiffe_id
        entry = self._entry(origin)
        if entry is None:
            raise PermissionDenied(f"no registration entry for {origin}")
        return entry

    def renew(self, caller: Svid, csr_der: bytes) -> IssuedSvid:
        """SPEC §4 Renew: the same ID and scope as the caller."""
        public_key = check_csr(csr_der, caller.spiffe_id)
        entry = self._origin_entry(caller)

        if caller.scope.delegators:
            # A delegated SVID keeps its scope and its hard end (SPEC §3).
            return self.issue(public_key, caller.spiffe_id, caller.scope, entry.svid_ttl_seconds)
        return self.issue(
            public_key,
            caller.spiffe_id,
            self.entry_scope(entry),
            entry.svid_ttl_seconds,
            entry.dns_names,
        )

    def delegate(
        self,
        caller: Svid,
        csr_der: bytes,
        spiffe_id: str,
        permissions: Sequence[str],
        audiences: Sequence[str],
        max_depth: int,
        ttl_seconds: int,
    ) -> IssuedSvid:
        """SPEC §4 Delegate: a narrower SVID, under the subset rule of SPEC §3."""
        child_id = SpiffeId.parse(spiffe_id)
        _check_ttl(ttl_seconds, "delegation TTL", MAX_TTL_SECONDS)

        public_key = check_csr(csr_der, child_id)
        # The patterns and the depth are validated, then compared, by the subset rule.
        scope = derive_delegated_scope(
            caller.spiffe_id,
            caller.scope,
            child_id,
            permissions,
            audiences,
            max_depth,
            ttl_seconds,
            self._clock(),
        )
        entry = self._origin_entry(caller)
        return self.issue(public_key, child_id, scope, entry.svid_ttl_seconds)

    # -- authority life cycle (SPEC §4 PrepareAuthority, ActivateAuthority, RetireAuthority) --

    def _bundle_authority(self, authority_id: str) -> BundleAuthority:
        for authority in self.bundle().authorities:
            if authority.id == authority_id:
                return authority
        raise NotFound(f"no authority {authority_id!r} in the trust bundle")

    async def prepare_authority(
        self,
        key_type: KeyType = KeyType.EC_P256,
        chain_pem: bytes | None = None,
        key_pem: bytes | None = None,
    ) -> BundleAuthority:
        """Add a PREPARED authority: in the bundle, trusted, but signing nothing yet.

        Without ``chain_pem`` a key of ``key_type`` and a self-signed certificate are made;
        with it, an existing CA (a root, or an intermediate whose chain ends in a root) is
        imported after every check has passed, so a refused import writes nothing.
        """
        record, _signing = new_authority(
            self.trust_domain,
            self._kek,
            self._clock(),
            state=AuthorityState.PREPARED,
            key_type=key_type,
            imported_chain_pem=chain_pem,
            imported_key_pem=key_pem,
        )
        # The bundle sequence grows in the same transaction (SPEC §4).
        await self._store.put_authority(record)
        _log.info("prepared authority %s (%s)", record.id, "imported" if chain_pem else key_type)
        return self._bundle_authority(record.id)

    async def activate_authority(self, authority_id: str = "") -> BundleAuthority:
        """Make a PREPARED authority the signer; the ACTIVE one becomes PREVIOUS."""
        target, states = plan_activation(self._store.view.authorities, authority_id)
        # A key this replica cannot open would stop all issuance once it is ACTIVE.
        unseal_authority(self.trust_domain, target, self._kek)

        await self._store.set_authority_states(states)
        _log.info(
            "activated authority %s; previous: %s", target.id, sorted(set(states) - {target.id})
        )
        return self._bundle_authority(target.id)

    async def retire_authority(
        self, authority_id: str = "", *, force: bool = False
    ) -> BundleAuthority:
        """Remove an authority from the bundle (SPEC §5); see :func:`plan_retirement`."""
        target = plan_retirement(
            self._store.view.authorities,
            authority_id,
            now=self._clock(),
            longest_svid_ttl=self.longest_svid_ttl(),
            force=force,
        )
        retired = self._bundle_authority(target.id)

        await self._store.set_authority_states({}, delete=[target.id])
        if force and target.state is AuthorityState.PREVIOUS:
            _log.warning(
                "authority %s retired by force: everything it signed is refused", target.id
            )
        else:
            _log.info("retired authority %s", target.id)
        return retired

    # -- admin --------------------------------------------------------------------------------

    def _own_id(self, text: str) -> SpiffeId:
        spiffe_id = SpiffeId.parse(text)
        if spiffe_id.trust_domain != self.trust_domain:
            raise InvalidArgument(f"{spiffe_id} is not in trust domain {self.trust_domain}")
        if not spiffe_id.path:
            raise InvalidArgument(f"{spiffe_id} names the trust domain, not a workload")
        return spiffe_id

    async def create_entry(
        self,
        granter: DelegationScope,
        spiffe_id: str,
        permissions: Sequence[str],
        audiences: Sequence[str],
        max_depth: int,
        svid_ttl_seconds: int,
        dns_names: Sequence[str],
    ) -> Entry:
        """Register a workload identity (SPEC §4 CreateEntry)."""
        entry_id = self._own_id(spiffe_id)
        for permission in permissions:
            validate_permission(permission)
        for audience in audiences:
            validate_audience(audience, self.trust_domain)
        if max_depth > MAX_DEPTH:
            raise InvalidArgument(f"max depth {max_depth} is above {MAX_DEPTH}")
        _check_admin_grant(granter, permissions, f"an entry for {entry_id}")
        ttl = svid_ttl_seconds or DEFAULT_SVID_TTL_SECONDS
        _check_ttl(ttl, "SVID TTL", MAX_TTL_SECONDS)

        entry = Entry(
            spiffe_id=entry_id,
            permissions=tuple(permissions),
            audiences=tuple(audiences),
            max_depth=max_depth,
            svid_ttl_seconds=ttl,
            dns_names=tuple(dns_names),
            created_at=self._clock().replace(microsecond=0),
        )
        await self._store.create_entry(entry)
        _log.info("created entry %s", entry_id)
        return entry

    def get_entry(self, spiffe_id: str) -> Entry:
        entry = self._entry(SpiffeId.parse(spiffe_id))
        if entry is None:
            raise NotFound(f"no entry for {spiffe_id}")
        return entry

    def list_entries(self) -> list[Entry]:
        return sorted(self._store.view.entries.values(), key=lambda e: str(e.spiffe_id))

    async def delete_entry(self, spiffe_id: str) -> None:
        entry_id = SpiffeId.parse(spiffe_id)
        if entry_id.path == ADMIN_PATH and entry_id.trust_domain == self.trust_domain:
            raise FailedPrecondition(
                f"{entry_id} is the admin identity; deleting it would lock operators out"
            )
        await self._store.delete_entry(entry_id)
        _log.info("deleted entry %s", entry_id)

    async def create_join_token(
        self, granter: DelegationScope, spiffe_id: str, ttl_seconds: int
    ) -> tuple[str, JoinToken]:
        """A single-use token for one existing entry; only its hash is stored (SPEC §4)."""
        entry_id = self._own_id(spiffe_id)
        _check_ttl(ttl_seconds, "token TTL", MAX_TOKEN_TTL_SECONDS)
        entry = self._entry(entry_id)
        if entry is None:
            raise NotFound(f"no entry for {entry_id}; create the entry first")
        _check_admin_grant(granter, entry.permissions, f"a join token for {entry_id}")

        # A fixed prefix makes a leaked token recognisable to secret scanners, and keeps a
        # token from starting with '-', which a command line would read as a flag.
        token = _TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires_at = self._clock().replace(microsecond=0) + timedelta(seconds=ttl_seconds)
        record = JoinToken(spiffe_id=entry_id, expires_at=expires_at)
        await self._store.create_token(hash_token(token), record, ttl_seconds)
        _log.info("created a join token for %s until %s", entry_id, expires_at.isoformat())
        return token, record

    # -- revocation (SPEC §3, §4, §5) --------------------------------------------------------

    def _revocation_lifetime(self) -> timedelta:
        """How long a revocation made now must last (SPEC §5).

        Every certificate it could affect was issued before now, and none lives longer than
        the largest SVID TTL among the entries (a delegated SVID lives its origin entry's
        TTL, cut shorter; the CA's own serving SVID lives the default TTL), so the lease
        ends that long after now plus a margin. A certificate issued under an entry since
        deleted with a longer TTL is not counted.
        """
        longest = max(
            (e.svid_ttl_seconds for e in self._store.view.entries.values()),
            default=DEFAULT_SVID_TTL_SECONDS,
        )
        longest = max(longest, DEFAULT_SVID_TTL_SECONDS)
        return timedelta(seconds=longest + REVOCATION_MARGIN_SECONDS)

    async def revoke(self, serial: str | None, spiffe_id: str | None, reason: str) -> Revocation:
        """Revoke one certificate by serial, or an identity by SPIFFE ID (SPEC §4 Revoke)."""
        if serial is not None and spiffe_id is None:
            kind, value = RevocationKind.SERIAL, normalize_serial(serial)
        elif spiffe_id is not None and serial is None:
            kind, value = RevocationKind.ID, str(self._own_id(spiffe_id))
        else:
            raise InvalidArgument("revoke needs exactly one of a serial or a SPIFFE ID")
        reason = reason.strip()
        if not reason:
            raise InvalidArgument("a revocation needs a reason")
        if len(reason) > MAX_REASON_CHARS:
            raise InvalidArgument(f"the reason is longer than {MAX_REASON_CHARS} characters")
        # The reason is sent back in every refusal it causes, so it stays one printable line.
        if not reason.isprintable():
            raise InvalidArgument("the reason holds a line break or another control character")

        now = self._clock()
        expires_at = now + self._revocation_lifetime()
        table = self._store.view.revocations
        earlier = (table.by_serial if kind is RevocationKind.SERIAL else table.by_id).get(value)
        if earlier is not None and earlier.expires_at > expires_at:
            # A revocation replaced under the same key keeps the longer of the two lives.
            expires_at = earlier.expires_at
        revocation = Revocation(
            kind=kind, value=value, reason=reason, revoked_at=now, expires_at=expires_at
        )
        await self._store.put_revocation(revocation)
        _log.info(
            "revoked %s until %s: %s",
            revocation.describe(),
            expires_at.isoformat(),
            reason,
        )
        return revocation

    def list_revocations(self) -> list[Revocation]:
        """Every revocation in force, from the view."""
        return list(self._store.view.revocations)
