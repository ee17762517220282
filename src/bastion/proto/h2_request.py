"""An HTTP/2 request head -> the same `Request` H1Server builds, with RFC 9113 section 8's rules.

h2's own header validation is off (it would make every malformed request a connection
error): the rules are checked here, in one pass over the fields. Pseudo-header fields come
first, once each, and only the four of a request (`:protocol` included: extended CONNECT is
not offered); names are lower-case tokens; values hold no NUL, CR or LF and no whitespace at
either end; connection-specific fields are refused and `te` may only be `trailers` (kept:
gRPC needs it upstream). `:method` is a token and `:path` visible ASCII: both are written
into an HTTP/1.1 request line upstream, where a space, CR or LF would let the client write
its own request. `:authority` is the host, validated like `Host`; cookies are joined
for HTTP/1.1 upstreams.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from bastion.config.schema import Listener
from bastion.errors import BadRequest, GatewayError, HeadersTooLarge, URITooLong
from bastion.http.header_policy import is_dropped
from bastion.http.model import HeaderList, Headers, Request
from bastion.http.paths import Authority, parse_authority, parse_target, request_host
from bastion.proto.h1 import new_request_id

CONNECTION_SPECIFIC = frozenset((b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"))
_VALID_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_VALID_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a token (RFC 9110 section 9.1)
_VALID_PATH = re.compile(rb"[\x21-\x7e]+")  # no space, control or non-ASCII byte (RFC 3986)
_METHODS = frozenset((b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"))
_GOOD_NAMES: set[bytes] = set()  # names already checked (a client repeats the same few)
_WS = b" \t"
_AUTHORITIES: dict[bytes, Authority] = {}  # :authority -> parsed (clients repeat a few)
# :path -> (normalised path, query): clients repeat the same short targets; bounded, and only
# targets that parsed (a refused one raises every time).
_TARGETS: dict[bytes, tuple[str, str]] = {}
_TARGETS_SIZE = 1024
_TARGET_CACHED_LENGTH = 256
_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:+/=-]{1,128}$")


class Malformed(Exception):
    """RFC 9113 section 8.1.1: a malformed request is a stream error PROTOCOL_ERROR."""


class NotImplementedMethod(GatewayError):
    status, word, message = 501, "not_implemented", "CONNECT is not supported over HTTP/2 here."


class Client(NamedTuple):
    """What the connection knows of its client, copied to each request."""

    ip: str
    port: int
    scheme: str
    cert: bytes | None


def build_request(fields: HeaderList, drop: frozenset[bytes], listener: Listener, client: Client) -> Request:
    """The `Request` of a stream's head. Raises Malformed (RFC 9113 section 8: reset the
    stream) or a GatewayError (answered like HTTP/1.1: 400, 414, 431, 501)."""
    method = path = scheme = authority = None
    headers: HeaderList = []
    hosts: list[bytes] | None = None
    cookies: list[bytes] | None = None
    length: bytes | None = None
    request_id: bytes | None = None
    regular = False
    keep_underscores = listener.underscores_in_headers
    for name, value in fields:
        if name[:1] == b":":
            if regular:
                raise Malformed()  # pseudo-header fields come first
            if name == b":method" and method is None:
                method = value
            elif name == b":path" and path is None:
                path = value
            elif name == b":scheme" and scheme is None:
                scheme = value
            elif name == b":authority" and authority is None:
                authority = value
            else:
                raise Malformed()  # repeated or unknown (:protocol: extended CONNECT is not offered)
            continue
        regular = True
        if name not in _GOOD_NAMES:
            if not _VALID_NAME.fullmatch(name):
                raise Malformed()  # upper case, or a byte no field name may hold
            if len(_GOOD_NAMES) < 2048:
                _GOOD_NAMES.add(name)
        if value and (b"\r" in value or b"\n" in value or b"\0" in value or value[0] in _WS or value[-1] in _WS):
            raise Malformed()  # RFC 9113 section 8.2.1
        if name in CONNECTION_SPECIFIC:
            raise Malformed()
        if name == b"te":
            if value != b"trailers":
                raise Malformed()
            headers.append((name, value))  # gRPC needs it upstream
            continue
        if name == b"cookie":
            if cookies is None:
                cookies = [value]
            else:
                cookies.append(value)
            continue
        if name == b"host":
            if hosts is None:
                hosts = [value]
            else:
                hosts.append(value)
        elif name == b"content-length":
            if length is not None and value != length:
                raise Malformed()
            length = value
        elif name == b"x-request-id":
            request_id = value
        if keep_underscores:
            if is_dropped(name, drop):
                continue
        elif name in drop or b"_" in name:
            continue
        headers.append((name, value))
    if method is None or (method not in _METHODS and not _VALID_METHOD.fullmatch(method)):
        raise Malformed()
    if method == b"CONNECT":
        raise NotImplementedMethod()
    if not path or scheme is None or not _VALID_PATH.fullmatch(path):
        raise Malformed()
    if len(headers) > listener.limits.max_headers:
        raise HeadersTooLarge()
    if len(path) > listener.limits.max_uri_bytes:
        raise URITooLong()
    if path[:1] != b"/" and path != b"*":
        raise Malformed()
    text_method = method.decode("ascii", "replace")
    cached = _TARGETS.get(path)
    if cached is None:
        route_path, query, _ = parse_target(path)
        if len(path) <= _TARGET_CACHED_LENGTH:
            if len(_TARGETS) >= _TARGETS_SIZE:
                _TARGETS.clear()
            _TARGETS[path] = (route_path, query)
    else:
        route_path, query = cached
    if route_path == "*" and text_method != "OPTIONS":
        raise BadRequest("The request target * is only valid for OPTIONS.")
    target = None
    if authority is not None:
        if not authority:
            raise Malformed()  # RFC 9113 section 8.3.1: never empty for http and https
        target = _AUTHORITIES.get(authority)
        if target is None:
            target = parse_authority(authority)  # raises BadRequest: never cached
            if len(_AUTHORITIES) >= 1024:
                _AUTHORITIES.clear()
            _AUTHORITIES[authority] = target
    host, forward = request_host(target, hosts, True)
    if target is not None or (hosts is not None and forward != hosts[0]):
        headers = [item for item in headers if item[0] != b"host"]
        headers.append((b"host", forward))
    if cookies is not None:
        headers.append((b"cookie", b"; ".join(cookies)))  # RFC 9113 section 8.2.3, for HTTP/1.1
    request = Request(text_method, route_path, query, Headers(headers), "2", host, client.ip, client.port)
    request.scheme = client.scheme
    request.client_cert = client.cert
    if length is not None:
        if not length.isdigit():
            raise Malformed()
        request.content_length = int(length)
    if request_id is not None and _VALID_REQUEST_ID.match(request_id):
        request.request_id = request_id.decode("ascii")
    else:
        request.request_id = new_request_id()
    return request


def trailer_fields(fields: HeaderList, drop: frozenset[bytes]) -> HeaderList:
    """The request trailers that cross (same rules as a head's regular fields). Raises Malformed."""
    items: HeaderList = []
    for name, value in fields:
        if name[:1] == b":" or name in CONNECTION_SPECIFIC or not _VALID_NAME.fullmatch(name):
            raise Malformed()
        if value and (b"\r" in value or b"\n" in value or b"\0" in value or value[0] in _WS or value[-1] in _WS):
            raise Malformed()  # written into a chunked body's trailer section upstream: CR LF would end it
        if not is_dropped(name, drop):
            items.append((name, value))
    return items
