"""SPIFFE ID grammar (SPEC §2), driven by cases/006 and by trust-domain rules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dmc.errors import InvalidArgument, InvalidSpiffeId
from dmc.spiffe_id import SpiffeId, validate_trust_domain

CASES = Path(__file__).parent / "cases" / "006-spiffe-id-path-grammar" / "spiffe-ids.txt"


def _table() -> list[tuple[str, str, str]]:
    rows = []
    for line in CASES.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        verdict, spiffe_id, *offending = line.split("\t")
        rows.append((verdict, spiffe_id, offending[0] if offending else ""))
    return rows


TABLE = _table()
VALID = [row[1] for row in TABLE if row[0] == "valid"]
INVALID = [(row[1], row[2]) for row in TABLE if row[0] == "invalid"]


def _short(text: str) -> str:
    return text if len(text) < 50 else text[:40] + "..."


def test_case_table_has_both_verdicts() -> None:
    assert len(VALID) >= 5
    assert len(INVALID) >= 15
    assert {row[0] for row in TABLE} == {"valid", "invalid"}


@pytest.mark.parametrize("text", VALID, ids=_short)
def test_parse_accepts_valid_table_ids_unchanged(text: str) -> None:
    spiffe_id = SpiffeId.parse(text)

    assert str(spiffe_id) == text
    assert spiffe_id.trust_domain == "example.org"
    assert spiffe_id.path == text[len("spiffe://example.org") :]


@pytest.mark.parametrize(("text", "offending"), INVALID, ids=lambda v: _short(str(v)))
def test_parse_refuses_invalid_table_ids_naming_the_part(text: str, offending: str) -> None:
    with pytest.raises(InvalidSpiffeId) as caught:
        SpiffeId.parse(text)

    message = str(caught.value)
    if offending == "empty segment / trailing '/'":
        assert "empty segment" in message or "trailing '/'" in message
    else:
        assert offending in message


def test_invalid_spiffe_id_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        SpiffeId.parse("spiffe://example.org/a/../b")


def test_parse_accepts_exactly_2048_bytes_and_refuses_2049() -> None:
    base = "spiffe://example.org/"
    exact = base + "a" * (2048 - len(base))

    assert str(SpiffeId.parse(exact)) == exact
    with pytest.raises(InvalidSpiffeId, match="longer than 2048 bytes"):
        SpiffeId.parse(exact + "a")


def test_length_counts_utf8_bytes_not_characters() -> None:
    # 1000 two-byte characters are 2000 bytes: over the limit with the prefix, and the
    # characters themselves are refused too, but the length is what is named first.
    with pytest.raises(InvalidSpiffeId, match="longer than 2048 bytes"):
        SpiffeId.parse("spiffe://example.org/" + "é" * 1020)


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("spiffe://Example.org/a", "trust domain character 'E'"),
        ("spiffe://EXAMPLE.ORG", "trust domain character 'E'"),
        ("spiffe://example.org:8443/a", "port"),
        ("spiffe://example.org:/a", "port"),
        ("spiffe://user@example.org/a", "userinfo"),
        ("spiffe://user:pw@example.org/a", "userinfo"),
        ("spiffe://example.org/a?x=1", "query"),
        ("spiffe://example.org?x=1", "query"),
        ("spiffe://example.org/a#frag", "fragment"),
        ("spiffe://example.org#frag", "fragment"),
        ("https://example.org/a", "scheme 'https'"),
        ("SPIFFE://example.org/a", "scheme 'SPIFFE'"),
        ("Spiffe://example.org/a", "scheme 'Spiffe'"),
        ("spiffe:/example.org/a", "scheme 'spiffe' must be followed by '//'"),
        ("example.org/a", "scheme missing"),
        ("", "scheme missing"),
        ("spiffe://ex%61mple.org/a", "percent-encoding"),
        ("spiffe://example.org/a%2Fb", "percent-encoding"),
        ("spiffe://example.org/caf%C3%A9", "character '%'"),
        ("spiffe://", "trust domain is empty"),
        ("spiffe:///a", "trust domain is empty"),
        ("spiffe://exa mple.org/a", "trust domain character ' '"),
        ("spiffe://[::1]/a", "port"),
        ("spiffe://example.org/caf\u00e9", "character 'é'"),
        ("spiffe://example.org/a\nb", "character U+000A"),
    ],
)
def test_parse_refuses_trust_domain_and_uri_parts(text: str, part: str) -> None:
    with pytest.raises(InvalidSpiffeId) as caught:
        SpiffeId.parse(text)

    assert part in str(caught.value)


@pytest.mark.parametrize("text", ["spiffe://example.org/A", "spiffe://ex-a_m.ple9.org/x"])
def test_parse_never_normalises(text: str) -> None:
    assert str(SpiffeId.parse(text)) == text


def test_parse_refuses_non_str() -> None:
    with pytest.raises(TypeError):
        SpiffeId.parse(b"spiffe://example.org/a")  # type: ignore[arg-type]


def test_constructor_is_as_strict_as_parse() -> None:
    assert str(SpiffeId("example.org", "/a/b")) == "spiffe://example.org/a/b"
    with pytest.raises(InvalidSpiffeId, match=re.escape("segment '..'")):
        SpiffeId("example.org", "/a/../b")
    with pytest.raises(InvalidSpiffeId, match="trust domain character 'X'"):
        SpiffeId("eXample.org", "/a")
    with pytest.raises(InvalidSpiffeId, match="must start with '/'"):
        SpiffeId("example.org", "a")


def test_trust_domain_id_has_no_path_and_no_segments() -> None:
    td_id = SpiffeId.for_trust_domain("example.org")

    assert str(td_id) == "spiffe://example.org"
    assert td_id.is_trust_domain_id
    assert td_id.segments == ()
    assert SpiffeId.parse("spiffe://example.org") == td_id
    assert not SpiffeId.parse("spiffe://example.org/a").is_trust_domain_id


def test_segments_split_the_path() -> None:
    assert SpiffeId.parse("spiffe://td/ns/prod/sa/api").segments == ("ns", "prod", "sa", "api")


@pytest.mark.parametrize(
    ("child", "parent", "expected"),
    [
        ("spiffe://td/web", "spiffe://td/web", True),
        ("spiffe://td/web/a", "spiffe://td/web", True),
        ("spiffe://td/web/a/b", "spiffe://td/web", True),
        ("spiffe://td/web", "spiffe://td", True),
        ("spiffe://td/web-evil", "spiffe://td/web", False),
        ("spiffe://td/webx/a", "spiffe://td/web", False),
        ("spiffe://td/web", "spiffe://td/web/a", False),
        ("spiffe://td", "spiffe://td/web", False),
        ("spiffe://other/web/a", "spiffe://td/web", False),
        ("spiffe://td.evil/web", "spiffe://td", False),
    ],
)
def test_is_same_or_below_compares_segments(child: str, parent: str, expected: bool) -> None:
    assert SpiffeId.parse(child).is_same_or_below(SpiffeId.parse(parent)) is expected


@pytest.mark.parametrize("td", ["example.org", "a", "my_td-1.internal", "..."])
def test_validate_trust_domain_accepts_and_returns_it(td: str) -> None:
    assert validate_trust_domain(td) == td
    assert SpiffeId.for_trust_domain(td).trust_domain == td


@pytest.mark.parametrize(
    ("td", "part"),
    [
        ("Example.org", "trust domain character 'E'"),
        ("", "empty"),
        ("example.org:443", "port"),
        ("admin@example.org", "userinfo"),
        ("spiffe://example.org", "not a URI"),
        ("ex%41mple.org", "percent-encoding"),
        ("example.org/path", "trust domain character '/'"),
    ],
)
def test_validate_trust_domain_refuses(td: str, part: str) -> None:
    with pytest.raises(InvalidSpiffeId) as caught:
        validate_trust_domain(td)

    assert part in str(caught.value)


def test_spiffe_ids_are_hashable_values() -> None:
    a = SpiffeId.parse("spiffe://td/a")

    assert a == SpiffeId("td", "/a")
    assert len({a, SpiffeId("td", "/a"), SpiffeId("td", "/b")}) == 2
