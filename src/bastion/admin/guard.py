"""Requests a web page in someone's browser could make to the admin API, refused.

The admin listener is plain HTTP, usually on loopback without a token, and a browser on the
same machine can reach it. Two attacks go through that browser:

- **DNS rebinding**: a page from `evil.example` makes its own name resolve to 127.0.0.1,
  and its script, now same-origin with the admin API in the browser's eyes, reads
  `/config` and posts `/reload`. The request's `Host` still names `evil.example`, so only
  names that are this listener's own are accepted: the bind's host, and for a loopback
  bind `localhost`, `127.0.0.1` and `::1` too. A wildcard bind (`0.0.0.0`, `::`) answers
  under every name the machine has, so it cannot check names; it always has a token, which
  a rebinding page cannot know.
- **Cross-site requests (CSRF)**: any page can make the browser send a POST (a form, or
  `fetch` with `mode: "no-cors"`) without reading the answer, and drain a target that way.
  A browser names the page's origin in `Origin` on every POST, so a POST whose `Origin` is
  not this listener's own (`http://` + its `Host`) is refused. Clients that are not
  browsers (curl, scripts, Prometheus) send no `Origin` and are not affected.

Both answer 403 in the contract's JSON error shape, before the token is looked at.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from bastion.admin.http import AdminRequest, AdminResponse, error_response
from bastion.config.schema import is_loopback
from bastion.config.types import HostPort

LOOPBACK_NAMES = frozenset(("localhost", "127.0.0.1", "::1"))
"""Names a loopback listener is reached by, whatever loopback address it is bound to."""

SAFE_METHODS = frozenset(("GET", "HEAD"))
"""Methods that change nothing, so a cross-site request with them does no harm (and the
browser does not let the other site read the answer)."""


def allowed_hosts(bind: HostPort) -> frozenset[str] | None:
    """The host names a request may carry in `Host` for a listener on `bind` (lower case, no
    port); None when any is fine (a wildcard bind)."""
    host = _normal(bind.host)
    try:
        if ipaddress.ip_address(host).is_unspecified:
            return None
    except ValueError:
        pass  # a name
    if is_loopback(host):
        return LOOPBACK_NAMES | {host}
    return frozenset((host,))


def refuse(request: AdminRequest, bind: HostPort) -> AdminResponse | None:
    """A 403 for a request from a rebinding page or another site, else None."""
    authority = request.headers.get("host")
    own = _split(authority) if authority is not None else (_normal(bind.host), bind.port)
    allowed = allowed_hosts(bind)
    if authority is not None and allowed is not None and (own is None or own[0] not in allowed):
        shown = allowed_text(allowed)
        return error_response(
            403,
            "host_forbidden",
            f"This admin API answers to {shown} only, not Host {authority[:100]!r} (DNS rebinding protection).",
            request.request_id,
        )
    origin = request.headers.get("origin")
    if origin is not None and request.method not in SAFE_METHODS and not _same_origin(origin, own):
        return error_response(
            403,
            "origin_forbidden",
            f"A {request.method} from another site ({origin[:100]}) is refused (cross-site request protection).",
            request.request_id,
        )
    return None


def allowed_text(allowed: frozenset[str]) -> str:
    return ", ".join(sorted(f"[{h}]" if ":" in h else h for h in allowed))


def _normal(host: str) -> str:
    return host.lower().rstrip(".")


def _split(authority: str) -> tuple[str, int] | None:
    """`Host` -> (lower-case host without brackets or trailing dot, port); None when malformed."""
    text = authority.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        host, _, port = text.partition(":")
        if ":" in port:
            return None  # a bare IPv6 address, or garbage
    if not host or (port and not port.isdigit()):
        return None
    return _normal(host), int(port) if port else 80


def _same_origin(origin: str, own: tuple[str, int] | None) -> bool:
    """`Origin` names this listener: http, the same host and port as the request's `Host`."""
    if own is None:
        return False
    try:
        parts = urlsplit(origin.strip())
        port = parts.port or 80
    except ValueError:
        return False  # "null", or not a URL
    host = parts.hostname
    return parts.scheme == "http" and host is not None and (_normal(host), port) == own
