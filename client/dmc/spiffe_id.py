"""SPIFFE IDs, read exactly as the SPIFFE ID standard and SPEC §2 write them.

https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md

A SPIFFE ID is ``spiffe://<trust domain><path>``. Nothing is ever normalised: no
lower-casing, no percent-decoding, no resolving of ``.`` or ``..``. Anything outside the
grammar is refused with an :class:`~dmc.errors.InvalidSpiffeId` whose message names the
offending part, so ``spiffe://example.org/x/../admin`` can never become ``/admin``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from dmc.errors import InvalidSpiffeId, shown

__all__ = ["MAX_SPIFFE_ID_BYTES", "SCHEME", "SpiffeId", "validate_trust_domain"]

SCHEME = "spiffe"
MAX_SPIFFE_ID_BYTES = 2048

_PREFIX = SCHEME + "://"
_TRUST_DOMAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_SEGMENT_CHARS = _TRUST_DOMAIN_CHARS | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_SHOWN_CHARS = 80


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A valid SPIFFE ID; ``path`` is ``""`` (the trust domain's own ID) or starts with ``/``."""

    trust_domain: str
    path: str = ""

    def __post_init__(self) -> None:
        # Building the value directly is as strict as parsing it; parse() relies on this.
        text = str(self)
        _check_length(text)
        _check_authority(self.trust_domain, text)
        _check_path(self.path, text)

    @classmethod
    def parse(cls, text: str) -> Self:
        """Read ``text`` as a SPIFFE ID, refusing anything outside SPEC §2."""
        if not isinstance(text, str):
            raise TypeError(f"a SPIFFE ID is a str, not {type(text).__name__}")
        _check_length(text)

        if not text.startswith(_PREFIX):
            raise InvalidSpiffeId(f"SPIFFE ID {_show(text)}: {_describe_scheme(text)}")
        rest = text[len(_PREFIX) :]

        # RFC 3986 §3: the query starts at the first '?', the fragment at the first '#'.
        # SPIFFE-ID §2 allows neither; they are named here rather than as bad characters.
        marks = [position for position in (rest.find("?"), rest.find("#")) if position != -1]
        if marks:
            mark = rest[min(marks)]
            part = "query" if mark == "?" else "fragment"
            raise InvalidSpiffeId(
                f"SPIFFE ID {_show(text)} has a {part} ('{mark}...'); SPIFFE IDs carry no {part}"
            )

        slash = rest.find("/")
        authority, path = (rest, "") if slash == -1 else (rest[:slash], rest[slash:])
        return cls(authority, path)

    @classmethod
    def for_trust_domain(cls, trust_domain: str) -> Self:
        """The trust domain's own ID, ``spiffe://<trust domain>`` (no path)."""
        return cls(validate_trust_domain(trust_domain), "")

    @property
    def segments(self) -> tuple[str, ...]:
        """The path segments; ``()`` for the trust domain's own ID."""
        return tuple(self.path[1:].split("/")) if self.path else ()

    @property
    def is_trust_domain_id(self) -> bool:
        """Whether this is ``spiffe://<trust domain>`` itself, with no path."""
        return not self.path

    def is_same_or_below(self, other: SpiffeId) -> bool:
        """Whether this ID is ``other`` or lies below it, compared segment by segment.

        ``spiffe://td/web/a`` is below ``spiffe://td/web``; ``spiffe://td/web-evil`` is not,
        although the strings share a prefix.
        """
        if self.trust_domain != other.trust_domain:
            return False
        mine, theirs = self.segments, other.segments
        return mine[: len(theirs)] == theirs

    def __str__(self) -> str:
        return f"{_PREFIX}{self.trust_domain}{self.path}"


def validate_trust_domain(trust_domain: str) -> str:
    """Return ``trust_domain`` unchanged if it is a valid trust domain name (SPEC §2)."""
    if not isinstance(trust_domain, str):
        raise TypeError(f"a trust domain is a str, not {type(trust_domain).__name__}")
    if "://" in trust_domain:
        raise InvalidSpiffeId(
            f"trust domain {_show(trust_domain)} must be a bare name such as 'example.org', "
            "not a URI"
        )
    _check_authority(trust_domain, None)
    return trust_domain


def _check_authority(authority: str, spiffe_id: str | None) -> None:
    """Check the trust domain part; ``spiffe_id`` is the whole ID when there is one."""
    where = f"SPIFFE ID {_show(spiffe_id)}" if spiffe_id is not None else "trust domain"
    if not authority:
        raise InvalidSpiffeId(f"{where}: the trust domain is empty")
    # SPIFFE-ID §2.1: the trust domain is a bare name, never user@host:port.
    if "@" in authority:
        raise InvalidSpiffeId(
            f"{where}: trust domain {_show(authority)} has userinfo ('...@'); not allowed"
        )
    if ":" in authority:
        raise InvalidSpiffeId(
            f"{where}: trust domain {_show(authority)} has a port (':...'); not allowed"
        )
    # SPEC §2: only [a-z0-9._-]. Upper case is refused, not lower-cased.
    for char in authority:
        if char not in _TRUST_DOMAIN_CHARS:
            raise InvalidSpiffeId(
                f"{where}: trust domain character {_show_char(char)} is not allowed "
                f"(only a-z, 0-9, '.', '-' and '_'){_percent_note(char)}"
            )


def _check_path(path: str, spiffe_id: str) -> None:
    """Check the path segment by segment (SPIFFE-ID §2.2, SPEC §2)."""
    if not path:
        return
    where = f"SPIFFE ID {_show(spiffe_id)}"
    if not path.startswith("/"):
        raise InvalidSpiffeId(f"{where}: the path must start with '/'")

    segments = path[1:].split("/")
    for index, segment in enumerate(segments):
        if not segment:
            if index == len(segments) - 1:
                raise InvalidSpiffeId(f"{where}: trailing '/' is not allowed")
            raise InvalidSpiffeId(f"{where}: empty segment ('//') is not allowed")
        if segment in (".", ".."):
            raise InvalidSpiffeId(
                f"{where}: segment '{segment}' is not allowed (paths are never resolved)"
            )
        for char in segment:
            if char not in _SEGMENT_CHARS:
                raise InvalidSpiffeId(
                    f"{where}: character {_show_char(char)} is not allowed in a path segment "
                    f"(only A-Z, a-z, 0-9, '.', '-' and '_'){_percent_note(char)}"
                )


def _check_length(text: str) -> None:
    # SPIFFE-ID §2.3: an ID longer than 2048 bytes must not be considered valid.
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SPIFFE_ID_BYTES:
        raise InvalidSpiffeId(
            f"SPIFFE ID {_show(text)} is {size} bytes, longer than {MAX_SPIFFE_ID_BYTES} bytes"
        )


def _describe_scheme(text: str) -> str:
    scheme, colon, _ = text.partition(":")
    if not colon:
        return f"scheme missing: a SPIFFE ID starts with '{_PREFIX}'"
    if scheme == SCHEME:
        return f"scheme '{SCHEME}' must be followed by '//' and the trust domain"
    return f"scheme {_show(scheme)} is not '{SCHEME}' (it must read '{_PREFIX}' exactly)"


def _percent_note(char: str) -> str:
    return "; percent-encoding is not allowed" if char == "%" else ""


def _show_char(char: str) -> str:
    return f"'{char}'" if char.isprintable() else f"U+{ord(char):04X}"


def _show(text: str | None) -> str:
    """Quote ``text`` for a message (see `dmc.errors.shown`)."""
    return shown(text or "", limit=_SHOWN_CHARS)
