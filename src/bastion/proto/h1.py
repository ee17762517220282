"""HTTP/1.1 on the client side: framing, limits, timeouts, keep-alive and pipelining.

httptools (llhttp, strict mode) parses; llhttp already refuses the classic smuggling shapes
(Content-Length with Transfer-Encoding, conflicting or malformed Content-Length, a
Transfer-Encoding that does not end in chunked). This layer adds the limits (URI 414,
headers 431, counted on raw bytes so a header that never ends is caught too), Host checks,
hop-by-hop filtering and the request id, then hands each request to an Exchange, for which it
is the `Downstream` (http/streams.py): it frames the exchange's response as HTTP/1.1.

Pipelined requests are answered in order: one exchange is active; the heads that arrive
behind it wait in a queue and their bodies in their own bounded buffers. Reading from the
socket is paused by counted reasons (a full body buffer, a slow upstream, too many responses
owed); it resumes when every reason is released. The next exchange starts only while the
client reads what it was sent, so a client that never reads holds at most a write buffer and
a short queue (docs/design.md has the numbers).

Every read deadline is one float per connection, checked by the gateway's ticker a few times
a second: moving a deadline is an assignment, and an idle connection holds no timer handle
(one costs about 800 bytes in uvloop, a sixth of an idle connection's memory). No deadline
can be pushed back by trickling bytes: an idle connection has the keep-alive timeout, a
request head the header timeout from its first byte, a body both a gap timeout and a
minimum average rate, and a client that stops reading the send timeout, which only a
drained write buffer (tens of kilobytes read) cancels.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol, cast

import httptools

from bastion.config.schema import Listener
from bastion.errors import (
    BadRequest,
    ExpectationFailed,
    GatewayError,
    HeadersTooLarge,
    TransferCodingNotImplemented,
    URITooLong,
)
from bastion.http.error_render import render_json
from bastion.http.exchange import Exchange
from bastion.http.header_policy import is_dropped, with_connection_tokens
from bastion.http.model import HeaderList, Headers, Request, Response
from bastion.http.paths import parse_target, request_host

if TYPE_CHECKING:
    from bastion.config.build import Snapshot

log = logging.getLogger("bastion.h1")

# Requests queued behind the active one: at PIPELINE_PAUSE, parsing and reading stop until
# the queue shortens. httptools cannot stop mid-buffer, so a read that may hold several
# requests is parsed FEED_SLICE bytes at a time and the unparsed rest is held (a read is at
# most 256 KB). PIPELINE_LIMIT is the backstop for what one slice can still add (a chunked
# body followed by a flood of requests): the connection closes after the queued answers, and
# the client retries the rest, as RFC 9112 section 9.3.2 expects of pipelining clients.
PIPELINE_PAUSE = 8
PIPELINE_LIMIT = 64
FEED_SLICE = 512
# Reads go into one buffer per gateway (BufferedProtocol: no copy per read). A read takes at
# most HEAD_READ bytes while a request head is expected and PIPELINED_READ while answers are
# owed, so what may be held stays small; request bodies are read READ_BUFFER at a time.
READ_BUFFER = 256 * 1024
HEAD_READ = 16 * 1024
PIPELINED_READ = 4096
# The client's write buffer: above HIGH the client counts as not reading (the send timeout
# runs and no new exchange starts); it must read back down to LOW to count as reading again.
WRITE_HIGH = 64 * 1024
WRITE_LOW = 16 * 1024


_FRAME_NONE, _FRAME_LENGTH, _FRAME_CHUNKED, _FRAME_CLOSE = range(4)
_NO_BODY_STATUSES = frozenset((204, 304))
_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def status_line(status: int, reason: bytes = b"") -> bytes:
    """`HTTP/1.1 200 OK\r\n`, cached per (status, reason): upstreams repeat a handful of them."""
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        if not reason:
            try:
                reason = HTTPStatus(status).phrase.encode()
            except ValueError:
                reason = b"Unknown"
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if len(_STATUS_LINES) < 1000:
            _STATUS_LINES[key] = line
    return line


def _field_lines(parts: list[bytes], items: HeaderList) -> None:
    for name, value in items:
        parts += (name, b": ", value, b"\r\n")


class _PipelineFull(Exception):
    """One slice carried more pipelined requests than PIPELINE_LIMIT: stop parsing."""


_SPECIAL = frozenset(
    (b"host", b"content-length", b"transfer-encoding", b"connection", b"expect", b"x-request-id", b"upgrade")
)
_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:+/=-]{1,128}$")
_ID_PREFIX = os.urandom(6).hex()
_request_counter = 0


def new_request_id() -> str:
    """A unique id: a random per-process prefix and a counter (cheaper than uuid4)."""
    global _request_counter
    _request_counter += 1
    return f"{_ID_PREFIX}{_request_counter:010x}"


class Host(Protocol):
    """What a connection needs from the gateway that accepted it (app.Gateway)."""

    @property
    def snapshot(self) -> Snapshot:
        """The current config; each request keeps the one it started with."""
        ...

    @property
    def connections(self) -> set[Any]:
        """Live client connections, for drain and the deadline ticker."""
        ...

    @property
    def read_buffer(self) -> ReadBuffer: ...


class ReadBuffer:
    """The buffer a gateway's client connections read into (one per event loop), with the
    views of the sizes `get_buffer` hands out made once."""

    __slots__ = ("full", "head", "pipelined")

    def __init__(self) -> None:
        self.full = memoryview(bytearray(READ_BUFFER))
        self.head = self.full[:HEAD_READ]
        self.pipelined = self.full[:PIPELINED_READ]


class H1Server(asyncio.BufferedProtocol):
    __slots__ = (
        "gateway",
        "settings",
        "transport",
        "parser",
        "client_ip",
        "client_port",
        "keep_alive",
        "requests",
        "loop",
        "_active",
        "_task",
        "_queue",
        "_receiving",
        "_read_pauses",
        "_closed",
        "_broken",
        "_discard_body",
        "_in_head",
        "_head_bytes",
        "_url",
        "_url_bytes",
        "_headers",
        "_header_bytes",
        "_special",
        "_deadline",
        "_send_timer",
        "_max_uri",
        "_max_head",
        "_max_headers",
        "_keep_underscores",
        "_redirect_https",
        "_write_paused",
        "_pipeline_paused",
        "_body_started",
        "_body_bytes",
        "_body_left",
        "_held",
        "_trailers",
        "_framing",
        "_upgrade_pending",
        "_relay",
        "scheme",
        "client_cert",
        "proxied_peer",
    )

    def __init__(self, gateway: Host, settings: Listener) -> None:
        self.gateway = gateway
        self.settings = settings
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = ""
        self.client_port = 0
        self.keep_alive = True
        self.requests = 0
        self.loop = asyncio.get_running_loop()
        self._active: Exchange | None = None
        self._task: asyncio.Task[None] | None = None
        self._queue: list[Exchange] = []  # pipelined requests behind the active one (rare, short)
        self._receiving: Exchange | None = None
        self._read_pauses = 0
        self._closed = False
        self._broken = False
        self._discard_body = False
        self._in_head = False
        self._head_bytes = 0
        self._url: list[bytes] = []
        self._url_bytes = 0
        self._headers: HeaderList = []
        self._header_bytes = 0
        self._special: dict[bytes, list[bytes]] = {}
        self._deadline = 0.0
        self._send_timer: asyncio.TimerHandle | None = None
        limits = settings.limits
        self._max_uri = limits.max_uri_bytes
        self._max_head = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self._keep_underscores = settings.underscores_in_headers
        self._redirect_https = settings.redirect_https
        self._write_paused = False
        self._pipeline_paused = False
        self._body_started = 0.0
        self._body_bytes = 0
        self._body_left = 0  # Content-Length bytes still to come; -1 while a chunked body arrives
        self._held: bytes | None = None  # read but not parsed yet: the pipeline queue is full
        self._trailers: Headers | None = None  # of the chunked request body being received
        self._framing = _FRAME_NONE  # of the active exchange's response
        self._upgrade_pending: bytes | None = None  # bytes behind an Upgrade request
        self._relay: Callable[[], None] | None = None  # aborts the relay that took this connection
        self.scheme = "http"
        self.client_cert: bytes | None = None
        self.proxied_peer: tuple[str, int] | None = None  # the client named by a PROXY header

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        peer = self.proxied_peer or transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client_ip, self.client_port = peer[0], peer[1]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:  # the handshake is over: a client certificate has been verified
            self.scheme = "https"
            self.client_cert = ssl_object.getpeercert(binary_form=True)
        self.gateway.connections.add(self)
        self._set_deadline(self.settings.timeouts.header)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._receiving is not None:
            return self.gateway.read_buffer.full
        if self._active is not None or self._queue:
            return self.gateway.read_buffer.pipelined  # a client ahead of its answers
        return self.gateway.read_buffer.head

    def buffer_updated(self, nbytes: int) -> None:
        # The view is only parsed here; whatever must outlive this call is copied (_held).
        view = self.gateway.read_buffer.full[:nbytes]
        if nbytes <= FEED_SLICE and self._held is None and not self._broken:
            self._feed(view)  # one small read: the common case, without data_received's checks
        else:
            self.data_received(view)

    def data_received(self, data: bytes | memoryview) -> None:
        if self._broken:
            if self._upgrade_pending is not None:
                self._upgrade_pending += data  # the upgraded protocol's first bytes: for the relay
            return
        if self._held is not None:
            self._held += data
        elif len(data) > FEED_SLICE and (self._receiving is None or 0 <= self._body_left < len(data)):
            self._held = bytes(data)  # may hold many pipelined requests: parse it slice by slice
        else:
            self._feed(data)  # a small read, or all of it body: the common cases, parsed at once
            return
        self._feed_held()

    def _feed_held(self) -> None:
        """Parse held bytes until they run out or the pipeline queue is full."""
        data = self._held
        assert data is not None
        view = memoryview(data)
        end = len(data)
        pos = 0
        while pos < end and len(self._queue) < PIPELINE_PAUSE and not self._broken:
            step = self._body_left if self._receiving is not None and self._body_left > 0 else FEED_SLICE
            self._feed(view[pos : pos + step])
            pos += step
        if self._upgrade_pending is not None and pos < end:
            self._upgrade_pending += data[pos:]
        self._held = data[pos:] if pos < end and not self._broken else None  # bytes: a copy

    def _feed(self, data: bytes | memoryview) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _PipelineFull):
                return
            self._protocol_error(cause if isinstance(cause, GatewayError) else BadRequest())
            if not isinstance(cause, GatewayError):
                log.error("request parsing failed", exc_info=cause)
            return
        except httptools.HttpParserUpgrade as exc:
            # Whatever follows an Upgrade request is not HTTP/1.1: kept for a relay if the
            # route takes the upgrade (WebSocket), dropped otherwise; reading stops meanwhile.
            self._broken = True
            self.keep_alive = False
            self._upgrade_pending = bytes(data[exc.args[0] :])
            self.pause_reading()
            return
        except httptools.HttpParserError as exc:
            self._protocol_error(BadRequest(f"The request is malformed: {exc}."))
            return
        if self._in_head and self._head_bytes > self._max_head:
            self._protocol_error(HeadersTooLarge())

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.gateway.connections.discard(self)
        self._deadline = 0.0
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self._queue.clear()
        if self._active is not None:
            self._active.on_client_lost()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._active is not None:
            self._active.on_client_paused(True)
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.settings.timeouts.send, self.abort)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self._active is not None:
            self._active.on_client_paused(False)
        elif self._queue and not self._closed:
            self._start_next()

    # --- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._url = []
        self._url_bytes = 0
        self._headers = []
        self._header_bytes = 0
        self._special = {}
        # The whole head must arrive within the header timeout from its first byte, whatever
        # else is going on (a pipelined head behind a running exchange included).
        self._set_deadline(self.settings.timeouts.header)

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > self._max_uri:
            raise URITooLong()
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._max_head or len(self._headers) >= self._max_headers:
            raise HeadersTooLarge()
        if b"_" in name and not self._keep_underscores:
            return  # CGI/WSGI origins would read X_Consumer as X-Consumer
        name = name.lower()
        if not self._in_head:  # after the head: a trailer of the chunked body
            self._add_trailer(name, value)
            return
        if name in _SPECIAL:
            self._special.setdefault(name, []).append(value)
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        queue = self._queue
        if len(queue) >= PIPELINE_LIMIT:
            # Too many requests in one read: answer the queued ones, then close.
            self._broken = True
            queue[-1].close = True
            raise _PipelineFull()
        snapshot = self.gateway.snapshot
        request, expect_continue = self._build_request(snapshot.request_drop)
        self._url = []
        self._headers = []
        self._special = {}
        exchange = Exchange(self, request, snapshot, expect_continue)
        exchange.close = not (self.parser.should_keep_alive() and self.keep_alive)
        if self._redirect_https is not None:
            exchange.redirect_https = self._redirect_https
        self.requests += 1
        limit = self.settings.limits.max_requests_per_connection
        if limit and self.requests >= limit:
            exchange.close = True
        if not exchange.body_complete:
            self._receiving = exchange
            self._body_left = -1 if request.content_length is None else request.content_length
            self._start_body_clock()
        else:
            self._deadline = 0.0  # the client owes nothing until this request is answered
        if self._active is None and not self._write_paused:
            self._start(exchange)
        else:
            queue.append(exchange)
            if len(queue) >= PIPELINE_PAUSE and not self._pipeline_paused:
                self._pipeline_paused = True
                self.pause_reading()

    def _add_trailer(self, name: bytes, value: bytes) -> None:
        drop = self.gateway.snapshot.request_drop
        if not is_dropped(name, drop):
            if self._trailers is None:
                self._trailers = Headers()
            self._trailers.items.append((name, value))

    def on_body(self, body: bytes) -> None:
        receiving = self._receiving
        if receiving is not None and not self._discard_body:
            if self._deadline:
                # A gap timeout, capped by a minimum average rate: trickling cannot hold it off.
                now = self.loop.time()
                self._body_bytes += len(body)
                timeouts = self.settings.timeouts
                deadline = now + timeouts.body
                rate = self.settings.limits.min_body_rate
                if rate:
                    deadline = min(deadline, self._body_started + timeouts.body + self._body_bytes / rate)
                self._deadline = deadline
            receiving.on_body(body)
        if self._body_left > 0:
            self._body_left -= len(body)

    def on_message_complete(self) -> None:
        receiving = self._receiving
        if receiving is not None:
            self._receiving = None
            self._deadline = 0.0
            if not self._discard_body:
                receiving.on_end(self._trailers)
            self._trailers = None
        self._discard_body = False

    # --- request assembly --------------------------------------------------------------------

    def _build_request(self, drop: frozenset[bytes]) -> tuple[Request, bool]:
        parser = self.parser
        special = self._special
        method = parser.get_method().decode("ascii")
        version = parser.get_http_version()
        path, query, authority = parse_target(b"".join(self._url))
        if path == "*" and method != "OPTIONS":
            raise BadRequest("The request target * is only valid for OPTIONS.")
        hosts = special.get(b"host")
        host, forward = request_host(authority, hosts, version == "1.1")
        headers = self._headers
        if hosts is None:
            if forward:  # absolute-form without a Host header
                headers.append((b"host", forward))
        elif forward != hosts[0]:  # normalised, or replaced by the absolute-form authority
            headers = [(b"host", forward) if item[0] == b"host" else item for item in headers]
        connection = special.get(b"connection")
        if connection is not None:
            drop = with_connection_tokens(drop, connection)
        if self._keep_underscores:
            kept = [item for item in headers if not is_dropped(item[0], drop)]
        else:
            kept = [item for item in headers if item[0] not in drop]
        request = Request(method, path, query, Headers(kept), version, host, self.client_ip, self.client_port)
        request.scheme = self.scheme
        request.client_cert = self.client_cert
        codings = special.get(b"transfer-encoding")
        if codings is not None:
            # RFC 9112 section 6.3: a request whose last coding is not chunked has no reliable
            # length; llhttp lets `identity` through, so the rule is enforced here too. Any
            # coding besides chunked (gzip, chunked) is one the gateway cannot pass on
            # faithfully: 501, as RFC 9112 section 6.1 asks, never silently dropped.
            names = [c.strip().lower() for c in b",".join(codings).split(b",")]
            if names[-1] != b"chunked":
                raise BadRequest("The request's Transfer-Encoding does not end in chunked.")
            if len(names) > 1:
                raise TransferCodingNotImplemented()
            request.has_body = True
        else:
            lengths = special.get(b"content-length")
            if lengths is not None:
                request.content_length = int(lengths[0])
                request.has_body = request.content_length > 0
        upgrade = special.get(b"upgrade")
        if upgrade is not None and parser.should_upgrade():
            request.upgrade = upgrade[0].decode("latin-1").strip().lower()
        ids = special.get(b"x-request-id")
        if ids is not None and _VALID_REQUEST_ID.match(ids[0]):
            request.request_id = ids[0].decode("ascii")
        else:
            request.request_id = new_request_id()
        expect = special.get(b"expect")
        expect_continue = False
        if expect is not None:
            if expect[0].lower() != b"100-continue":
                raise ExpectationFailed()
            expect_continue = version == "1.1" and request.has_body
        return request, expect_continue

    # --- exchanges ---------------------------------------------------------------------------

    def _start(self, exchange: Exchange) -> None:
        self._active = exchange
        self._task = self.loop.create_task(exchange.run())

    def _start_next(self) -> None:
        """Start the first queued exchange; parsing and reading go on once the queue is short."""
        self._start(self._queue.pop(0))
        if self._held is not None:
            self._feed_held()
        if self._pipeline_paused and len(self._queue) < PIPELINE_PAUSE and self._held is None:
            self._pipeline_paused = False
            self.resume_reading()

    def _protocol_error(self, error: GatewayError) -> None:
        """The byte stream is broken: answer once (in order), then close."""
        self._broken = True
        self._queue.clear()
        receiving = self._receiving
        if receiving is not None and receiving is self._active:
            receiving.on_client_error(error)
            return
        if self._active is not None:
            self._active.close = True
            return
        self.send_error(error, new_request_id())
        self._close()

    def send_error(self, error: GatewayError, request_id: str) -> None:
        """Answer a request refused before it became an exchange (and count it)."""
        self.gateway.snapshot.metrics.reject(self.settings.name, error.status)
        body = json.dumps({"error": error.word, "message": error.message, "request_id": request_id}).encode()
        parts = [status_line(error.status)]
        for name, value in error.headers:
            parts += (name, b": ", value, b"\r\n")
        parts += (
            b"content-type: application/json\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\nx-request-id: ",
            request_id.encode(),
            b"\r\nconnection: close\r\n\r\n",
            body,
        )
        self.write(b"".join(parts))

    # --- Downstream: what the active exchange sends ---------------------------------------------

    def render_error(self, error: GatewayError, request_id: str) -> tuple[Response, bytes]:
        return render_json(error, request_id)

    def send_continue(self) -> None:
        active = self._active
        if active is not None and active.request.version == "1.1":
            self.write(_CONTINUE)

    def send_interim(self, response: Response) -> None:
        active = self._active
        if active is None or active.request.version != "1.1":
            return  # an HTTP/1.0 client cannot take a 1xx
        parts = [status_line(response.status, response.reason)]
        _field_lines(parts, response.headers.items)
        parts.append(b"\r\n")
        self.write(b"".join(parts))

    def send_head(
        self, response: Response, length: int | None, body: Sequence[bytes], end_stream: bool, close: bool
    ) -> None:
        """The head, framed for this client (length, chunked, or until close for HTTP/1.0),
        with `body` (and the end, if `end_stream`) in the same write."""
        active = self._active
        assert active is not None
        request = active.request
        status = response.status
        parts = [status_line(status, response.reason)]
        for name, value in response.headers.items:  # inline: once per response
            parts += (name, b": ", value, b"\r\n")
        if status == 101:  # switching protocols: the head carries its own Connection: upgrade
            parts.append(b"\r\n")
            self.write(b"".join(parts))
            return
        if request.method == "HEAD" or status in _NO_BODY_STATUSES:
            framing = _FRAME_NONE
            if length is not None and status != 204:
                parts += (b"content-length: ", str(length).encode(), b"\r\n")
        elif length is not None:
            framing = _FRAME_LENGTH
            parts += (b"content-length: ", str(length).encode(), b"\r\n")
        elif request.version == "1.1":
            framing = _FRAME_CHUNKED
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            framing = _FRAME_CLOSE
            close = True
        self._framing = framing
        if close or not self.keep_alive:
            active.close = True
            parts.append(b"connection: close\r\n\r\n")
        elif request.version != "1.1":
            parts.append(b"connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        if body and framing != _FRAME_NONE:
            if framing == _FRAME_CHUNKED:
                parts += [b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in body if chunk]
            else:
                parts += body
        if end_stream and framing == _FRAME_CHUNKED:
            parts.append(b"0\r\n\r\n")
        self.write(b"".join(parts))

    def send_data(self, data: bytes) -> None:
        framing = self._framing
        if framing == _FRAME_CHUNKED:
            if data:
                self.write(b"%x\r\n%s\r\n" % (len(data), data))
        elif framing != _FRAME_NONE:
            self.write(data)

    def send_end(self, trailers: Headers | None) -> None:
        if self._framing == _FRAME_CHUNKED:
            if trailers:
                parts = [b"0\r\n"]
                _field_lines(parts, trailers.items)
                parts.append(b"\r\n")
                self.write(b"".join(parts))
            else:
                self.write(b"0\r\n\r\n")

    def take_over(self, on_abort: Callable[[], None]) -> tuple[asyncio.Transport, bytes, bool]:
        """Hand the connection over after a 101: (transport, the bytes the client sent behind
        its request, whether writing is paused). No deadline runs from now on; a shutdown
        that cuts this connection calls `on_abort` instead of aborting the transport."""
        assert self.transport is not None
        self._relay = on_abort
        self._deadline = 0.0
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        pending, self._upgrade_pending = self._upgrade_pending or b"", None
        return self.transport, pending, self._write_paused

    def discard_body(self) -> None:
        """Discard the rest of the current request body (it was refused)."""
        self._discard_body = True
        self._broken = True

    def reset(self, error: GatewayError) -> None:
        self.abort()

    def finished(self, close: bool) -> None:
        """The active exchange is over: the next one starts, or the connection idles or closes."""
        self._active = None
        self._task = None
        if self._relay is not None:  # the relay has ended, its transport is closed
            self._closed = True
            self.gateway.connections.discard(self)
            return
        if self._closed:
            return
        if close or not self.keep_alive:
            self._close()
            return
        if self._queue:
            if not self._write_paused:  # else resume_writing starts it: the client must read first
                self._start_next()
        elif self._receiving is None and not self._in_head:
            self._set_deadline(self.settings.timeouts.keepalive)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self._closed:
            transport.write(data)

    def pause_reading(self) -> None:
        self._read_pauses += 1
        if self._read_pauses == 1 and self.transport is not None and not self._closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self._read_pauses -= 1
        if self._read_pauses == 0 and self.transport is not None and not self._closed:
            self.transport.resume_reading()
            if self._receiving is not None:
                # The client waited on us: its body clock starts again now, not at the last
                # tick (which may run before the bytes it has been holding are read).
                self._start_body_clock()
            elif self._deadline:
                self._set_deadline(self.settings.timeouts.header)

    def abort(self) -> None:
        self._closed = True
        if self._relay is not None:
            self._relay()  # the transport is the relay's now
        elif self.transport is not None:
            self.transport.abort()

    def drain(self) -> None:
        """Shutdown: finish the current response, then close; close now if idle."""
        self.keep_alive = False
        if self._active is None and self._receiving is None:
            self._close()

    def _close(self) -> None:
        if not self._closed and self.transport is not None:
            self._closed = True
            self.transport.close()

    def statistics(self) -> dict[str, Any]:
        """What this connection holds: requests queued, bytes read but not parsed, bytes unsent."""
        transport = self.transport
        return {
            "requests": self.requests,
            "queued": len(self._queue),
            "held_bytes": len(self._held) if self._held is not None else 0,
            "unsent_bytes": transport.get_write_buffer_size() if transport is not None else 0,
            "reading": self._read_pauses == 0,
        }

    # --- read deadlines ------------------------------------------------------------------------

    def _set_deadline(self, seconds: float) -> None:
        self._deadline = self.loop.time() + seconds

    def _start_body_clock(self) -> None:
        now = self.loop.time()
        self._body_started = now
        self._body_bytes = 0
        self._deadline = now + self.settings.timeouts.body

    def check_deadline(self, now: float) -> None:
        """Called by the gateway's ticker: act if the client missed its read deadline."""
        if not self._deadline or now < self._deadline or self._closed:
            return
        if self._read_pauses:
            # We stopped reading (a slow upstream, a full buffer): the client is not late.
            self._deadline = now + self.settings.timeouts.body
            return
        self._deadline = 0.0
        # The client was too slow: a head or body that stalled, or an idle keep-alive.
        receiving = self._receiving
        if receiving is not None and receiving is self._active:
            receiving.on_client_error(BadRequest("The client sent the request body too slowly."))
            self._broken = True
            return
        active = self._active
        if active is not None and receiving is None:
            # A pipelined head stalled behind a running exchange: read no more, let that
            # response finish, then close (the queued requests are retried by the client).
            self._broken = True
            self.keep_alive = False
            active.close = True
            self._queue.clear()
            return
        self._close()
