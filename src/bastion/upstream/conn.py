"""One HTTP/1.1 connection to a target: the `UpstreamStream` of http/streams.py for HTTP/1.1.

The connection frames the request (Content-Length, or chunked when the length is unknown,
with trailers), parses responses with httptools and hands every event straight to its
`UpstreamListener` (the exchange): interim heads, the head, body chunks, the end with
trailers, failure. Nothing is queued here; the exchange relays body bytes to the client as
they arrive and applies backpressure by pausing this transport. A connection serves one
exchange at a time and goes back to its pool only when both the request and the response
were complete and the upstream allows keep-alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import cast

import httptools

from bastion.errors import GatewayError, UpstreamError, UpstreamTimeout
from bastion.http.header_policy import DROP_RESPONSE, MAX_RESPONSE_HEAD, with_connection_tokens
from bastion.http.model import HeaderList, Headers, Response
from bastion.http.streams import UpstreamListener

_FIELD_OVERHEAD = 32


class _HeadTooLarge(UpstreamError):
    def __init__(self) -> None:
        super().__init__("The upstream's response head is too large.")


class _BytesAfterResponse(Exception):
    """The upstream sent more after the final response: the connection is not reusable."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "on_lost",
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
        "_head_bytes",
        "_head_read",
        "_interim",
        "_complete",
        "_trailers",
        "_send_chunked",
        "_upgrading",
        "upgrade_pending",
        "_timer",
        "_deadline",
        "_timeout",
        "_loop",
        "_paused",
    )

    def __init__(self, on_lost: Callable[[UpstreamConnection], None]) -> None:
        self.on_lost = on_lost  # the pool's bookkeeping, told once when the connection closes
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.listener: UpstreamListener | None = None
        self.closed = False
        self.idle_since = 0.0
        self.served = 0
        self.epoch = 0  # the pool's TLS settings it was made under (set by the pool)
        self.head_only = False
        self._headers: HeaderList = []
        self._reason = b""
        self._content_length: int | None = None
        self._chunked = False
        self._connection: list[bytes] = []
        self._head_seen = False
        self._head_bytes = 0  # the fields of the head (then of the trailers) so far
        self._head_read = 0  # bytes read before the head ended (a field httptools still holds)
        self._interim = False
        self._complete = False
        self._trailers: HeaderList | None = None
        self._send_chunked = False
        self._upgrading = False  # the request asked to switch protocols (WebSocket)
        self.upgrade_pending: bytes | None = None  # set by a 101: bytes behind it, for a relay
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._timeout = 0.0
        self._loop = asyncio.get_running_loop()
        self._paused = False

    # --- used by the pool and the exchange -------------------------------------------------

    def send_head(
        self,
        listener: UpstreamListener,
        method: str,
        target: str,
        headers: HeaderList,
        length: int | None,
        body: Sequence[bytes],
        end_stream: bool,
        timeout: float,
    ) -> None:
        """Send a request head (with what body there is, in one write); responses now go to
        `listener`. A body of unknown length (`length` None, not ended) goes chunked."""
        self.listener = listener
        self.head_only = method == "HEAD"
        self._head_seen = False
        self._head_bytes = 0  # the fields of the head (then of the trailers) so far
        self._head_read = 0  # bytes read before the head ended (a field httptools still holds)
        self._interim = False
        self._complete = False
        self._headers = []
        self._trailers = None
        self._content_length = None
        self._chunked = False
        self._connection = []
        self._timeout = timeout
        self._deadline = 0.0
        self._upgrading = False
        parts = [method.encode(), b" ", target.encode("latin-1"), b" HTTP/1.1\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        chunked = self._send_chunked = length is None and (not end_stream or bool(body))
        if chunked:
            parts.append(b"transfer-encoding: chunked\r\n\r\n")
            parts += [b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in body if chunk]
            if end_stream:
                parts.append(b"0\r\n\r\n")
        else:
            if length is not None:
                parts += (b"content-length: ", str(length).encode(), b"\r\n")
            parts.append(b"\r\n")
            parts += body
        assert self.transport is not None
        self.transport.write(b"".join(parts))
        if end_stream:
            self.arm_response_timeout()

    def send_data(self, data: bytes) -> None:
        if self.transport is not None and not self.closed and data:
            self.transport.write(b"%x\r\n%s\r\n" % (len(data), data) if self._send_chunked else data)

    def send_end(self, trailers: Headers | None) -> None:
        """The request body is complete: its terminator (and trailers), then the response clock."""
        if self._send_chunked and self.transport is not None and not self.closed:
            if trailers:
                parts = [b"0\r\n"]
                for name, value in trailers.items:
                    parts += (name, b": ", value, b"\r\n")
                parts.append(b"\r\n")
                self.transport.write(b"".join(parts))
            else:
                self.transport.write(b"0\r\n\r\n")
        self.arm_response_timeout()

    def expect_upgrade(self) -> None:
        """The request being sent asks to switch protocols: a 101 is its answer, not an error."""
        self._upgrading = True

    def take_over(self) -> tuple[asyncio.Transport, bytes]:
        """After a 101: the transport and the bytes the upstream sent behind its head, for a
        relay. The connection is the relay's from now on (`relay_ended` returns its slot)."""
        assert self.transport is not None
        self.listener = None
        self._deadline = 0.0
        pending, self.upgrade_pending = self.upgrade_pending or b"", None
        return self.transport, pending

    def relay_ended(self) -> None:
        """The relay that took this connection over is done: the pool's slot is free again."""
        if not self.closed:
            self.closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.on_lost(self)

    def is_available(self) -> bool:
        """Can take a request now (HTTP/1.1: one at a time, so only when no exchange holds it)."""
        return not self.closed and self.listener is None

    def is_closed(self) -> bool:
        return self.closed

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
        if self.upgrade_pending is not None:
            self.upgrade_pending += data  # after the 101, before the relay takes over
            return
        if self._deadline:
            self._deadline = self._loop.time() + self._timeout
        if not self._head_seen:
            self._head_read += len(data)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if isinstance(exc, httptools.HttpParserUpgrade) and self.upgrade_pending is not None:
                # The 101 the request asked for: what follows is the new protocol's.
                self.upgrade_pending = bytes(data[exc.args[0] :])
                self.pause_reading()
                return
            if self._complete:
                self.abort()  # bytes after the final response: the listener has it all; no reuse
            elif isinstance(exc, httptools.HttpParserCallbackError):
                cause = exc.__context__
                self._fail(cause if isinstance(cause, GatewayError) else UpstreamError())
            elif isinstance(exc, httptools.HttpParserUpgrade):
                self._fail(UpstreamError("The upstream switched protocols, which this route does not support."))
            else:
                self._fail(UpstreamError("The upstream sent a malformed response."))
            return
        if not self._head_seen and self._head_read > 2 * MAX_RESPONSE_HEAD and self.listener is not None:
            # httptools holds a field until it ends, so one endless field calls nobody: bound it here.
            self._fail(_HeadTooLarge())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        listener = self.listener
        self.listener = None
        self.on_lost(self)
        if listener is None or self._complete:
            return
        if exc is None and self._head_seen and self._until_close():
            listener.upstream_end(None, False)
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
        self._head_bytes += len(name) + len(value) + _FIELD_OVERHEAD
        if self._head_bytes > MAX_RESPONSE_HEAD:
            raise _HeadTooLarge()
        name = name.lower()
        if self._head_seen:  # after the head: a trailer of a chunked body
            if self._trailers is None:
                self._trailers = []
            if name not in DROP_RESPONSE:
                self._trailers.append((name, value))
            return
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
        if connection:
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
                if not self._upgrading:
                    raise UpstreamError("The upstream switched protocols, which this route does not support.")
                self._head_seen = True
                self.upgrade_pending = b""
                listener.upstream_head(Response(101, Headers(headers), reason), None)
                return
            self._interim = True
            self._head_bytes = self._head_read = 0
            self._content_length = None
            self._chunked = False
            listener.upstream_interim(Response(status, Headers(headers), reason))
            return
        self._head_seen = True
        self._head_bytes = 0  # trailers have a limit of their own
        keep_alive = self.parser.should_keep_alive()
        listener.upstream_head(Response(status, Headers(headers), reason), self._content_length)
        if self.head_only:
            # A response to HEAD has no body whatever its framing headers say; httptools cannot
            # be told, so the parser is replaced to start clean at the next response.
            self.parser = httptools.HttpResponseParser(self)
            self._done(keep_alive)

    def on_body(self, body: bytes) -> None:
        if self.listener is not None:
            self.listener.upstream_data(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False  # the end of a 1xx, not of the response
            return
        if self._complete or self.upgrade_pending is not None:
            return  # a HEAD response's old parser, already answered for; or a 101
        self._done(self.parser.should_keep_alive())

    # --- internals -------------------------------------------------------------------------

    def _until_close(self) -> bool:
        return self._content_length is None and not self._chunked and not self.head_only

    def _done(self, keep_alive: bool) -> None:
        self._deadline = 0.0
        self._complete = True
        listener = self.listener
        if listener is not None:
            trailers = self._trailers
            listener.upstream_end(Headers(trailers) if trailers else None, keep_alive)

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
