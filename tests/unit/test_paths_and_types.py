"""Path normalisation and the typed config scalars, without sockets."""

from __future__ import annotations

import pytest

from bastion.config.types import HostPort, parse_address, parse_duration, parse_size
from bastion.errors import BadRequest
from bastion.http.paths import normalize_path, split_target


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
    ],
)
def test_normalize_path(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize("raw", ["/a%2fb", "/a%2Fb", "/a%5cb", "/a%00", "/a%zz", "/a%2", "/a%"])
def test_normalize_path_refuses_ambiguous_encodings(raw: str) -> None:
    with pytest.raises(BadRequest):
        normalize_path(raw)


def test_split_target_forms() -> None:
    assert split_target(b"/a?x=1&y=%2F") == ("/a", "x=1&y=%2F", None)
    assert split_target(b"*") == ("*", "", None)
    assert split_target(b"http://user@Host:81/p/../q?z") == ("/q", "z", "Host:81")
    assert split_target(b"https://h") == ("/", "", "h")
    with pytest.raises(BadRequest):
        split_target(b"ftp://h/x")
    with pytest.raises(BadRequest):
        split_target(b"relative/path")


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
