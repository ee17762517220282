"""Small pieces several plugins share: where a value comes from, header names, replies.

A source spec such as `header:X-Api-Key` or `query:apikey` is parsed once at build time into
a `Source` whose `read` is one pass over the header list (or the query) per request; a
`Sources` reads all of a plugin's sources and refuses a credential given twice.
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


class Ambiguous:
    """The type of AMBIGUOUS: a request that carries a credential more than once."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "AMBIGUOUS"


# Two values where one is expected: the gateway could check one while the upstream reads the
# other, so the authentication plugins refuse such a request instead of picking one.
AMBIGUOUS = Ambiguous()


def query_param(query: str, name: str) -> bytes | Ambiguous | None:
    """The value of `name` in a raw query string, percent-decoded; None if absent, AMBIGUOUS
    if the parameter occurs more than once (however each occurrence is encoded)."""
    if not query:
        return None
    found: bytes | None = None
    for part in query.split("&"):
        key, sep, value = part.partition("=")
        if _decode(key) == name:
            if found is not None:
                return AMBIGUOUS
            found = unquote_to_bytes(value.replace("+", " ")) if sep else b""
    return found


def without_query_param(query: str, name: str) -> str:
    """The query string with every `name` parameter removed (the rest kept byte for byte)."""
    return "&".join(part for part in query.split("&") if part and _decode(part.partition("=")[0]) != name)


def _decode(raw: str) -> str:
    return unquote_to_bytes(raw.replace("+", " ")).decode("utf-8", "replace") if "%" in raw or "+" in raw else raw


class Source:
    """Where a credential or key comes from: `header:NAME`, `query:NAME` or `cookie:NAME`.

    `scheme` (such as b"bearer ") applies to `header:Authorization` only: the field holds this
    plugin's credential only when it uses that scheme, and `read` cuts the scheme off.
    """

    __slots__ = ("kind", "name", "raw_name", "spec", "scheme")

    KINDS = ("header", "query", "cookie")

    def __init__(self, spec: str, kinds: tuple[str, ...] = KINDS, scheme: bytes | None = None) -> None:
        kind, sep, name = spec.partition(":")
        if kind not in kinds or not sep or not name:
            raise ValueError(f"{spec!r}: use " + " or ".join(f"{k}:NAME" for k in kinds))
        if kind in ("header", "cookie") and not TOKEN.match(name):
            raise ValueError(f"{spec!r}: not a valid {kind} name")
        self.spec = spec
        self.kind = kind
        self.name = name
        self.raw_name = name.lower().encode("ascii") if kind == "header" else name.encode("latin-1")
        authorization = kind == "header" and self.raw_name == b"authorization"
        self.scheme = scheme.lower() if scheme is not None and authorization else None

    def read(self, request: Request) -> bytes | Ambiguous | None:
        """The one value here; None when absent, AMBIGUOUS when there are several (two header
        fields of the name, whatever their scheme; a repeated parameter or cookie). A
        comma-joined header value is one value."""
        if self.kind == "header":
            found = None
            for key, value in request.headers.items:  # the whole list: a second field must be seen
                if key == self.raw_name:
                    if found is not None:
                        return AMBIGUOUS
                    found = value
            scheme = self.scheme
            if found is None or scheme is None:
                return found
            if found[: len(scheme)].lower() != scheme:
                return None  # another scheme: not this plugin's credential
            return found[len(scheme) :].strip()
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


class Sources:
    """All the places one plugin takes its credential from, read together.

    A request must carry the credential once: a second value, in the same place or in
    another configured one, makes it AMBIGUOUS. Repeats within a place count empty or not;
    a place whose single value is empty holds no credential.
    """

    __slots__ = ("all", "described")

    def __init__(self, specs: list[str], scheme: bytes | None = None) -> None:
        self.all = tuple(Source(spec, scheme=scheme) for spec in specs)
        self.described = " or ".join(source.spec for source in self.all)

    def read(self, request: Request) -> bytes | Ambiguous | None:
        """The credential; None when no source has a non-empty value."""
        found = None
        for source in self.all:
            value = source.read(request)
            if isinstance(value, Ambiguous):
                return value
            if value:
                if found is not None:
                    return AMBIGUOUS
                found = value
        return found

    def remove(self, request: Request) -> None:
        """Take the credential out before the request goes upstream (hide_credentials): from
        the one place that holds it. The others keep what they carry (an Authorization field
        of another scheme is some other plugin's credential)."""
        for source in self.all:
            if source.read(request):
                source.remove(request)


def cookie(headers: Headers, name: bytes) -> bytes | Ambiguous | None:
    """The value of cookie `name` across all Cookie fields; AMBIGUOUS when it is set twice."""
    found = None
    for key, value in headers.items:
        if key == b"cookie":
            for pair in value.split(b";"):
                k, sep, v = pair.strip().partition(b"=")
                if sep and k == name:
                    if found is not None:
                        return AMBIGUOUS
                    found = v.strip(b'"')
    return found


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
