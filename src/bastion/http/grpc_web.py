"""gRPC-Web on a route with `grpc_web: true`: browsers in, plain gRPC to the upstream.

A browser cannot read HTTP/2 trailers, so gRPC-Web moves them into the body: the response's
messages are relayed as they come, and the upstream's trailers follow as one last frame
(flag 0x80, then `name: value\\r\\n` lines). The text form (`application/grpc-web-text`)
base64-encodes the whole body both ways, for clients that cannot handle binary bodies.

- Request: the content-type becomes `application/grpc` (its `+proto` suffix kept); a text body
  is decoded as it streams (`Base64Decoder`: a chunk may end inside a 4-character group, and a
  client may pad each of its chunks).
- Response (`GrpcWebDownstream`): the content-type becomes the gRPC-Web one; each body chunk
  of the text form is encoded on its own, padded, as Envoy does, so a message is never held
  back waiting for the next one; a trailers-only response stays a head.
- CORS: without a `cors` plugin on the route, the gateway answers preflights itself (any
  origin, the gRPC-Web request headers) and lets scripts read `grpc-status` and
  `grpc-message`. With one, the plugin decides; the gateway only adds those two names to the
  `Access-Control-Expose-Headers` of responses the plugin allowed.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence

from bastion.errors import BadRequest
from bastion.http.grpc import GRPC, GRPC_WEB_TEXT, grpc_kind
from bastion.http.model import HeaderList, Headers, Request, Response
from bastion.http.streams import BodyFilter, Downstream, DownstreamListener
from bastion.http.wrap import DownstreamWrapper

# routes[].grpc_web as the exchange reads it (RouteRuntime.grpc_web).
OFF = 0
OWN_CORS = 1  # the gateway answers preflights and exposes grpc-status itself
PLUGIN_CORS = 2  # the route's cors plugin decides

TRAILER_FLAG = 0x80
_ACAO = b"access-control-allow-origin"
_ACEH = b"access-control-expose-headers"
_EXPOSE = b"grpc-status, grpc-message"
_ALLOW_HEADERS = (
    b"content-type, x-grpc-web, x-user-agent, grpc-timeout, authorization, x-api-key, "
    b"x-accept-content-transfer-encoding, x-accept-response-streaming"
)
_CONTENT_TYPE = {False: b"application/grpc-web+proto", True: b"application/grpc-web-text+proto"}


class Base64Decoder:
    """A `BodyFilter`: base64 text in, bytes out, across chunk boundaries."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> bytes:
        buf = self._rest + data if self._rest else data
        if b"\r" in buf or b"\n" in buf or b" " in buf:
            buf = b"".join(buf.split())
        usable = len(buf) - len(buf) % 4
        self._rest = buf[usable:]
        return _decode_quads(buf[:usable])

    def end(self) -> bytes:
        if self._rest:
            raise BadRequest("The gRPC-Web text body ends inside a base64 group.")
        return b""


def _decode_quads(text: bytes) -> bytes:
    """Whole 4-character groups to bytes; padding may close any group (each chunk padded)."""
    try:
        eq = text.find(b"=")
        if eq < 0:
            return binascii.a2b_base64(text, strict_mode=True)
        out = []
        start = 0
        while start < len(text):
            eq = text.find(b"=", start)
            end = len(text) if eq < 0 else (eq // 4 + 1) * 4
            out.append(binascii.a2b_base64(text[start:end], strict_mode=True))
            start = end
        return b"".join(out)
    except binascii.Error as exc:
        raise BadRequest(f"The gRPC-Web text body is not base64: {exc}.") from None


def trailer_frame(trailers: HeaderList) -> bytes:
    """The gRPC-Web trailer frame: 0x80, a 4-byte length, `name: value\\r\\n` lines."""
    block = b"".join(b"%s: %s\r\n" % (name.lower(), value) for name, value in trailers)
    return bytes((TRAILER_FLAG,)) + len(block).to_bytes(4, "big") + block


def prepare_request(request: Request, kind: int) -> None:
    """The upstream gets plain gRPC: content-type application/grpc (+codec kept)."""
    headers = request.headers
    value = headers.get_raw(b"content-type") or b""
    suffix = value.split(b";", 1)[0].strip().lower().partition(b"+")[2]
    headers.set(b"content-type", b"application/grpc+" + suffix if suffix else b"application/grpc")
    if kind == GRPC_WEB_TEXT:
        request.content_length = None  # decoded, the body is shorter


def preflight(request: Request) -> Response | None:
    """The gateway's answer to a CORS preflight on a gRPC-Web route without a cors plugin."""
    headers = request.headers
    if headers.get_raw(b"origin") is None or headers.get_raw(b"access-control-request-method") is None:
        return None
    requested = headers.get_raw(b"access-control-request-headers")
    allow = _ALLOW_HEADERS + b", " + requested if requested else _ALLOW_HEADERS
    return Response(
        204,
        Headers(
            [
                (_ACAO, b"*"),
                (b"access-control-allow-methods", b"POST, OPTIONS"),
                (b"access-control-allow-headers", allow),
                (_ACEH, _EXPOSE),
                (b"access-control-max-age", b"86400"),
            ]
        ),
    )


class GrpcWeb:
    """The `Transcoder` of one gRPC-Web call."""

    __slots__ = ("text", "cors", "origin")

    def __init__(self, request: Request, kind: int, cors: int) -> None:
        self.text = kind == GRPC_WEB_TEXT
        self.cors = cors
        self.origin = request.headers.get_raw(b"origin") is not None
        prepare_request(request, kind)

    def request_filter(self) -> BodyFilter | None:
        return Base64Decoder() if self.text else None

    def wrap(self, downstream: Downstream, listener: DownstreamListener) -> Downstream:
        return GrpcWebDownstream(downstream, self.text, self.cors if self.origin else OFF)


class GrpcWebDownstream(DownstreamWrapper):
    """The client's Downstream, speaking gRPC-Web: trailers become the body's last frame."""

    def __init__(self, inner: Downstream, text: bool, cors: int) -> None:
        super().__init__(inner)
        self.text = text
        self.cors = cors
        self.active = False  # the response is gRPC from the upstream (else passed through)

    def send_head(
        self, response: Response, length: int | None, body: Sequence[bytes], end_stream: bool, close: bool
    ) -> None:
        headers = response.headers
        if grpc_kind(headers.get_raw(b"content-type")) == GRPC:
            headers.set(b"content-type", _CONTENT_TYPE[self.text])
            if not end_stream or body:
                self.active = True
                if self.text:
                    body = [binascii.b2a_base64(chunk, newline=False) for chunk in body if chunk]
                length = sum(map(len, body)) if end_stream else None
        if self.cors:
            self._cors(headers)
        self.inner.send_head(response, length, body, end_stream, close)

    def _cors(self, headers: Headers) -> None:
        if self.cors == OWN_CORS:
            if headers.get_raw(_ACAO) is None:
                headers.add(_ACAO, b"*")
        elif headers.get_raw(_ACAO) is None:
            return  # the cors plugin did not allow this origin
        exposed = headers.get_raw(_ACEH)
        if exposed is None:
            headers.add(_ACEH, _EXPOSE)
        elif b"grpc-status" not in exposed.lower():
            headers.set(_ACEH, exposed + b", " + _EXPOSE)

    def send_data(self, data: bytes) -> None:
        if self.active and self.text:
            data = binascii.b2a_base64(data, newline=False)
        self.inner.send_data(data)

    def send_end(self, trailers: Headers | None) -> None:
        if not self.active:
            self.inner.send_end(trailers)
            return
        if trailers:
            self.send_data(trailer_frame(trailers.items))
        self.inner.send_end(None)
