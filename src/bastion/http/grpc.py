"""gRPC semantics the gateway needs, whatever the transport: which requests are gRPC, what a
`grpc-timeout` means, and how a gateway error or an HTTP status becomes a `grpc-status`.

A gRPC client reads only `grpc-status` and `grpc-message`: an HTTP 403 with a JSON body is
an opaque failure to it (grpcio reports UNKNOWN or INTERNAL). So every answer the gateway
makes itself to a gRPC request is HTTP 200, `content-type: application/grpc`, with the status
in the head and no body: a "trailers-only" response (on HTTP/2 one HEADERS frame with
END_STREAM; on HTTP/1.1, for gRPC-Web, a head and an empty body). The mapping is in
docs/grpc.md; it follows gRPC's own HTTP-to-gRPC table where the contract does not fix it.
"""

from __future__ import annotations

import json

from bastion.errors import GatewayError
from bastion.http.model import Headers, Response

# Status codes (grpc/doc/statuscodes.md).
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
ALREADY_EXISTS = 6
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
ABORTED = 10
OUT_OF_RANGE = 11
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
DATA_LOSS = 15
UNAUTHENTICATED = 16

# Kinds of gRPC request, from the content-type.
NOT_GRPC = 0
GRPC = 1  # application/grpc[+proto|+json...]
GRPC_WEB = 2  # application/grpc-web[+proto]: binary frames, trailers in the body
GRPC_WEB_TEXT = 3  # application/grpc-web-text[+proto]: the same, base64

_PREFIX = b"application/grpc"


def grpc_kind(content_type: bytes | None) -> int:
    """Which kind of gRPC request a content-type announces (NOT_GRPC for anything else).

    `application/grpc` may carry a `+codec` suffix and parameters; `application/grpcx` is not
    gRPC."""
    if content_type is None or not content_type[:16].lower().startswith(_PREFIX):
        return NOT_GRPC
    rest = content_type[16:].split(b";", 1)[0].strip().lower()
    if not rest or rest[0:1] == b"+":
        return GRPC
    if rest.startswith(b"-web-text") and (len(rest) == 9 or rest[9:10] == b"+"):
        return GRPC_WEB_TEXT
    if rest.startswith(b"-web") and (len(rest) == 4 or rest[4:5] == b"+"):
        return GRPC_WEB
    return NOT_GRPC


# grpc-timeout: at most 8 ASCII digits and a unit (gRPC's PROTOCOL-HTTP2.md).
_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_timeout(value: bytes) -> float | None:
    """Seconds from a `grpc-timeout` value (`100m`, `5S`, `1H`); None when malformed."""
    if not 2 <= len(value) <= 9:
        return None
    unit = _UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit():
        return None
    return int(digits) * unit


def format_timeout(seconds: float) -> bytes:
    """A `grpc-timeout` value for `seconds`, in the finest unit that fits 8 digits."""
    for unit, scale in ((b"m", 1e-3), (b"S", 1.0), (b"M", 60.0), (b"H", 3600.0)):
        amount = int(seconds / scale + 0.999999)
        if amount < 100_000_000:
            return str(max(amount, 0)).encode() + unit
    return b"99999999H"


# HTTP status -> gRPC status: gRPC's table (doc/http-grpc-status-mapping.md) for statuses it
# names, except where the contract fixes the gateway's own: a rate limit (429) is
# RESOURCE_EXHAUSTED and a timeout (504) DEADLINE_EXCEEDED. Size limits (413, 431) are
# RESOURCE_EXHAUSTED, as gRPC reports an over-long message; 405 and 501 are UNIMPLEMENTED.
_FROM_HTTP = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    405: UNIMPLEMENTED,
    408: DEADLINE_EXCEEDED,
    413: RESOURCE_EXHAUSTED,
    414: RESOURCE_EXHAUSTED,
    417: INTERNAL,
    429: RESOURCE_EXHAUSTED,
    431: RESOURCE_EXHAUSTED,
    499: CANCELLED,
    500: INTERNAL,
    501: UNIMPLEMENTED,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}


def status_from_http(status: int) -> int:
    """The gRPC status for an HTTP status (UNKNOWN for those without a better one)."""
    return _FROM_HTTP.get(status, UNKNOWN)


# gRPC status -> HTTP status, for REST clients of transcoded calls (google.rpc.Code's mapping).
_TO_HTTP = {
    OK: 200,
    CANCELLED: 499,
    UNKNOWN: 500,
    INVALID_ARGUMENT: 400,
    DEADLINE_EXCEEDED: 504,
    NOT_FOUND: 404,
    ALREADY_EXISTS: 409,
    PERMISSION_DENIED: 403,
    RESOURCE_EXHAUSTED: 429,
    FAILED_PRECONDITION: 400,
    ABORTED: 409,
    OUT_OF_RANGE: 400,
    UNIMPLEMENTED: 501,
    INTERNAL: 500,
    UNAVAILABLE: 503,
    DATA_LOSS: 500,
    UNAUTHENTICATED: 401,
}

STATUS_WORDS = {
    OK: "ok",
    CANCELLED: "cancelled",
    UNKNOWN: "unknown",
    INVALID_ARGUMENT: "invalid_argument",
    DEADLINE_EXCEEDED: "deadline_exceeded",
    NOT_FOUND: "not_found",
    ALREADY_EXISTS: "already_exists",
    PERMISSION_DENIED: "permission_denied",
    RESOURCE_EXHAUSTED: "resource_exhausted",
    FAILED_PRECONDITION: "failed_precondition",
    ABORTED: "aborted",
    OUT_OF_RANGE: "out_of_range",
    UNIMPLEMENTED: "unimplemented",
    INTERNAL: "internal",
    UNAVAILABLE: "unavailable",
    DATA_LOSS: "data_loss",
    UNAUTHENTICATED: "unauthenticated",
}


def http_from_status(code: int) -> int:
    """The HTTP status a REST client gets for a gRPC status (500 for codes outside 0-16)."""
    return _TO_HTTP.get(code, 500)


# grpc-message is percent-encoded UTF-8: bytes outside 0x20-0x7E, and '%', are escaped.
_PLAIN = frozenset(range(0x20, 0x7F)) - {0x25}


def encode_message(message: str) -> bytes:
    data = message.encode("utf-8")
    if all(b in _PLAIN for b in data):
        return data
    return b"".join(bytes((b,)) if b in _PLAIN else b"%%%02X" % b for b in data)


def decode_message(value: bytes) -> str:
    """A grpc-message back to text; malformed escapes are kept as they are (as gRPC does)."""
    if b"%" not in value:
        return value.decode("utf-8", "replace")
    out = bytearray()
    i = 0
    while i < len(value):
        byte = value[i]
        if byte == 0x25 and i + 2 < len(value) and _is_hex(value[i + 1 : i + 3]):
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(byte)
            i += 1
    return out.decode("utf-8", "replace")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


def status_for_error(error: GatewayError) -> int:
    """A gateway error's gRPC status: an explicit `grpc_status` wins, else by HTTP status."""
    code = getattr(error, "grpc_status", None)
    return code if isinstance(code, int) else status_from_http(error.status)


_CONTENT_TYPES = {
    GRPC: b"application/grpc",
    GRPC_WEB: b"application/grpc-web+proto",
    GRPC_WEB_TEXT: b"application/grpc-web-text+proto",
}


def trailers_only(code: int, message: str, headers: list[tuple[bytes, bytes]], kind: int = GRPC) -> Response:
    """A trailers-only gRPC answer: 200, the content-type, grpc-status and grpc-message."""
    items = [item for item in headers if item[0] != b"content-type" and item[0] != b"content-length"]
    items += (
        (b"content-type", _CONTENT_TYPES.get(kind, b"application/grpc")),
        (b"grpc-status", b"%d" % code),
        (b"grpc-message", encode_message(message)),
    )
    return Response(200, Headers(items))


def render_grpc(error: GatewayError, kind: int = GRPC) -> tuple[Response, bytes]:
    """The gateway's own error on a gRPC request: trailers-only, no body.

    The error's extra headers (Retry-After, RateLimit-*, WWW-Authenticate) stay: gRPC clients
    see them as metadata."""
    return trailers_only(status_for_error(error), error.message, error.headers, kind), b""


class GrpcStatusError(GatewayError):
    """An error with a gRPC status of its own (a synthesized status for an upstream's non-200)."""

    def __init__(self, status: int, grpc_status: int, word: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.word = word
        self.grpc_status = grpc_status


def upstream_status_error(status: int) -> GrpcStatusError:
    """An upstream answered a gRPC call with a plain HTTP status: the status its client gets."""
    return GrpcStatusError(
        502, status_from_http(status), "upstream_http_status", f"The upstream answered HTTP {status}, not gRPC."
    )


def trailers_for(error: GatewayError) -> Headers:
    """The trailers that end a gRPC response the gateway had to cut short."""
    return Headers(
        [(b"grpc-status", b"%d" % status_for_error(error)), (b"grpc-message", encode_message(error.message))]
    )


def grpc_reply(response: Response, body: bytes, kind: int) -> tuple[Response, bytes]:
    """A plugin's error reply (401, 403, 429... with the contract's JSON) as a gRPC answer.

    The message is the JSON's `message`; the plugin's headers (WWW-Authenticate, Retry-After,
    RateLimit-*) stay, as metadata."""
    message = ""
    try:
        doc = json.loads(body) if body else None
        if isinstance(doc, dict) and isinstance(doc.get("message"), str):
            message = doc["message"]
    except ValueError:
        pass
    if not message:
        message = f"HTTP {response.status}"
    return trailers_only(status_from_http(response.status), message, response.headers.items, kind), b""
