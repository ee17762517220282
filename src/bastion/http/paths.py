"""Request-target normalisation: one path for routing and for forwarding.

The path a route matched on is the path the upstream receives, so a request cannot route as
one path and be served as another. Normalisation (RFC 3986 section 6.2.2): percent-encoded
unreserved characters are decoded (`/%61dmin` is `/admin`), hex digits upper-cased,
dot-segments removed, repeated slashes merged. Encoded slashes and backslashes (`%2F`,
`%5C`) and NUL are refused: upstreams disagree on whether they separate segments, which is
exactly the ambiguity a path-based bypass needs.
"""

from __future__ import annotations

from bastion.errors import BadRequest

_HEX = "0123456789ABCDEFabcdef"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_REFUSED = frozenset(("2F", "5C", "00"))


def _decode_unreserved(path: str) -> str:
    out: list[str] = []
    i = 0
    n = len(path)
    while i < n:
        ch = path[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        code = path[i + 1 : i + 3]
        if len(code) != 2 or code[0] not in _HEX or code[1] not in _HEX:
            raise BadRequest("The request path has a malformed percent-encoding.")
        code = code.upper()
        if code in _REFUSED:
            raise BadRequest("The request path has an encoded slash, backslash or NUL.")
        char = chr(int(code, 16))
        out.append(char if char in _UNRESERVED else "%" + code)
        i += 3
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    output: list[str] = []
    segments = path.split("/")
    for segment in segments[1:]:
        if segment == "..":
            if output:
                output.pop()
        elif segment != ".":
            output.append(segment)
    trailing = segments[-1] in (".", "..")
    result = "/" + "/".join(output)
    if trailing and not result.endswith("/"):
        result += "/"
    return result


def normalize_path(raw: str) -> str:
    """The canonical form of an origin-form path (no query). Raises BadRequest."""
    if "%" in raw:
        raw = _decode_unreserved(raw)
    if "//" in raw:
        while "//" in raw:
            raw = raw.replace("//", "/")
    if "/." in raw:
        raw = _remove_dot_segments(raw)
    return raw


def split_target(target: bytes) -> tuple[str, str, str | None]:
    """Split a request-target into (normalised path, raw query, authority). Raises BadRequest.

    Accepts origin-form (`/a?b`), `*` (for OPTIONS) and absolute-form (`http://host/a?b`),
    whose authority replaces the Host header, as RFC 9112 section 3.2.2 asks of a proxy.
    """
    text = target.decode("latin-1")
    authority = None
    if not text.startswith("/"):
        if text == "*":
            return "*", "", None
        scheme, sep, rest = text.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            raise BadRequest("The request target is not a path or an absolute http URL.")
        slash = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority = rest[:slash].rpartition("@")[2]
        text = rest[slash:] or "/"
        if not text.startswith("/"):
            text = "/" + text
    path, _, query = text.partition("?")
    path = path.partition("#")[0]
    return normalize_path(path), query, authority
