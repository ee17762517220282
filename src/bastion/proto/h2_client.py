"""HTTP/2 toward a target (RFC 9113): one connection carrying many request streams.

`H2ClientConnection` is the asyncio protocol of one connection, driven by the `h2` state
machine; `H2Stream` is one request on it and the `UpstreamStream` of http/streams.py that
the exchange sends on, exactly as on an HTTP/1.1 connection. Events go straight to the
stream's `UpstreamListener`; nothing is collected here.

Flow control is per stream in both directions:

- receiving: a stream whose client is slow (`pause_reading`) stops handing credit back
  (WINDOW_UPDATE) for that stream only, so the target stops after one stream window
  (`STREAM_WINDOW`) while the connection's other streams go on. The connection window is
  large (`CONNECTION_WINDOW`) so paused streams rarely starve the others.
- sending: request body goes out only within the peer's windows; what does not fit waits
  in the stream and the exchange is told (`upstream_paused`) so it stops reading the client.

A stream the target never processed (GOAWAY above its id, RST_STREAM REFUSED_STREAM) is sent
again on another connection of the pool, body included, while the part of the body sent so
far is small enough to have been kept (`REPLAY_LIMIT`); RFC 9113 section 8.7 makes that safe
for any method.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from h2.config import H2Configuration
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, TooManyStreamsError
from h2.settings import SettingCodes

from bastion.errors import GatewayError, UpstreamConnectError, UpstreamError, UpstreamTimeout
from bastion.http.header_policy import DROP_RESPONSE, MAX_RESPONSE_HEAD
from bastion.http.model import HeaderList, Headers, Response
from bastion.http.streams import UpstreamListener
from bastion.proto.h2_connection import FastSendConnection, QuietFrameBuffer
from bastion.proto.h2_fields import response_parts
from bastion.proto.hpack_in import FastDecoder
from bastion.proto.hpack_out import StatelessEncoder

log = logging.getLogger("bastion.upstream")

STREAM_WINDOW = 256 * 1024
"""Our SETTINGS_INITIAL_WINDOW_SIZE: how far a target may run ahead of a slow client, per stream."""

CONNECTION_WINDOW = 16 * 1024 * 1024
"""Our connection window: room for many paused streams before the others feel it."""

OWN_MAX_STREAMS = 128
"""Streams we open at once on one connection, whatever the target allows."""

REPLAY_LIMIT = 64 * 1024
"""Request body kept until the target answers, to send a refused stream again elsewhere."""

MAX_REPLAYS = 3

# RFC 9113 section 8.2.2: connection-specific fields are not sent in HTTP/2; Host becomes
# :authority; framing is HTTP/2's own (content-length is set from the known length).
_DROP_REQUEST = frozenset(
    (
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"content-length",
    )
)
_TE_TRAILERS = (b"te", b"trailers")


class _ClientH2(FastSendConnection):
    """h2 treats a received GOAWAY as the end of the connection, but RFC 9113 section 6.8 lets
    the streams up to its last_stream_id finish: stay open for them (no new stream is opened)."""

    def _receive_goaway_frame(self, frame: Any) -> Any:
        state = self.state_machine.state
        result = super()._receive_goaway_frame(frame)
        if state is ConnectionState.CLIENT_OPEN or state is ConnectionState.IDLE:  # IDLE: no stream sent yet
            self.state_machine.state = state
        return result


def _config() -> H2Configuration:
    # Outbound fields come from the gateway's parsers (lower-case, trimmed, checked), so h2's
    # per-field checks and normalisation of them are skipped: they cost more than the
    # encoding. Inbound fields are checked by h2_fields.response_parts (the same rules in one
    # pass): a target must not smuggle CR/LF to HTTP/1.1 clients.
    return H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
    )


class H2ClientConnection(asyncio.Protocol):
    """One HTTP/2 connection to a target; the pool (upstream/h2_pool.py) hands out its streams."""

    def __init__(
        self,
        on_lost: Callable[[H2ClientConnection], None],
        on_capacity: Callable[[H2ClientConnection], None],
        scheme: bytes,
        alpn_required: bool,
    ) -> None:
        self.on_lost = on_lost  # the pool's bookkeeping, told once when the connection closes
        self.on_capacity = on_capacity  # a stream slot freed (or the peer allowed more streams)
        self.scheme = scheme
        self.alpn_required = alpn_required
        self.h2 = _ClientH2(config=_config())
        # Stateless HPACK toward the target (no dynamic-table search, no Huffman: in pure
        # Python both cost more CPU than the bytes they save on a request head), and the lean
        # decoder for responses (h2 still validates the fields it returns).
        self.h2.encoder = StatelessEncoder()  # type: ignore[assignment]
        self.h2.decoder = FastDecoder(MAX_RESPONSE_HEAD)  # type: ignore[assignment]
        self.h2.incoming_buffer = QuietFrameBuffer(server=False)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.reserved = 0  # streams handed out by the pool, head not sent yet
        self.max_streams = OWN_MAX_STREAMS
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.goaway = False
        self.served = 0
        self.idle_since = 0.0
        self.epoch = 0  # the pool's TLS settings it was made under (set by the pool)
        self.write_paused = False
        self.blocked: set[H2Stream] = set()  # streams with body waiting for window
        self._first_bytes = b""
        self.peer: Any = None
        self._flush_pending = False
        self._loop = asyncio.get_running_loop()

    # --- what the pool asks ---------------------------------------------------------------

    def in_use(self) -> int:
        return self.reserved + len(self.streams)

    def is_available(self) -> bool:
        """Can take one more stream now."""
        return not self.closed and not self.goaway and self.ready.done() and self.in_use() < self.max_streams

    def is_closed(self) -> bool:
        return self.closed

    def close(self) -> None:
        """Close now: GOAWAY, then the transport; streams still open fail."""
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            try:
                self.h2.close_connection()
                self.write_now()
            except ProtocolError:
                pass
            self.transport.close()

    def abort(self, error: GatewayError) -> None:
        """The connection is unusable: fail its streams and drop it."""
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # retrieved: a failed connect nobody waited on is not an error
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def flush(self) -> None:
        """Write what h2 has queued at the end of this loop turn: the frames of every stream
        that moved in the meantime go out in one write."""
        if not self._flush_pending and self.transport is not None:
            self._flush_pending = True
            self._loop.call_soon(self.write_now)

    def write_now(self) -> None:
        self._flush_pending = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def open_stream(
        self, stream: H2Stream, headers: HeaderList, end_stream: bool, method: bytes, authority: bytes
    ) -> None:
        """Send a reserved stream's head (stream ids must go out in order: allocated here)."""
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.fast_open(stream_id, headers, end_stream, method, authority, len(self.streams))
        self.reserved -= 1
        self.streams[stream_id] = stream
        stream.stream_id = stream_id

    def release_slot(self, stream: H2Stream) -> None:
        """A stream is done with this connection: its slot is free (a reservation or a stream)."""
        if not stream.has_slot:
            return
        stream.has_slot = False
        if stream.stream_id:
            self.streams.pop(stream.stream_id, None)
        else:
            self.reserved -= 1
        self.blocked.discard(stream)
        self.served += 1
        if not self.streams and not self.reserved:
            self.idle_since = asyncio.get_running_loop().time()
            if self.goaway:
                self.close()  # the last stream of a connection the target is closing
        if not self.closed:
            self.on_capacity(self)

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")
        if self.alpn_required:
            ssl_object = transport.get_extra_info("ssl_object")
            chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            if chosen != "h2":
                what = f"selected {chosen}" if chosen else "selected no protocol"
                self.abort(UpstreamConnectError(f"The upstream does not speak HTTP/2 over TLS (ALPN {what}, not h2)."))
                return
        h2 = self.h2
        h2.initiate_connection()
        h2.update_settings(
            {
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.MAX_CONCURRENT_STREAMS: 0,  # the target opens no stream toward us
            }
        )
        h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # closed by us (no stream left) or broken: nothing here is awaited any more
        if self._flush_pending:
            self.write_now()  # h2 drops what is still queued when a GOAWAY arrives
        if not self.ready.done() and not self._first_frame_ok(data):
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            # The class only: h2's text quotes what the target sent, which is not for clients.
            log.info("upstream %s broke HTTP/2: %s", self.peer, exc)
            self._broken(UpstreamError(f"The upstream broke the HTTP/2 protocol ({type(exc).__name__})."))
            return
        streams = self.streams
        for event in events:
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_data(event.data, event.flow_controlled_length)
                elif event.flow_controlled_length:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, ResponseReceived):
                parts = response_parts(event.headers, False, DROP_RESPONSE)
                if parts is None:
                    self._malformed()
                    return
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_response(*parts)
            elif isinstance(event, StreamEnded):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_end()
            elif isinstance(event, TrailersReceived):
                parts = response_parts(event.headers, True, DROP_RESPONSE)
                if parts is None:
                    self._malformed()
                    return
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_trailers(parts[1])
            elif isinstance(event, InformationalResponseReceived):
                parts = response_parts(event.headers, False, DROP_RESPONSE)
                if parts is None:
                    self._malformed()
                    return
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_interim(parts[0], parts[1])
            elif isinstance(event, StreamReset):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_reset(event.error_code)
            elif isinstance(event, WindowUpdated):
                self._window_opened(event.stream_id)
            elif isinstance(event, RemoteSettingsChanged):
                self._settings_changed()
            elif isinstance(event, ConnectionTerminated):
                self._goaway(event.last_stream_id or 0, int(event.error_code or 0))
        if not self.closed:
            self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(UpstreamConnectError("The upstream closed the connection before HTTP/2 began."))
            self.ready.exception()
        streams = list(self.streams.values())
        self.on_lost(self)
        for stream in streams:
            stream.on_connection_lost()
        self.streams.clear()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._window_opened(0)
        self.flush()

    # --- internals -------------------------------------------------------------------------

    def _first_frame_ok(self, data: bytes) -> bool:
        """A server's first frame is SETTINGS (RFC 9113 section 3.4). h2 would wait for the
        whole "frame" an HTTP/1.1 answer seems to announce; tell at once that it is not one."""
        head = self._first_bytes = self._first_bytes + data[: 9 - len(self._first_bytes)]
        if len(head) < 4 or head[3] == 0x4:
            return True
        sample = head.split(b"\r", 1)[0].decode("latin-1", "replace")
        self._broken(UpstreamConnectError(f"The upstream does not speak HTTP/2 (it began with {sample!r})."))
        return False

    def _settings_changed(self) -> None:
        peer = self.h2.remote_settings.max_concurrent_streams
        self.max_streams = max(0, min(OWN_MAX_STREAMS, peer))
        if not self.ready.done():
            self.ready.set_result(None)
        else:
            self._window_opened(0)  # a new initial window size may have opened stream windows
            self.on_capacity(self)

    def _window_opened(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None and stream.waiting_window:
                stream.push()
        elif self.blocked:
            for stream in list(self.blocked):
                stream.push()

    def _goaway(self, last_stream_id: int, error_code: int) -> None:
        self.goaway = True
        if not self.ready.done():
            self.ready.set_exception(UpstreamConnectError("The upstream refused new streams (GOAWAY)."))
            self.ready.exception()
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last_stream_id:
                stream.on_refused()
        if error_code != ErrorCodes.NO_ERROR:
            self._broken(UpstreamError(f"The upstream closed the HTTP/2 connection ({_code_name(error_code)})."))
        elif not self.streams and not self.reserved:
            self.close()

    def _malformed(self) -> None:
        """A field h2 would have refused (h2_fields): the protocol error h2 would have raised."""
        log.info("upstream %s broke HTTP/2: a malformed header field", self.peer)
        self._broken(UpstreamError("The upstream broke the HTTP/2 protocol (ProtocolError)."))

    def _broken(self, error: GatewayError) -> None:
        streams = list(self.streams.values())
        self.abort(error)
        for stream in streams:
            stream.fail(error)


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error code {code}"


class H2Stream:
    """One request on an HTTP/2 connection: the `UpstreamStream` the exchange sends on."""

    __slots__ = (
        "conn",
        "reconnect",
        "stream_id",
        "has_slot",
        "listener",
        "closed",
        "served",
        "waiting_window",
        "_loop",
        "_head",
        "_method",
        "_authority",
        "_pending",
        "_end_pending",
        "_ended",
        "_trailers_out",
        "_replay",
        "_replayed",
        "_attempts",
        "_head_seen",
        "_complete",
        "_trailers",
        "_paused",
        "_owed",
        "_timer",
        "_deadline",
        "_timeout",
        "_task",
    )

    def __init__(
        self, conn: H2ClientConnection, reconnect: Callable[[], Awaitable[H2ClientConnection]] | None = None
    ) -> None:
        self.conn = conn  # a slot on it is reserved for this stream
        self.reconnect = reconnect  # another connection (slot reserved) for a refused stream
        self.stream_id = 0
        self.has_slot = True  # holds one of `conn`'s stream slots (reserved, then its stream)
        self.listener: UpstreamListener | None = None
        self.closed = False
        self.served = conn.served  # > 0: the connection had served before (stale-connection retries)
        self.waiting_window = False
        self._loop = conn._loop
        self._head: HeaderList = []
        self._method = b""
        self._authority = b""
        self._pending: deque[bytes | memoryview] = deque()
        self._end_pending = False
        self._ended = False
        self._trailers_out: HeaderList | None = None
        self._replay: list[bytes] | None = []
        self._replayed = 0
        self._attempts = 0
        self._head_seen = False
        self._complete = False
        self._trailers: HeaderList | None = None
        self._paused = False
        self._owed = 0
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._timeout = 0.0
        self._task: asyncio.Task[None] | None = None  # a refused stream being sent again

    # --- UpstreamStream ----------------------------------------------------------------------

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
        """Send HEADERS (pseudo-headers from the request line and Host), then what body fits."""
        self.listener = listener
        self._timeout = timeout
        authority = b""
        method_bytes = method.encode()
        out: HeaderList = [(b":method", method_bytes), (b":scheme", self.conn.scheme), (b":authority", b"")]
        if method != "CONNECT":
            out.append((b":path", target.encode("latin-1")))
        for item in headers:
            name = item[0]
            if name in _DROP_REQUEST:
                if name == b"host":
                    authority = item[1]
                continue
            out.append(item)
        out[2] = (b":authority", authority)
        out.append(_TE_TRAILERS)  # the gateway takes trailers (gRPC servers require saying so)
        if length is not None:
            out.append((b"content-length", str(length).encode()))
        self._head = out
        self._method = method_bytes
        self._authority = authority
        for chunk in body:
            if chunk:
                self._keep(chunk)
                self._pending.append(chunk)
        self._end_pending = end_stream
        self._start()

    def send_data(self, data: bytes) -> None:
        if self.closed or not data:
            return
        self._keep(data)
        self._pending.append(data)
        if self.stream_id and not self.waiting_window:
            self.push()
            self.conn.flush()

    def send_end(self, trailers: Headers | None) -> None:
        if self.closed:
            return
        if trailers:
            self._trailers_out = [item for item in trailers.items if item[0] not in _DROP_REQUEST]
        self._end_pending = True
        if self.stream_id and not self.waiting_window:
            self.push()
            self.conn.flush()

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        owed, self._owed = self._owed, 0
        if owed and self.stream_id and not self.conn.closed:
            self.conn.h2.acknowledge_received_data(owed, self.stream_id)
            self.conn.flush()

    def abort(self) -> None:
        """The exchange gives up on this stream: RST_STREAM CANCEL (the connection stays)."""
        self.listener = None
        self._reset(ErrorCodes.CANCEL)

    def expect_upgrade(self) -> None:
        """HTTP/2 has no Upgrade (the config refuses WebSocket routes on HTTP/2 upstreams)."""

    def take_over(self) -> tuple[asyncio.Transport, bytes]:
        raise UpstreamError("The upstream switched protocols over HTTP/2, which is not possible.")

    def relay_ended(self) -> None:
        """Never called: an HTTP/2 stream is never taken over by a relay."""

    def release(self) -> None:
        """Back from the exchange: a stream not finished both ways is reset; the slot is freed."""
        self.listener = None
        if self._complete and self._ended:
            self._done()
        else:
            self._reset(ErrorCodes.CANCEL)

    # --- sending -----------------------------------------------------------------------------

    def _keep(self, chunk: bytes) -> None:
        replay = self._replay
        if replay is not None:
            self._replayed += len(chunk)
            if self._replayed > REPLAY_LIMIT:
                self._replay = None  # too much to keep: a refused stream then fails instead
            else:
                replay.append(chunk)

    def _start(self) -> None:
        conn = self.conn
        end_now = self._end_pending and not self._pending and self._trailers_out is None
        if conn.closed or conn.goaway:
            self.on_refused()  # lost between the pool's answer and now: nothing was sent
            return
        try:
            conn.open_stream(self, self._head, end_now, self._method, self._authority)
        except TooManyStreamsError:
            self.on_refused()  # the target lowered its limit after our reservation
            return
        except ProtocolError as exc:
            what = type(exc).__name__
            self.fail(UpstreamError(f"The HTTP/2 connection to the upstream cannot take a request ({what})."))
            return
        if end_now:
            self._end_pending = False
            self._ended = True
            self._arm()
        else:
            self.push()
        conn.flush()

    def push(self) -> None:
        """Send queued body within the windows; the end (and trailers) once all is out."""
        conn = self.conn
        h2 = conn.h2
        stream_id = self.stream_id
        pending = self._pending
        ended_now = False
        try:
            while pending and not conn.write_paused:
                window = h2.local_flow_control_window(stream_id)
                if window <= 0:
                    break
                chunk = pending[0]
                size = min(window, h2.max_outbound_frame_size)
                if len(chunk) > size:  # frames cut from a view: no copy of the rest each time
                    view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
                    h2.fast_data(stream_id, view[:size], False)
                    pending[0] = view[size:]
                else:
                    pending.popleft()
                    # The last chunk carries END_STREAM itself when nothing follows it.
                    last = not pending and self._end_pending and not self._trailers_out
                    h2.fast_data(stream_id, chunk, last)
                    if last:
                        self._end_pending = False
                        self._ended = ended_now = True
            if pending:
                conn.blocked.add(self)
                if not self.waiting_window:
                    self.waiting_window = True
                    if self.listener is not None:
                        self.listener.upstream_paused(True)
                return
            if self.waiting_window:
                self.waiting_window = False
                conn.blocked.discard(self)
                if self.listener is not None:
                    self.listener.upstream_paused(False)
            if self._end_pending:
                self._end_pending = False
                trailers = self._trailers_out
                if trailers:
                    h2.fast_headers(stream_id, trailers, True)
                else:
                    h2.fast_data(stream_id, b"", True)
                self._ended = ended_now = True
            if ended_now:
                self._arm()
                if self._complete:
                    self._done()
        except ProtocolError:
            # The stream was reset or closed under us (the target answered early and reset):
            # what is left of the body has nowhere to go.
            pending.clear()
            self._end_pending = False
            self._ended = True

    # --- receiving (called by the connection) --------------------------------------------------

    def on_interim(self, status: int, headers: HeaderList) -> None:
        self._touch()
        if self.listener is not None and status != 101:
            self.listener.upstream_interim(Response(status, Headers(headers)))

    def on_response(self, status: int, headers: HeaderList, length: int | None) -> None:
        """A response head (checked, hop-by-hop fields out: h2_fields.response_parts)."""
        self._head_seen = True
        self._replay = None  # answered: never sent again
        self._touch()
        if self.listener is not None:
            self.listener.upstream_head(Response(status, Headers(headers)), length)

    def on_data(self, data: bytes, flow: int) -> None:
        self._touch()
        if self.listener is not None:
            self.listener.upstream_data(data)
        if not flow:
            return
        if self._paused and self.listener is not None:
            self._owed += flow  # no credit back until the client reads again
        else:
            self.conn.h2.acknowledge_received_data(flow, self.stream_id)

    def on_trailers(self, trailers: HeaderList) -> None:
        self._trailers = trailers

    def on_end(self) -> None:
        self._complete = True
        self._deadline = 0.0
        listener = self.listener
        trailers = self._trailers
        if self._ended:
            self._done()
        if listener is not None:
            listener.upstream_end(Headers(trailers) if trailers else None, True)

    def on_reset(self, code: int) -> None:
        if self._complete:
            # The response is whole; the target only stops the rest of our body (RFC 9113 8.1).
            self._pending.clear()
            self._end_pending = False
            self._ended = True
            self._done()
            return
        if code == ErrorCodes.REFUSED_STREAM and not self._head_seen:
            self.on_refused()
            return
        self._stop_sending()
        where = "mid-response" if self._head_seen else "without answering"
        self.fail(UpstreamError(f"The upstream reset the stream {where} ({_code_name(code)})."))

    def on_refused(self) -> None:
        """The target did not process this stream (GOAWAY above its id, REFUSED_STREAM)."""
        self.conn.release_slot(self)
        self.stream_id = 0  # body arriving meanwhile is only queued (and kept for the replay)
        if self.listener is None:
            self._done()
            return
        self._attempts += 1
        if self._replay is None or self.reconnect is None or self._attempts > MAX_REPLAYS:
            self.fail(UpstreamError("The upstream refused the stream (HTTP/2 GOAWAY or REFUSED_STREAM)."))
            return
        self._task = self._loop.create_task(self._send_again(self.reconnect))

    def on_connection_lost(self) -> None:
        if self._complete or self.closed:
            return
        if self._head_seen:
            self.fail(UpstreamError("The upstream closed the connection mid-response."))
        else:
            self.fail(UpstreamError("The upstream closed the connection without answering."))

    def fail(self, error: GatewayError) -> None:
        listener = self.listener
        self.listener = None
        self._reset(ErrorCodes.CANCEL)
        if listener is not None:
            listener.upstream_failed(error)

    # --- internals -----------------------------------------------------------------------------

    async def _send_again(self, reconnect: Callable[[], Awaitable[H2ClientConnection]]) -> None:
        try:
            conn = await reconnect()
        except GatewayError as exc:
            self.fail(exc)
            return
        finally:
            self._task = None
        self.conn = conn
        self.has_slot = True
        if self.listener is None or self.closed:  # the exchange gave up meanwhile
            conn.release_slot(self)
            return
        if self._replay is None:  # the body grew past what is kept while we waited
            self.fail(UpstreamError("The upstream refused the stream (HTTP/2 GOAWAY or REFUSED_STREAM)."))
            return
        self.served = conn.served
        self._pending = deque[bytes | memoryview](self._replay)
        self._end_pending = self._end_pending or self._ended
        self._ended = False
        self._start()

    def _stop_sending(self) -> None:
        """The target reset this stream: nothing more may be sent on it."""
        self._pending.clear()
        self._end_pending = False
        self._ended = True
        self._complete = True

    def _reset(self, code: int) -> None:
        if self.closed:
            return
        conn = self.conn
        if self.stream_id and not conn.closed and not (self._complete and self._ended):
            try:
                conn.h2.reset_stream(self.stream_id, code)
                conn.flush()
            except ProtocolError:
                pass  # already closed on the h2 side
        self._done()

    def _done(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._deadline = 0.0
        owed = self._owed
        if owed and self.stream_id and not self.conn.closed:
            # Credit held back for a paused client: the stream is over, but the connection
            # window must get it back or it shrinks for good.
            self._owed = 0
            self.conn.h2.acknowledge_received_data(owed, self.stream_id)
            self.conn.flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.conn.release_slot(self)

    def _touch(self) -> None:
        if self._deadline:
            self._deadline = self._loop.time() + self._timeout

    def _arm(self) -> None:
        """Start the response clock (request fully sent); each frame received pushes it back."""
        if self._complete:
            return
        self._deadline = self._loop.time() + self._timeout
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._deadline or self.closed:
            return
        now = self._loop.time()
        if self._paused:
            self._deadline = now + self._timeout  # we stopped the target ourselves
        if now < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        self.fail(UpstreamTimeout())
