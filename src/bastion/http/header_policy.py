"""Which header fields cross the gateway, in one place for every protocol.

Three kinds of names never pass from one side to the other as they arrived:

- hop-by-hop fields (RFC 9110 section 7.6.1) and every name a `Connection` field lists,
  except the ones the gateway itself needs (`Host`): a client must not be able to make the
  gateway drop them;
- fields the gateway sets itself toward the upstream (`X-Forwarded-*`, `X-Real-IP`,
  `X-Request-Id`) and identity fields set by authentication (`X-Consumer`, every
  `forward_claims` name of every route): a client-sent copy is removed on every route, so an
  origin can trust them whichever route a request took;
- `Forwarded` (RFC 7239): the gateway does not write it, so a client's copy is removed rather
  than passed on as if the gateway had vouched for it.

Field names with an underscore are dropped from requests by default (as nginx does): CGI and
WSGI servers read `X_Consumer` as `X-Consumer`, which would walk around the identity rule.
"""

from __future__ import annotations

from collections.abc import Iterable

from bastion.http.model import HeaderList, Request

# RFC 9110 section 7.6.1: connection-specific fields never forwarded. Content-Length and
# Transfer-Encoding are dropped too: the gateway frames each hop itself.
HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"proxy-authenticate",
    )
)

# Set by the gateway toward the upstream; a client-sent copy never passes.
GATEWAY_REQUEST_HEADERS = frozenset(
    (b"expect", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id", b"x-real-ip", b"forwarded")
)

# Always owned by authentication, whatever the config says.
IDENTITY_HEADERS = frozenset((b"x-consumer",))

# Names a `Connection` field may not remove: the gateway needs them to route and forward.
CONNECTION_PROTECTED = frozenset((b"host",))

# Response fields the gateway sets itself toward the client.
DROP_RESPONSE = HOP_BY_HOP | frozenset((b"x-request-id",))

# `Connection` values that name no other field, as senders usually spell them (checked without
# lower-casing on the hot path; other spellings take the general path, with the same result).
PLAIN_CONNECTION = frozenset((b"keep-alive", b"close", b"Keep-Alive", b"Close"))

# The largest response head (or trailer block) taken from an upstream, counted as HTTP/2
# counts a header list (name + value + 32 per field, RFC 7541 section 4.1): HTTP/2 clients
# take 64 KB by default (h2, nghttp2, browsers) and end the whole connection past it, so a
# head is held to that, less room for the fields the gateway adds. Without a limit a hostile
# upstream also grows a head without end.
MAX_RESPONSE_HEAD = 60 * 1024


def request_drop_set(identity: Iterable[bytes] = ()) -> frozenset[bytes]:
    """Every request field name removed before routing, given the config's identity names."""
    return HOP_BY_HOP | GATEWAY_REQUEST_HEADERS | IDENTITY_HEADERS | frozenset(identity)


def connection_tokens(values: list[bytes]) -> set[bytes]:
    """Lower-case field names listed in Connection headers."""
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def with_connection_tokens(drop: frozenset[bytes], connection: list[bytes]) -> frozenset[bytes]:
    """`drop` plus the names `Connection` lists, except the protected ones.

    `Connection: keep-alive` or `close` alone (the common case) names no field: no new set."""
    if len(connection) == 1 and connection[0] in PLAIN_CONNECTION:
        return drop
    return drop | (connection_tokens(connection) - CONNECTION_PROTECTED)


def is_dropped(name: bytes, drop: frozenset[bytes]) -> bool:
    """Whether a request field goes, counting `x_consumer` as `x-consumer` (CGI reads it so)."""
    return name in drop or (b"_" in name and name.replace(b"_", b"-") in drop)


_VIA = b"1.1 bastion"


def forwarded_headers(request: Request, target_host: bytes, preserve_host: bool) -> HeaderList:
    """The request's fields toward the upstream: the client's (already filtered), then the
    gateway's own. Host is the client's with `preserve_host`, else the target's; a request
    without one (HTTP/1.0 may omit it) gets the target's, since the upstream hop is HTTP/1.1."""
    items: HeaderList = []
    forwarded_for = None
    via = None
    client_host = None
    for item in request.headers.items:
        name = item[0]
        if name == b"x-forwarded-for":
            forwarded_for = item[1] if forwarded_for is None else forwarded_for + b", " + item[1]
        elif name == b"via":
            via = item[1] if via is None else via + b", " + item[1]
        elif name == b"host":
            client_host = item[1]
            if preserve_host:
                items.append(item)
        else:
            items.append(item)
    client = request.client_ip.encode()
    items.append((b"x-forwarded-for", client if forwarded_for is None else forwarded_for + b", " + client))
    items.append((b"via", _VIA if via is None else via + b", " + _VIA))
    if not preserve_host or client_host is None:
        items.append((b"host", target_host))
    if client_host:
        items.append((b"x-forwarded-host", client_host))
    items.append((b"x-real-ip", client))
    items.append((b"x-forwarded-proto", b"https" if request.scheme == "https" else b"http"))
    items.append((b"x-request-id", request.request_id.encode()))
    return items


def gateway_response_headers(request_id: str) -> HeaderList:
    """Fields the gateway adds to every response toward the client."""
    return [(b"x-request-id", request_id.encode()), (b"via", _VIA)]
