"""Small pieces several plugins share: where a value comes from, header names, replies.

A source spec such as `header:X-Api-Key` or `query:apikey` is parsed once at build time into
a `Source` whose `read` is a couple of comparisons per request.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from bastion.http.model import Headers, Request

TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Names the gateway owns: a header plugin must not forge framing or identity.
PROTECTED_HEADERS = frozenset(
    (b"content-length", b"transfer-encoding", b"connection", b"host", b"x-consumer", b"upgrade", b"te", b"trailer")
)


def header_name(name: str) -> bytes:
    """Validate a header name from the config; the lower-case bytes the hot path compares."""
    if not TOKEN.match(name):
        raise ValueError(f"not a header name: {name!r}")
    return name.lower().encode("ascii")


def header_value(value: str) -> bytes:
    """Validate a header value from the config (no line breaks: no response splitting)."""
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError("a header value cannot contain CR, LF or NUL")
    return value.strip().encode("latin-1")


def query_param(query: str, name: str) -> bytes | None:
    """The first value of `name` in a raw query string, percent-decoded; None if absent."""
    if not query:
        return None
    for part in query.split("&"):
        key, sep, value = part.partition("=")
        if _decode(key) == name:
            return unquote_to_bytes(value.replace("+", " ")) if sep else b""
    return None


def without_query_param(query: str, name: str) -> str:
    """The query string with every `name` parameter removed (the rest kept byte for byte)."""
    return "&".join(part for part in query.split("&") if part and _decode(part.partition("=")[0]) != name)


def _decode(raw: str) -> str:
    return unquote_to_bytes(raw.replace("+", " ")).decode("utf-8", "replace") if "%" in raw or "+" in raw else raw


class Source:
    """Where a credential or key comes from: `header:NAME`, `query:NAME` or `cookie:NAME`."""

    __slots__ = ("kind", "name", "raw_name", "spec")

    KINDS = ("header", "query", "cookie")

    def __init__(self, spec: str, kinds: tuple[str, ...] = KINDS) -> None:
        kind, sep, name = spec.partition(":")
        if kind not in kinds or not sep or not name:
            raise ValueError(f"{spec!r}: use " + " or ".join(f"{k}:NAME" for k in kinds))
        if kind in ("header", "cookie") and not TOKEN.match(name):
            raise ValueError(f"{spec!r}: not a valid {kind} name")
        self.spec = spec
        self.kind = kind
        self.name = name
        self.raw_name = name.lower().encode("ascii") if kind == "header" else name.encode("latin-1")

    def read(self, request: Request) -> bytes | None:
        if self.kind == "header":
            return request.headers.get_raw(self.raw_name)
        if self.kind == "query":
            return query_param(request.query, self.name)
        return cookie(request.headers, self.raw_name)

    def remove(self, request: Request) -> None:
        """Take the value out of the request before it goes upstream (hide_credentials)."""
        if self.kind == "header":
            request.headers.remove(self.raw_name)
        elif self.kind == "query":
            request.query = without_query_param(request.query, self.name)
        else:
            remove_cookie(request.headers, self.raw_name)


def cookie(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers.items:
        if key == b"cookie":
            for pair in value.split(b";"):
                k, sep, v = pair.strip().partition(b"=")
                if sep and k == name:
                    return v.strip(b'"')
    return None


def remove_cookie(headers: Headers, name: bytes) -> None:
    items = []
    for key, value in headers.items:
        if key == b"cookie":
            kept = [p for p in (p.strip() for p in value.split(b";")) if p and p.partition(b"=")[0] != name]
            if not kept:
                continue
            value = b"; ".join(kept)
        items.append((key, value))
    headers.items = items


def check_sources(value: list[str]) -> list[str]:
    """Validator for a plugin's `in:` list: every entry must parse as a Source."""
    for spec in value:
        Source(spec)
    return value


def quoted(value: str) -> str:
    """A quoted-string for an auth-param (realm="...")."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
