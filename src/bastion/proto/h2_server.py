"""HTTP/2 on the client side: one connection, many streams, each stream one Exchange.

`h2` (python-hyper) does the framing and the protocol's state (h2_connection.py sets it up);
this module moves bytes between it and the transport, has each stream's head turned into the
same `Request` H1Server builds (h2_request.py), and is the `Downstream` of each stream's
`Exchange` (`H2Stream`).

Flow control is tied to backpressure both ways:

- Request bodies: the connection window is re-opened as DATA arrives (it only bounds bytes in
  flight), a stream's window only as its exchange takes the bytes. A paused exchange (its
  upstream is slow) stops acknowledging its stream, so that client stream stops after one
  window, and its neighbours go on.
- Responses: a stream sends what the client's windows allow; the rest waits in the stream's
  buffer. Above STREAM_BUFFER_HIGH the exchange is told the client is paused (it pauses its
  upstream) until the buffer is back under STREAM_BUFFER_LOW. While the transport's write
  buffer is over its high-water mark no DATA is written at all and every stream counts as
  paused.

Deadlines follow H1Server: one float per connection (no stream open: the keep-alive timeout,
the header timeout before the first stream) and one per stream (a request body: gap timeout
and minimum rate; a response stuck on a closed window: the send timeout), checked by the
gateway's ticker. Protections against abusive clients (rapid reset, control frame floods,
header blocks over the limit) are counted per connection; see docs/design.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from bastion.config.schema import Listener
from bastion.errors import BadRequest, GatewayError
from bastion.http.error_render import render_json
from bastion.http.exchange import Exchange
from bastion.http.model import HeaderList, Headers, Response
from bastion.proto.h1 import WRITE_HIGH, WRITE_LOW, Host, new_request_id
from bastion.proto.h2_connection import server_connection
from bastion.proto.h2_request import CONNECTION_SPECIFIC, Client, Malformed, build_request, trailer_fields

if TYPE_CHECKING:
    pass

log = logging.getLogger("bastion.h2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Response bytes a stream holds beyond what the client's window takes: above HIGH its
# exchange pauses the upstream; below LOW it resumes. One upstream read may land on top.
STREAM_BUFFER_HIGH = 64 * 1024
STREAM_BUFFER_LOW = 16 * 1024
# Largest DATA frame written at once (a client may allow 16 MB frames; smaller ones interleave).
MAX_DATA_FRAME = 16 * 1024
# A client that does not read what the gateway must send (PING and SETTINGS acks, heads):
# past this many unsent bytes, the connection is cut.
MAX_UNSENT = 1024 * 1024
# Client resets and control frames are budgets per BUDGET_WINDOW seconds (token buckets).
BUDGET_WINDOW = 10.0

_NO_BODY_STATUSES = frozenset((204, 304))
# RFC 9113 section 8.2.2: connection-specific fields make a request malformed; a response
# never carries them (nor a Content-Length of the upstream's framing: the gateway sets its own).
_RESPONSE_DROP = CONNECTION_SPECIFIC | frozenset((b"te", b"content-length"))
_TRAILER_DROP = _RESPONSE_DROP | frozenset((b"trailer",))
_STATUS: dict[int, bytes] = {}


def _status(status: int) -> bytes:
    value = _STATUS.get(status)
    if value is None:
        value = _STATUS[status] = str(status).encode()
    return value


class H2Stream:
    """One HTTP/2 stream: the Downstream of its exchange (http/streams.py)."""

    __slots__ = (
        "server",
        "stream_id",
        "loop",
        "exchange",
        "head_only",
        "receiving",
        "discarding",
        "trailers",
        "read_pauses",
        "unacked",
        "out",
        "out_size",
        "end_pending",
        "end_trailers",
        "ended",
        "closed",
        "exchange_done",
        "window_paused",
        "client_paused",
        "body_started",
        "body_bytes",
        "body_deadline",
        "send_deadline",
    )

    def __init__(self, server: H2Server, stream_id: int) -> None:
        self.server = server
        self.stream_id = stream_id
        self.loop = server.loop
        self.exchange: Exchange | None = None
        self.head_only = False  # a HEAD request: the response has no body
        self.receiving = False  # the request body is still arriving
        self.discarding = False  # the rest of the request body is refused
        self.trailers: Headers | None = None  # of the request
        self.read_pauses = 0
        self.unacked = 0  # request bytes received on this stream and not yet re-opened
        self.out: deque[bytes] = deque()  # response bytes waiting for the client's window
        self.out_size = 0
        self.end_pending = False  # the end (and trailers) waits behind `out`
        self.end_trailers: HeaderList | None = None
        self.ended = False  # END_STREAM sent
        self.closed = False  # reset, or forgotten by the connection
        self.exchange_done = True  # set False while an exchange runs on this stream
        self.window_paused = False  # `out` over STREAM_BUFFER_HIGH
        self.client_paused = False  # what the exchange was last told
        self.body_started = 0.0
        self.body_bytes = 0
        self.body_deadline = 0.0
        self.send_deadline = 0.0

    # --- Downstream -------------------------------------------------------------------------

    def render_error(self, error: GatewayError, request_id: str) -> tuple[Response, bytes]:
        return render_json(error, request_id)

    def send_continue(self) -> None:
        """HTTP/2 clients do not wait for 100 (Expect is not forwarded): nothing to send."""

    def send_interim(self, response: Response) -> None:
        if self.closed or self.ended:
            return
        headers = [(b":status", _status(response.status))]
        headers += [item for item in response.headers.items if item[0] not in _RESPONSE_DROP]
        try:
            self.server.conn.send_headers(self.stream_id, headers)
        except h2.exceptions.H2Error:
            return
        self.server.write_out()

    def send_head(
        self, response: Response, length: int | None, body: Sequence[bytes], end_stream: bool, close: bool
    ) -> None:
        if self.closed:
            return
        status = response.status
        headers = [(b":status", _status(status))]
        for item in response.headers.items:  # inline: once per response
            if item[0] not in _RESPONSE_DROP:
                headers.append(item)
        if length is not None and status != 204:
            headers.append((b"content-length", str(length).encode()))
        if self.head_only or status in _NO_BODY_STATUSES:
            body = ()
            end_stream = True
        data = [chunk for chunk in body if chunk] if body else None
        server = self.server
        try:
            server.conn.fast_headers(self.stream_id, headers, end_stream and not data)
        except h2.exceptions.H2Error:  # h2 closed the stream itself (the client broke it)
            server.reset_stream(self, ErrorCodes.STREAM_CLOSED)
            server.write_out()
            return
        if end_stream and not data:
            self.ended = True
        if data:
            for chunk in data:
                self._queue(chunk)
            if end_stream:
                self.end_pending = True
            server.push(self)
        server.write_out()
        if self.ended:
            self._maybe_retire()

    def send_data(self, data: bytes) -> None:
        if self.closed or self.ended or self.head_only or not data:
            return
        self._queue(data)
        server = self.server
        server.push(self)
        server.write_out()

    def send_end(self, trailers: Headers | None) -> None:
        if self.closed or self.ended or self.end_pending:
            return
        if trailers and not self.head_only:
            self.end_trailers = [item for item in trailers.items if item[0] not in _TRAILER_DROP] or None
        self.end_pending = True
        server = self.server
        server.push(self)
        server.write_out()

    def pause_reading(self) -> None:
        self.read_pauses += 1

    def resume_reading(self) -> None:
        self.read_pauses -= 1
        if self.read_pauses == 0:
            if self.receiving:
                self._start_body_clock()  # the client waited on us
            if self.unacked:
                self.server.ack(self)
                self.server.write_out()

    def take_over(self, on_abort: Callable[[], None]) -> tuple[asyncio.Transport, bytes, bool]:
        raise NotImplementedError("no protocol switch over HTTP/2")  # requests never carry an upgrade

    def discard_body(self) -> None:
        self.discarding = True

    def reset(self, error: GatewayError) -> None:
        self.server.reset_stream(self, ErrorCodes.INTERNAL_ERROR)
        self.server.write_out()

    def finished(self, close: bool) -> None:
        self.exchange_done = True
        self.exchange = None
        self._maybe_retire()

    # --- internals --------------------------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        self.out.append(data)
        self.out_size += len(data)

    def _start_body_clock(self) -> None:
        now = self.loop.time()
        self.body_started = now
        self.body_bytes = 0
        self.body_deadline = now + self.server.settings.timeouts.body

    def _maybe_retire(self) -> None:
        """Both sides are done with the stream: forget it (and cut an unread request body)."""
        if self.exchange_done and (self.ended or self.closed):
            server = self.server
            if not self.closed:
                if self.receiving:  # RFC 9113 section 8.1: the response is complete, stop the body
                    server.reset_stream(self, ErrorCodes.NO_ERROR)
                    server.write_out()
                self.closed = True
            server.forget(self)

    def update_paused(self) -> None:
        """Tell the exchange whether the client takes its bytes (window buffer or transport)."""
        paused = self.window_paused or self.server.write_paused
        if paused != self.client_paused:
            self.client_paused = paused
            exchange = self.exchange
            if exchange is not None:
                exchange.on_client_paused(paused)


class H2Server(asyncio.Protocol):
    """One HTTP/2 client connection (after ALPN h2, or the prior-knowledge preface)."""

    proxied_peer: tuple[str, int] | None = None  # the client's address from a PROXY header, if any

    def __init__(self, gateway: Host, settings: Listener) -> None:
        self.gateway = gateway
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        limits = settings.limits
        self.conn = server_connection(limits)
        self._ack_threshold = limits.h2_initial_window_size // 2
        self._conn_window = limits.h2_connection_window
        self._conn_unacked = 0
        self.streams: dict[int, H2Stream] = {}
        self._blocked: dict[int, H2Stream] = {}  # streams with bytes waiting for a window
        self._starting: list[H2Stream] = []  # exchanges to start once the read is processed
        self.client_ip = ""
        self.client_port = 0
        self.scheme = "http"
        self.client_cert: bytes | None = None
        self._client = Client("", 0, "http", None)
        self.requests = 0
        self.write_paused = False
        self._in_receive = False
        self._flush_pending = False
        self._queued = 0  # DATA bytes h2 holds since the last flush
        self._closed = False
        self._goaway: int | None = None  # last stream id announced in our GOAWAY
        self._deadline = 0.0
        self._send_timer: asyncio.TimerHandle | None = None
        self._resets = float(limits.h2_max_resets)
        self._control = float(limits.h2_max_control_frames)
        self._budget_time = self.loop.time()

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        peer = self.proxied_peer or transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client_ip, self.client_port = peer[0], peer[1]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.scheme = "https"
            self.client_cert = ssl_object.getpeercert(binary_form=True)
        self._client = Client(self.client_ip, self.client_port, self.scheme, self.client_cert)
        self.gateway.connections.add(self)
        conn = self.conn
        conn.initiate_connection()
        if self._conn_window > 65535:
            conn.increment_flow_control_window(self._conn_window - 65535)
        self._deadline = self.loop.time() + self.settings.timeouts.header
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._in_receive = True
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued a GOAWAY with the error's code: send it and end the connection.
            self._in_receive = False
            log.debug("HTTP/2 connection error from %s: %s", self.client_ip, exc)
            self._fail_connection()
            return
        try:
            for event in events:
                handler = _HANDLERS.get(type(event))
                if handler is not None:
                    handler(self, event)
                    if self._closed:
                        return
        finally:
            self._in_receive = False
        starting = self._starting
        if starting:
            self._starting = []
            for stream in starting:  # reset in the same read: never started, the upstream never sees it
                exchange = stream.exchange
                if exchange is not None and not stream.closed:
                    self.loop.create_task(exchange.run())
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.gateway.connections.discard(self)
        self._deadline = 0.0
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self._lose_streams()

    def _lose_streams(self) -> None:
        """The connection is gone: every stream's exchange loses its client."""
        for stream in list(self.streams.values()):
            stream.closed = True
            exchange = stream.exchange
            if exchange is not None:
                exchange.on_client_lost()
        self.streams.clear()
        self._blocked.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in self.streams.values():
            stream.update_paused()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.settings.timeouts.send, self.abort)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        for stream in list(self._blocked.values()):
            self.push(stream)
        for stream in list(self.streams.values()):
            stream.update_paused()
        self.write_out()

    # --- events -----------------------------------------------------------------------------

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        stream = H2Stream(self, stream_id)
        self.streams[stream_id] = stream
        self._deadline = 0.0
        if self._goaway is not None and stream_id > self._goaway:
            self.reset_stream(stream, ErrorCodes.REFUSED_STREAM)
            self.forget(stream)
            return
        if len(self.streams) > self.settings.limits.h2_max_concurrent_streams:
            # Over the limit we announced: this stream is refused (safe to retry), and counts
            # against the reset budget, so a client cannot make it a free flood either.
            self.reset_stream(stream, ErrorCodes.REFUSED_STREAM)
            self.forget(stream)
            self._spend_reset()
            return
        ended = bool(event.stream_ended)
        snapshot = self.gateway.snapshot
        self.requests += 1
        try:
            request = build_request(event.headers, snapshot.request_drop, self.settings, self._client)
        except Malformed:
            snapshot.metrics.reject(self.settings.name, 400)
            self.reset_stream(stream, ErrorCodes.PROTOCOL_ERROR)
            self.forget(stream)
            return
        except GatewayError as error:
            snapshot.metrics.reject(self.settings.name, error.status)
            stream.receiving = not ended
            stream.discarding = True
            response, body = render_json(error, new_request_id())
            response.headers.items.append((b"content-length", str(len(body)).encode()))
            stream.exchange_done = False
            stream.send_head(response, None, (body,), True, False)
            stream.finished(False)
            return
        request.has_body = not ended
        if request.method == "HEAD":
            stream.head_only = True
        exchange = Exchange(stream, request, snapshot, False)
        redirect = self.settings.redirect_https
        if redirect is not None:
            exchange.redirect_https = redirect
        stream.exchange = exchange
        stream.exchange_done = False
        if not ended:
            stream.receiving = True
            stream._start_body_clock()
        self._starting.append(stream)
        limit = self.settings.limits.max_requests_per_connection
        if limit and self.requests >= limit:
            self.drain()

    def _on_data(self, event: h2.events.DataReceived) -> None:
        size = event.flow_controlled_length
        if size:
            self._conn_unacked += size
            if self._conn_unacked >= self._conn_window // 2:
                self.conn.increment_flow_control_window(self._conn_unacked)
                self._conn_unacked = 0
        stream = self.streams.get(event.stream_id)
        data = event.data
        if not data and not event.stream_ended:
            self._spend_control()  # an empty DATA frame does nothing but cost
        if stream is None or stream.closed:
            return
        stream.unacked += size
        if stream.discarding or not stream.receiving:
            if size:
                self.ack(stream)
            return
        if data:
            rate = self.settings.limits.min_body_rate
            now = self.loop.time()
            stream.body_bytes += len(data)
            deadline = now + self.settings.timeouts.body
            if rate:
                deadline = min(deadline, stream.body_started + self.settings.timeouts.body + stream.body_bytes / rate)
            stream.body_deadline = deadline
            exchange = stream.exchange
            if exchange is not None:
                exchange.on_body(data)
        if stream.read_pauses == 0 and stream.unacked >= self._ack_threshold:
            self.ack(stream)

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.closed:
            return
        try:
            items = trailer_fields(event.headers, self.gateway.snapshot.request_drop)
        except Malformed:
            self._malformed(stream)
            return
        stream.trailers = Headers(items) if items else None

    def _on_stream_ended(self, event: h2.events.StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or not stream.receiving:
            return
        stream.receiving = False
        stream.body_deadline = 0.0
        exchange = stream.exchange
        if exchange is not None and not stream.discarding:
            exchange.on_end(stream.trailers)
        stream.trailers = None

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        if self._spend_reset():
            return
        stream.closed = True
        stream.receiving = False
        exchange = stream.exchange
        if exchange is not None:
            exchange.on_client_lost()
        self.forget(stream)

    def _on_window(self, event: h2.events.WindowUpdated) -> None:
        if event.stream_id:
            stream = self._blocked.get(event.stream_id)
            if stream is not None:
                self.push(stream)
        else:
            for stream in list(self._blocked.values()):
                self.push(stream)

    def _on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        self._spend_control()
        if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            for stream in list(self._blocked.values()):
                self.push(stream)

    def _on_control(self, event: h2.events.Event) -> None:
        self._spend_control()

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        """The client is leaving. h2 takes no frame after a GOAWAY, so nothing can finish."""
        self._fail_connection()

    # --- request assembly -------------------------------------------------------------------

    def _malformed(self, stream: H2Stream) -> None:
        exchange = stream.exchange
        self.reset_stream(stream, ErrorCodes.PROTOCOL_ERROR)
        if exchange is not None:
            exchange.on_client_lost()
        self.forget(stream)

    # --- sending ----------------------------------------------------------------------------

    def write_out(self) -> None:
        """Write what h2 has queued, once per loop turn: the responses of many streams, finished
        in the same turn, leave in one write (one system call instead of two per response)."""
        if self._in_receive or self._flush_pending or self._closed:
            return
        self._flush_pending = True
        self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_pending = False
        self._queued = 0
        data = self.conn.data_to_send()
        transport = self.transport
        if data and transport is not None and not self._closed:
            transport.write(data)  # may call pause_writing at once
            if self.write_paused and transport.get_write_buffer_size() > MAX_UNSENT:
                log.info("HTTP/2 client %s does not read: connection cut", self.client_ip)
                self.abort()

    def push(self, stream: H2Stream) -> None:
        """Send what the stream's buffer holds, as far as the client's windows allow."""
        if stream.closed:
            return
        conn = self.conn
        stream_id = stream.stream_id
        out = stream.out
        try:
            while out and not self.write_paused:
                window = conn.local_flow_control_window(stream_id)
                if window <= 0:
                    break
                chunk = out[0]
                size = min(window, MAX_DATA_FRAME, conn.max_outbound_frame_size)
                if len(chunk) <= size:
                    out.popleft()
                else:
                    out[0] = chunk[size:]
                    chunk = chunk[:size]
                stream.out_size -= len(chunk)
                last = not out and stream.end_pending and stream.end_trailers is None
                conn.fast_data(stream_id, chunk, last)
                if last:
                    stream.ended = True
                self._queued += len(chunk)
                if self._queued >= WRITE_HIGH:
                    self.flush()  # now, so that a full socket buffer stops this loop (pause_writing)
            if not out and stream.end_pending and not stream.ended:
                if stream.end_trailers is not None:
                    conn.fast_headers(stream_id, stream.end_trailers, True)
                else:
                    conn.fast_data(stream_id, b"", True)
                stream.ended = True
        except h2.exceptions.H2Error:
            self.reset_stream(stream, ErrorCodes.INTERNAL_ERROR)
            stream._maybe_retire()
            return
        if out:
            self._blocked[stream_id] = stream
            if not stream.send_deadline:
                stream.send_deadline = self.loop.time() + self.settings.timeouts.send
        else:
            self._blocked.pop(stream_id, None)
            stream.send_deadline = 0.0
        size = stream.out_size
        if size > STREAM_BUFFER_HIGH:
            stream.window_paused = True
        elif size <= STREAM_BUFFER_LOW:
            stream.window_paused = False
        stream.update_paused()
        if stream.ended:
            stream._maybe_retire()

    def ack(self, stream: H2Stream) -> None:
        """Re-open the stream's window by what its exchange has taken."""
        unacked = stream.unacked
        stream.unacked = 0
        if unacked and not stream.closed and stream.receiving:
            try:
                self.conn.increment_flow_control_window(unacked, stream.stream_id)
            except h2.exceptions.H2Error:
                return

    def reset_stream(self, stream: H2Stream, code: ErrorCodes) -> None:
        if stream.closed:
            return
        stream.closed = True
        stream.out.clear()
        stream.out_size = 0
        self._blocked.pop(stream.stream_id, None)
        try:
            self.conn.reset_stream(stream.stream_id, code)
        except h2.exceptions.H2Error:
            return

    def forget(self, stream: H2Stream) -> None:
        """The stream is over on our side."""
        stream.closed = True
        stream.receiving = False
        self.streams.pop(stream.stream_id, None)
        self._blocked.pop(stream.stream_id, None)
        if not self.streams and not self._closed:
            if self._goaway is not None:
                self._close()
            else:
                self._deadline = self.loop.time() + self.settings.timeouts.keepalive

    # --- budgets ----------------------------------------------------------------------------

    def _refill(self, now: float) -> None:
        elapsed = now - self._budget_time
        if elapsed > 0.1:
            self._budget_time = now
            limits = self.settings.limits
            share = elapsed / BUDGET_WINDOW
            self._resets = min(float(limits.h2_max_resets), self._resets + share * limits.h2_max_resets)
            self._control = min(
                float(limits.h2_max_control_frames), self._control + share * limits.h2_max_control_frames
            )

    def _spend_reset(self) -> bool:
        """One more stream the client cancelled (or opened over the limit); True: over budget,
        the connection is closing (rapid reset: streams opened and cancelled for free)."""
        self._refill(self.loop.time())
        self._resets -= 1
        if self._resets < 0:
            self._calm("too many streams reset")
            return True
        return False

    def _spend_control(self) -> None:
        self._refill(self.loop.time())
        self._control -= 1
        if self._control < 0:
            self._calm("too many control frames")

    def _calm(self, why: str) -> None:
        """A client over a budget: GOAWAY ENHANCE_YOUR_CALM and close."""
        log.info("HTTP/2 client %s: %s, connection closed", self.client_ip, why)
        with contextlib.suppress(h2.exceptions.H2Error):
            self.conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, last_stream_id=self.conn.highest_inbound_stream_id)
        self._fail_connection()

    def _fail_connection(self) -> None:
        """Send what h2 queued (its GOAWAY), stop every stream, close."""
        self._in_receive = False
        data = self.conn.data_to_send()
        transport = self.transport
        if data and transport is not None and not self._closed:
            transport.write(data)
        self._starting = []
        self._lose_streams()
        self._close()

    # --- lifecycle --------------------------------------------------------------------------

    def drain(self) -> None:
        """Shutdown or a retired listener: GOAWAY, let the open streams finish, then close.

        h2's own close_connection would refuse every later frame of the open streams, so the
        GOAWAY is written here, past h2, and later streams are refused by id."""
        if self._goaway is not None or self._closed:
            return
        self._goaway = last = self.conn.highest_inbound_stream_id
        frame = GoAwayFrame(0, last_stream_id=last, error_code=0)
        self.flush()
        if self.transport is not None and not self._closed:
            self.transport.write(frame.serialize())
        if not self.streams:
            self._close()

    def abort(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        if not self._closed and self.transport is not None:
            self.flush()  # what the last stream queued leaves first
            self._closed = True
            self.transport.close()

    def check_deadline(self, now: float) -> None:
        """Called by the gateway's ticker: idle connection, slow request bodies, closed windows."""
        if self._closed:
            return
        if self._deadline and now >= self._deadline and not self.streams:
            self._deadline = 0.0
            self.drain()
            return
        for stream in list(self.streams.values()):
            if stream.send_deadline and now >= stream.send_deadline:
                # The client left its window closed for the whole send timeout.
                exchange = stream.exchange
                self.reset_stream(stream, ErrorCodes.CANCEL)
                if exchange is not None:
                    exchange.on_client_lost()
                stream._maybe_retire()
                if stream.exchange_done:
                    self.forget(stream)
            elif stream.receiving and stream.body_deadline and now >= stream.body_deadline:
                if stream.read_pauses:
                    stream.body_deadline = now + self.settings.timeouts.body
                    continue
                stream.body_deadline = 0.0
                stream.discarding = True
                exchange = stream.exchange
                if exchange is not None:
                    exchange.on_client_error(BadRequest("The client sent the request body too slowly."))
                else:
                    self.reset_stream(stream, ErrorCodes.CANCEL)
                    self.forget(stream)
        self.write_out()

    def statistics(self) -> dict[str, Any]:
        transport = self.transport
        return {
            "requests": self.requests,
            "streams": len(self.streams),
            "blocked_streams": len(self._blocked),
            "buffered_bytes": sum(stream.out_size for stream in self.streams.values()),
            "unsent_bytes": transport.get_write_buffer_size() if transport is not None else 0,
        }


_HANDLERS: dict[type, Callable[[H2Server, Any], None]] = {
    h2.events.RequestReceived: H2Server._on_request,
    h2.events.DataReceived: H2Server._on_data,
    h2.events.TrailersReceived: H2Server._on_trailers,
    h2.events.StreamEnded: H2Server._on_stream_ended,
    h2.events.StreamReset: H2Server._on_reset,
    h2.events.WindowUpdated: H2Server._on_window,
    h2.events.RemoteSettingsChanged: H2Server._on_settings,
    h2.events.PingReceived: H2Server._on_control,
    h2.events.PriorityUpdated: H2Server._on_control,
    h2.events.UnknownFrameReceived: H2Server._on_control,
    h2.events.ConnectionTerminated: H2Server._on_goaway,
}
