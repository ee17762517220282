"""Path and Host normalisation and the typed config scalars, without sockets."""

from __future__ import annotations

import re

import pytest

from bastion.config.types import HostPort, parse_address, parse_duration, parse_size
from bastion.errors import BadRequest
from bastion.http import paths
from bastion.http.paths import normalize_path, parse_authority, parse_target, request_host


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("//a///b", "/a/b"),
        ("/%61dmin", "/admin"),
        ("/%2e%2e/admin", "/admin"),
        ("/a%2E/b", "/a./b"),
        ("/%7euser", "/~user"),
        ("/a%20b", "/a%20b"),
        ("/a%3fb", "/a%3Fb"),
        ("/caf%C3%A9", "/caf%C3%A9"),
        ("/%252e%252e/", "/%252e%252e/"),  # decoded once, never twice
        # Segment parameters are fine as long as the segment is not a dot-segment.
        ("/a;b/c", "/a;b/c"),
        ("/a;b/../c", "/c"),
        ("/a/b;x=..", "/a/b;x=.."),
        ("/...;/x", "/...;/x"),
        ("/a..;/b", "/a..;/b"),
        ("/;/a", "/;/a"),
        ("/a;b/%3b", "/a;b/%3B"),
    ],
)
def test_normalize_path(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize("raw", ["/a%2fb", "/a%2Fb", "/a%5cb", "/a%00", "/a%zz", "/a%2", "/a%"])
def test_normalize_path_refuses_ambiguous_encodings(raw: str) -> None:
    with pytest.raises(BadRequest):
        normalize_path(raw)


@pytest.mark.parametrize("raw", ["/a\\b", "/\\admin", "/a/..\\b", "\\", "/%61\\"])
def test_normalize_path_refuses_raw_backslash(raw: str) -> None:
    with pytest.raises(BadRequest, match="backslash"):
        normalize_path(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "/..;/admin",
        "/a/..;x=1/b",
        "/.;/admin",
        "/a/.;",
        "/a/..;",
        "/%2e%2e;/admin",
        "/%2E;x/admin",
        "/.%2e;/admin",
        "//..;//admin",
        "/..%3b/admin",
        "/..%3Bx/admin",
        "/a/.%3B/b",
    ],
)
def test_normalize_path_refuses_dot_segments_with_parameters(raw: str) -> None:
    with pytest.raises(BadRequest, match=r"'\.\.;' or '\.;'"):
        normalize_path(raw)


def test_target_forms() -> None:
    assert parse_target(b"/a?x=1&y=%2F") == ("/a", "x=1&y=%2F", None)
    assert parse_target(b"*") == ("*", "", None)
    assert parse_target(b"http://Host.:81/p/../q?z") == ("/q", "z", ("host", b"Host:81"))
    assert parse_target(b"https://h") == ("/", "", ("h", b"h"))
    with pytest.raises(BadRequest):
        parse_target(b"ftp://h/x")
    with pytest.raises(BadRequest):
        parse_target(b"relative/path")


def test_parse_target_absolute_form_authority() -> None:
    expected = ("/p", "q=1", ("example.org", b"Example.org:8000"))
    assert parse_target(b"http://Example.org.:8000/p?q=1") == expected
    assert parse_target(b"HTTP://[::1]:8080/x") == ("/x", "", ("::1", b"[::1]:8080"))
    assert parse_target(b"http://h?q") == ("/", "q", ("h", b"h"))
    assert parse_target(b"/a?b") == ("/a", "b", None)


@pytest.mark.parametrize(
    "target",
    [
        b"http://user@h/x",  # userinfo: no longer dropped silently
        b"http://user:pw@h/x",
        b"http://a.com\\@evil.com/",
        b"http:///x",  # RFC 9110 section 4.2.1: an http URI needs a host
        b"https://",
        b"http://:80/x",
        b"http://a.com:99999/",
        b"http://a.com../",
        b"http://h/..;/admin",
        b"http://h/a\\b",
    ],
)
def test_parse_target_refuses_bad_absolute_form(target: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_target(target)


def test_parse_target_refuses_empty_authority_with_its_own_message() -> None:
    with pytest.raises(BadRequest, match="no host"):
        parse_target(b"http:///x")


_ACCEPTED_HOSTS = [
    (b"api.example.com", "api.example.com", b"api.example.com"),
    (b"127.0.0.1:8080", "127.0.0.1", b"127.0.0.1:8080"),
    (b"API.Example.COM", "api.example.com", b"API.Example.COM"),
    (b"localhost", "localhost", b"localhost"),
    (b"[::1]:8080", "::1", b"[::1]:8080"),
    (b"[::1]", "::1", b"[::1]"),
    (b"[FE80::1]:80", "fe80::1", b"[FE80::1]:80"),
    (b"[::ffff:192.0.2.1]", "::ffff:192.0.2.1", b"[::ffff:192.0.2.1]"),
    (b"example.com.", "example.com", b"example.com"),  # one trailing dot: normalised away
    (b"EXAMPLE.COM.:80", "example.com", b"EXAMPLE.COM:80"),
    (b"a.com:", "a.com", b"a.com"),  # empty port: allowed by RFC 3986, dropped
    (b"[::1]:", "::1", b"[::1]"),
    (b"a.com:65535", "a.com", b"a.com:65535"),
    (b"a.com:0", "a.com", b"a.com:0"),
    (b"", "", b""),  # empty Host: allowed (RFC 9112 section 3.2)
    (b"%61pi.example.com", "api.example.com", b"api.example.com"),
    (b"example.com%2E", "example.com", b"example.com"),
    (b"caf%c3%a9.example", "caf%c3%a9.example", b"caf%C3%A9.example"),
    (b"xn--caf-dma.example", "xn--caf-dma.example", b"xn--caf-dma.example"),
    (b"a_b-c~d.example", "a_b-c~d.example", b"a_b-c~d.example"),
    (b"a!$&'()*+;=b", "a!$&'()*+;=b", b"a!$&'()*+;=b"),  # sub-delims but ","
    (b"256.1.1.1", "256.1.1.1", b"256.1.1.1"),  # not IPv4, but a valid reg-name
    (b"a.com:30000", "a.com", b"a.com:30000"),
]


@pytest.mark.parametrize(("raw", "host", "forward"), _ACCEPTED_HOSTS)
def test_parse_authority_accepts(raw: bytes, host: str, forward: bytes) -> None:
    assert parse_authority(raw) == (host, forward)


@pytest.mark.parametrize(("raw", "host", "forward"), _ACCEPTED_HOSTS)
def test_parse_authority_general_path_agrees_with_the_fast_one(
    raw: bytes, host: str, forward: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(paths, "_PLAIN", re.compile(rb"(?!)"))
    assert parse_authority(raw) == (host, forward)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"exa mple.com", "not host"),
        (b" a.com", "not host"),
        (b"a.com\t", "not host"),
        (b"a.com,b.com", "not host"),
        (b"user@a.com", "not host"),
        (b"user:pw@a.com:80", "not host"),
        (b"a.com/", "not host"),
        (b"a.com?", "not host"),
        (b"a.com#", "not host"),
        (b"a\\b.com", "not host"),
        (b"a.com\x00", "not host"),
        (b"a.com\x7f", "not host"),
        (b"a.com\r\nx: y", "not host"),
        (b"caf\xc3\xa9.example", "not host"),  # raw non-ASCII: IDNs travel as xn--
        (b"a:b:c", "not host"),
        (b"::1", "not host"),  # IPv6 needs brackets
        (b"[::1", "not host"),
        (b"::1]", "not host"),
        (b"[::1]x", "not host"),
        (b"[::1][::2]", "not host"),
        (b"a.com:8o", "not host"),
        (b"a.com:-1", "not host"),
        (b"a.com:99999", "above 65535"),
        (b"a.com:65536", "above 65535"),
        (b"a.com:000080", "above 65535"),
        (b"[::1]:99999", "above 65535"),
        (b"[fe80::1%25eth0]", "zone id"),
        (b"[fe80::1%eth0]", "zone id"),
        (b"[v1.fe]", "invalid IPv6"),
        (b"[1.2.3.4]", "invalid IPv6"),
        (b"[::g]", "invalid IPv6"),
        (b"[]", "invalid IPv6"),
        (b"example.com..", "empty label"),
        (b".example.com", "empty label"),
        (b"a..b", "empty label"),
        (b"a%2e%2eb", "empty label"),
        (b".", "no name"),
        (b":80", "no name"),
        (b":", "no name"),
        (b"a.com%2F", "encoded slash"),
        (b"a.com%5c", "encoded slash"),
        (b"%00", "encoded slash"),
        (b"a.com%zz", "malformed"),
        (b"a.com%2", "malformed"),
        (b"a.com%40b.com", "delimiter or control"),
        (b"a.com%3A80", "delimiter or control"),
        (b"a%20b", "delimiter or control"),
        (b"a%0Db", "delimiter or control"),
    ],
)
def test_parse_authority_refuses(raw: bytes, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason) as caught:
        parse_authority(raw)
    assert "Host" in caught.value.message


def test_request_host() -> None:
    target = ("t.example", b"t.example:8080")
    assert request_host(None, [b"A.example.:81"], True) == ("a.example", b"A.example:81")
    assert request_host(None, [b"a.example  "], True) == ("a.example", b"a.example")  # trailing OWS
    assert request_host(None, [b""], True) == ("", b"")
    assert request_host(target, [b"ignored"], True) is target  # absolute-form replaces Host
    assert request_host(target, None, True) is target
    assert request_host(None, None, False) == ("", b"")  # HTTP/1.0 without a host
    with pytest.raises(BadRequest, match="more than one Host"):
        request_host(None, [b"a", b"a"], True)
    with pytest.raises(BadRequest, match="more than one Host"):
        request_host(target, [b"a", b"b"], True)
    with pytest.raises(BadRequest, match="Host"):
        request_host(target, [b"user@ignored"], True)  # invalid even though replaced
    with pytest.raises(BadRequest, match="no Host"):
        request_host(None, None, True)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("5m", 300.0), ("1h", 3600.0), ("1.5s", 1.5), ("1d", 86400.0), (0, 0.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["10", 10, "5 parsecs", "", True, None, "-1s"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"), [("512KB", 524288), ("8MB", 8388608), ("1GB", 1 << 30), (100, 100), ("7", 7)]
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["lots", "-1KB", -5, True, "1TB"])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_addresses() -> None:
    assert parse_address("127.0.0.1:8080") == HostPort("127.0.0.1", 8080)
    assert parse_address("[::1]:80") == HostPort("::1", 80)
    assert str(parse_address("[::1]:80")) == "[::1]:80"
    assert parse_address("api.internal:443") == HostPort("api.internal", 443)
    for bad in ("8080", "host:", ":80", "::1:80", "host:99999", "host:0", 42):
        with pytest.raises(ValueError):
            parse_address(bad)
