"""The names `import dmc` exposes are the public API; changing them is a decision."""

import dmc
import dmc.aio

PUBLIC = {
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
}


def test_public_names_are_pinned() -> None:
    assert set(dmc.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(dmc, name) is not None


def test_aio_module_offers_the_aio_channel() -> None:
    assert callable(dmc.aio.secure_channel)
    assert dmc.AioAuthorizingInterceptor is not dmc.AuthorizingInterceptor


def test_package_is_typed() -> None:
    from importlib.resources import files

    assert files("dmc").joinpath("py.typed").is_file()
