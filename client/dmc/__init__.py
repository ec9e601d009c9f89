"""dmc: Delegated Machine Credentials, the client library (SPEC §7).

A service holds an :class:`IdentitySource` (an X.509-SVID renewed in the background),
calls others through :func:`secure_channel`, serves with :func:`server_credentials`, and
authorizes each call with :class:`AuthorizingInterceptor`, which checks the caller's
delegation scope and revocations and hands the handler the verified :class:`Peer`
(:func:`current_peer`). The ``grpc.aio`` equivalents are :func:`dmc.aio.secure_channel`
and :class:`AioAuthorizingInterceptor`.
"""

from __future__ import annotations

import logging

from dmc.authz import AioAuthorizingInterceptor, AuthorizingInterceptor, Peer, current_peer
from dmc.channel import SecureChannel, ServerNameMismatch, secure_channel
from dmc.credentials import server_credentials
from dmc.errors import DmcError
from dmc.revocation import Revocation, RevocationSet
from dmc.revocations_follower import RevocationFollower
from dmc.scope import DelegationScope
from dmc.source import Identity, IdentitySource, RenewalPolicy
from dmc.spiffe_id import SpiffeId
from dmc.svid import Svid

__all__ = [
    "AioAuthorizingInterceptor",
    "AuthorizingInterceptor",
    "DelegationScope",
    "DmcError",
    "Identity",
    "IdentitySource",
    "Peer",
    "RenewalPolicy",
    "Revocation",
    "RevocationFollower",
    "RevocationSet",
    "SecureChannel",
    "ServerNameMismatch",
    "SpiffeId",
    "Svid",
    "current_peer",
    "secure_channel",
    "server_credentials",
]

# A library configures no handlers; the commands do (STYLE.md).
logging.getLogger(__name__).addHandler(logging.NullHandler())
