"""One HTTP/1.1 connection to a target, driven by the exchange that currently holds it.

The connection parses responses with httptools and hands every event straight to its
`UpstreamListener` (the exchange): head, body chunks, end, failure. Nothing is queued here;
the exchange relays body bytes to the client as they arrive and applies backpressure by
pausing this transport. A connection serves one exchange at a time and goes back to its
pool only when both the request and the response were complete and the upstream allows
keep-alive.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from bastion.errors import GatewayError, UpstreamError, UpstreamTimeout
from bastion.http.header_policy import DROP_RESPONSE, with_connection_tokens
from bastion.http.model import HeaderList, Headers, Response

if TYPE_CHECKING:
    from bastion.upstream.pool import ConnectionPool


_PLAIN_CONNECTION = frozenset((b"keep-alive", b"close", b"Keep-Alive", b"Close"))  # name no other field


class _BytesAfterResponse(Exception):
    """The upstream sent more after the final response: the connection is not reusable."""


class UpstreamListener(Protocol):
    """What a connection reports to the exchange using it."""

    def upstream_interim(self, response: Response) -> None: ...
    def upstream_head(self, response: Response, content_length: int | None, keep_alive: bool) -> None: ...
    def upstream_body(self, data: bytes) -> None: ...
    def upstream_done(self, keep_alive: bool) -> None: ...
    def upstream_failed(self, error: GatewayError) -> None: ...
    def upstream_paused(self, paused: bool) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "pool",
        "transport",
        "parser",
        "listener",
        "closed",
        "idle_since",
        "served",
        "epoch",
        "head_only",
        "_headers",
        "_reason",
        "_content_length",
        "_chunked",
        "_connection",
        "_head_seen",
        "_interim",
        "_complete",
        "_timer",
        "_deadline",
        "_timeout",
        "_loop",
        "_paused",
    )

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.listener: UpstreamListener | None = None
        self.closed = False
        self.idle_since = 0.0
        self.served = 0
        self.epoch = pool.epoch  # the pool's TLS settings it was made under
        self.head_only = False
        self._headers: HeaderList = []
        self._reason = b""
        self._content_length: int | None = None
        self._chunked = False
        self._connection: list[bytes] = []
        self._head_seen = False
        self._interim = False
        self._complete = False
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._timeout = 0.0
        self._loop = asyncio.get_running_loop()
        self._paused = False

    # --- used by the pool and the exchange -------------------------------------------------

    def start(self, listener: UpstreamListener, head: bytes, head_only: bool, timeout: float) -> None:
        """Send a request head; responses now go to `listener`."""
        self.listener = listener
        self.head_only = head_only
        self._head_seen = False
        self._interim = False
        self._complete = False
        self._headers = []
        self._content_length = None
        self._chunked = False
        self._connection = []
        self._timeout = timeout
        self._deadline = 0.0
        assert self.transport is not None
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def arm_response_timeout(self) -> None:
        """Start the response clock (request fully sent); each read pushes it back.

        The timer is re-armed lazily: while a pooled connection keeps serving, one timer
        handle lives on and requests only move `_deadline`."""
        self._deadline = self._loop.time() + self._timeout
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def detach(self) -> None:
        """The exchange is done with this connection (it goes back to the pool or closes)."""
        self.listener = None
        self._deadline = 0.0
        self.served += 1
        if self._paused:
            self.resume_reading()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed and self._paused:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        self.listener = None
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.listener = None
        if self.transport is not None:
            self.transport.abort()

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.listener is None:
            # Bytes on an idle connection: the upstream is confused; never reuse it.
            self.abort()
            return
        if self._deadline:
            self._deadline = self._loop.time() + self._timeout
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self._complete:
                self.abort()  # bytes after the final response: the listener has it all; no reuse
            elif isinstance(exc, httptools.HttpParserCallbackError):
                cause = exc.__context__
                self._fail(cause if isinstance(cause, GatewayError) else UpstreamError())
            elif isinstance(exc, httptools.HttpParserUpgrade):
                self._fail(UpstreamError("The upstream switched protocols, which this route does not support."))
            else:
                self._fail(UpstreamError("The upstream sent a malformed response."))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        listener = self.listener
        self.listener = None
        self.pool.connection_lost(self)
        if listener is None or self._complete:
            return
        if exc is None and self._head_seen and self._until_close():
            listener.upstream_done(False)
        elif self._head_seen:
            listener.upstream_failed(UpstreamError("The upstream closed the connection mid-response."))
        else:
            listener.upstream_failed(UpstreamError("The upstream closed the connection without answering."))

    def pause_writing(self) -> None:
        if self.listener is not None:
            self.listener.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.listener is not None:
            self.listener.upstream_paused(False)

    # --- httptools callbacks ---------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        if self._complete:
            raise _BytesAfterResponse()  # a second response to one request
        self._reason += status  # a status line split across reads arrives in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            self._content_length = int(value)
        elif name == b"transfer-encoding":
            self._chunked = True
        elif name == b"connection":
            self._connection.append(value)
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        drop = DROP_RESPONSE
        connection = self._connection
        if connection and not (len(connection) == 1 and connection[0] in _PLAIN_CONNECTION):
            drop = with_connection_tokens(drop, connection)
        headers = [item for item in self._headers if item[0] not in drop]
        reason = self._reason
        self._headers = []
        self._connection = []
        self._reason = b""
        listener = self.listener
        assert listener is not None
        if status < 200:
            # An interim response (RFC 9110 section 15.2): the final one is still to come, and
            # until it is complete this connection belongs to this exchange.
            if status == 101:
                raise UpstreamError("The upstream switched protocols, which this route does not support.")
            self._interim = True
            self._content_length = None
            self._chunked = False
            listener.upstream_interim(Response(status, Headers(headers), reason))
            return
        self._head_seen = True
        keep_alive = self.parser.should_keep_alive()
        listener.upstream_head(Response(status, Headers(headers), reason), self._content_length, keep_alive)
        if self.head_only:
            # A response to HEAD has no body whatever its framing headers say; httptools cannot
            # be told, so the parser is replaced to start clean at the next response.
            self.parser = httptools.HttpResponseParser(self)
            self._done(keep_alive)

    def on_body(self, body: bytes) -> None:
        if self.listener is not None:
            self.listener.upstream_body(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False  # the end of a 1xx, not of the response
            return
        if self._complete:
            return  # a HEAD response's old parser, already answered for
        self._done(self.parser.should_keep_alive())

    # --- internals -------------------------------------------------------------------------

    def _until_close(self) -> bool:
        return self._content_length is None and not self._chunked and not self.head_only

    def _done(self, keep_alive: bool) -> None:
        self._deadline = 0.0
        self._complete = True
        listener = self.listener
        if listener is not None:
            listener.upstream_done(keep_alive)

    def _fail(self, error: GatewayError) -> None:
        listener = self.listener
        self.abort()
        if listener is not None:
            listener.upstream_failed(error)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._deadline or self.closed:
            return
        now = self._loop.time()
        if self._paused:
            # We stopped reading (the client is slow): silence from the upstream is ours.
            self._deadline = now + self._timeout
        if now < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        self._fail(UpstreamTimeout())
