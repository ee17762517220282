"""HTTP/2 test kit, two halves (merged from the h2 server and h2 upstream branches).

Client side: A raw HTTP/2 client for the attack tests: h2's client-side connection over a plain socket,
plus hand-made frames (hyperframe) for what a well-behaved client would never send.

Origin side: An HTTP/2 origin for tests (h2c, or h2 over TLS), written with the h2 library's server side.

It runs its own asyncio loop in a thread and answers by path:

- `/big?size=N`: N bytes of b"x", sent as fast as the gateway's windows allow;
- `/echo-body`: the request body back, streamed as it arrives;
- `/trailers`: a small body and trailers (`x-checksum: abc`, `x-count: 2`);
- `/reset-mid`: the head and some body, then RST_STREAM INTERNAL_ERROR;
- `/close-early`: the connection is closed before any answer;
- `/drip`: the head and `first;`, then `second` once the test sets `gate`;
- `/short-body`: content-length 100, then 10 bytes and the end of the stream;
- `/early`: a 413 before reading the body, then RST_STREAM NO_ERROR;
- `/huge-head`: a response head of 70 kB (HEADERS and CONTINUATION frames);
- `/evil-header`: a response field whose value holds CR LF and another field;
- `/reset-early`: RST_STREAM INTERNAL_ERROR before any head;
- `/close-mid`: the head and some body, then the connection is closed;
- `/hang`: never answers;
- `/refuse-late`: RST_STREAM REFUSED_STREAM once 100000 bytes of body arrived;
- `/no-read...`: never gives window back for the request body (an upload the target stalls);
- `/interim`: a 103 Early Hints, then the final response;
- anything else: JSON of what arrived (method, path, scheme, authority, headers, body size
  and sha256), after `delay` seconds (`?delay=S` overrides it for one request).

Knobs: `max_streams` (SETTINGS_MAX_CONCURRENT_STREAMS), `goaway_after=(heads, keep)` (on
the first connection, once `heads` request heads arrived: GOAWAY whose last_stream_id is the
`keep`-th stream's; streams above it are dropped unanswered, the ones at or below it are
answered, then the connection closes),
`refuse` (RST_STREAM REFUSED_STREAM for that many first streams), `settings_delay` (seconds
before its SETTINGS: a connection that is slow to open), `goaway_error` (at the second
request head: GOAWAY INTERNAL_ERROR with that stream as the last, answering nothing more),
`goaway_at_start` (GOAWAY right behind its SETTINGS: a connection that takes no stream). It records connections,
every completed request (`done`), the most streams open at once on one connection, and
the bytes each `/big` response has sent so far (`sent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
from h2.config import H2Configuration
from h2.connection import ConnectionInputs, ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, SettingsFrame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _Connected:
    """What both test clients do with their socket: wait for the gateway to close it, close it."""

    sock: socket.socket
    timeout: float

    def read(self, wait: float = 0.2) -> bool:
        raise NotImplementedError

    def wait_closed(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.timeout)
        while self.read(0.2):
            if time.monotonic() > deadline:
                raise AssertionError("the gateway did not close the connection")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class RawH2(_Connected):
    """An HTTP/2 client connection on 127.0.0.1 (prior knowledge) that records every event."""

    def __init__(
        self, port: int, timeout: float = 5.0, settings: dict[int, int] | None = None, auto_ack: bool = True
    ) -> None:
        """`auto_ack`: re-open the windows as response data arrives (False: a client that never does)."""
        self.auto_ack = auto_ack
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self.conn = h2.connection.H2Connection(config)
        if settings:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)  # type: ignore[arg-type]
        # h2 takes no frame after a GOAWAY; HTTP/2 lets the streams it names finish (a graceful
        # drain). Keep the client open on a GOAWAY so those streams can be read to their end.
        machine = self.conn.state_machine
        machine._transitions = {  # type: ignore[misc]
            **machine._transitions,
            (ConnectionState.CLIENT_OPEN, ConnectionInputs.RECV_GOAWAY): (None, ConnectionState.CLIENT_OPEN),
        }
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.closed = False
        self.received = 0  # bytes read from the gateway
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        path: str = "/",
        method: str = "GET",
        extra: list[tuple[bytes, bytes]] | None = None,
        end: bool = True,
        authority: bytes = b"example.com",
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(b":method", method.encode()), (b":path", path.encode()), (b":scheme", b"http")]
        headers.append((b":authority", authority))
        self.conn.send_headers(stream_id, headers + (extra or []), end_stream=end)
        self.flush()
        return stream_id

    def read(self, wait: float = 0.2) -> bool:
        """Read what arrives within `wait` seconds; False once the gateway closed."""
        if self.closed:
            return False
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        except OSError:
            self.closed = True
            return False
        if not data:
            self.closed = True
            return False
        self.received += len(data)
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return False
        self.events += events
        if self.auto_ack:
            for event in events:
                if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                    with contextlib.suppress(h2.exceptions.H2Error):
                        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.flush_quietly()
        return True

    def flush_quietly(self) -> None:
        with contextlib.suppress(OSError):
            self.flush()

    def until(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met; events: {self.events[-10:]!r}")
            if not self.read() and not predicate():
                raise AssertionError(f"connection closed; events: {self.events[-10:]!r}")

    def of(self, kind: type, stream_id: int | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind) and (stream_id is None or getattr(e, "stream_id", 0) == stream_id)
        ]

    def response(self, stream_id: int, timeout: float | None = None) -> tuple[int, dict[bytes, bytes], bytes]:
        """Wait for the stream to end: (status, headers, body)."""
        ended = h2.events.StreamEnded, h2.events.StreamReset
        self.until(lambda: any(self.of(kind, stream_id) for kind in ended), timeout)
        (head,) = self.of(h2.events.ResponseReceived, stream_id)
        headers = dict(head.headers)
        body = b"".join(e.data for e in self.of(h2.events.DataReceived, stream_id))
        return int(headers[b":status"]), headers, body

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        found = self.of(h2.events.ConnectionTerminated)
        return found[0] if found else None


class FrameClient(_Connected):
    """HTTP/2 as raw frames (hyperframe), for what no client library would send. It encodes
    header blocks with its own HPACK encoder and parses whatever the gateway sends back."""

    def __init__(self, port: int, timeout: float = 5.0, settings: dict[int, int] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.encoder = hpack.Encoder()
        self.frames: list[Frame] = []
        self.closed = False
        self._buffer = b""
        hello = SettingsFrame(0)
        for key, value in (settings or {}).items():
            hello.settings[key] = value
        self.sock.sendall(PREFACE + hello.serialize())

    def block(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        return bytes(self.encoder.encode(headers))

    def send(self, *frames: Frame) -> None:
        self.sock.sendall(b"".join(frame.serialize() for frame in frames))

    def headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool = True) -> None:
        flags = ["END_HEADERS", "END_STREAM"] if end_stream else ["END_HEADERS"]
        self.send(HeadersFrame(stream_id, data=self.block(headers), flags=flags))

    def read(self, wait: float = 0.2) -> bool:
        if self.closed:
            return False
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        except OSError:
            self.closed = True
            return False
        if not data:
            self.closed = True
            return False
        self._buffer += data
        while len(self._buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self._buffer[:9]))
            if len(self._buffer) < 9 + length:
                break
            frame.parse_body(memoryview(self._buffer[9 : 9 + length]))
            self._buffer = self._buffer[9 + length :]
            self.frames.append(frame)
            if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                with contextlib.suppress(OSError):
                    self.send(SettingsFrame(0, flags=["ACK"]))
        return True

    def until(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline or (not self.read() and not predicate()):
                raise AssertionError(f"condition not met; frames: {self.frames[-10:]!r}")

    def of(self, kind: type, stream_id: int | None = None) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind) and (stream_id is None or f.stream_id == stream_id)]

    def goaway(self) -> GoAwayFrame | None:
        found = self.of(GoAwayFrame)
        return found[0] if found else None


class _Stream:
    def __init__(self, stream_id: int, headers: dict[bytes, bytes], all_headers: list[tuple[bytes, bytes]]) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.all_headers = all_headers
        self.body = bytearray()
        self.trailers: list[tuple[bytes, bytes]] = []
        self.task: asyncio.Task[None] | None = None
        self.ended = asyncio.Event()
        self.data = asyncio.Queue[bytes | None]()


class _Conn(asyncio.Protocol):
    def __init__(self, origin: H2Origin, index: int) -> None:
        self.origin = origin
        self.index = index
        config = H2Configuration(client_side=False, header_encoding=None, validate_outbound_headers=False)
        self.h2 = H2Connection(config)  # unchecked: it may send what a broken server would
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.window = asyncio.Event()
        self.heads = 0
        self.last_stream_id: int | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.answered: set[int] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.origin.settings_delay:
            asyncio.get_running_loop().call_later(self.origin.settings_delay, self._begin)
        else:
            self._begin()

    def _begin(self) -> None:
        settings: dict[int, int] = {SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20}
        if self.origin.max_streams is not None:
            settings[SettingCodes.MAX_CONCURRENT_STREAMS] = self.origin.max_streams
        self.h2.initiate_connection()
        self.h2.update_settings(settings)
        self.h2.increment_flow_control_window(8 << 20)
        if self.origin.goaway_at_start:
            self.h2.close_connection(last_stream_id=0)
            self.last_stream_id = 0  # streams that still come are dropped unanswered
            self.h2.state_machine.state = ConnectionState.SERVER_OPEN  # still read the gateway's frames
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            self.origin.errors.append(f"protocol error: {exc}")
            self.flush()
            assert self.transport is not None
            self.transport.close()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self._request(event.stream_id, event.headers or [])
            elif isinstance(event, DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is None or not stream.headers.get(b":path", b"").startswith(b"/no-read"):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if stream is not None:
                    stream.body += event.data or b""
                    stream.data.put_nowait(event.data or b"")
                    if stream.headers.get(b":path") == b"/refuse-late" and len(stream.body) >= 100_000:
                        self._refuse_late(stream)
            elif isinstance(event, StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.ended.set()
                    stream.data.put_nowait(None)
            elif isinstance(event, StreamReset):
                self.origin.resets.append(event.error_code)
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.ended.set()
                    stream.data.put_nowait(None)
            elif isinstance(event, TrailersReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.trailers = [(bytes(k), bytes(v)) for k, v in event.headers or []]
            elif isinstance(event, WindowUpdated):
                self.window.set()
            elif isinstance(event, ConnectionTerminated):
                pass
        self.flush()

    def _refuse_late(self, stream: _Stream) -> None:
        if stream.stream_id in self.answered:
            return
        self.answered.add(stream.stream_id)
        self.origin.refused += 1
        if stream.task is not None:
            stream.task.cancel()
        self.h2.reset_stream(stream.stream_id, ErrorCodes.REFUSED_STREAM)

    def connection_lost(self, exc: Exception | None) -> None:
        self.origin.closed += 1
        for task in self.tasks:
            task.cancel()
        self.window.set()

    def _request(self, stream_id: int, raw: list[tuple[bytes, bytes]]) -> None:
        origin = self.origin
        self.heads += 1
        open_now = sum(1 for sid in self.streams if sid not in self.answered) + 1
        origin.most_streams = max(origin.most_streams, open_now)
        headers = {bytes(k): bytes(v) for k, v in raw}
        origin.paths.append(headers.get(b":path", b""))
        stream = self.streams[stream_id] = _Stream(stream_id, headers, [(bytes(k), bytes(v)) for k, v in raw])
        if self.last_stream_id is not None and stream_id > self.last_stream_id:
            origin.ignored += 1
            return  # after our GOAWAY: never processed
        if origin.refuse > 0:
            origin.refuse -= 1
            origin.refused += 1
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            self.answered.add(stream_id)
            return
        if origin.goaway_error and self.heads == 2:
            self.h2.close_connection(error_code=ErrorCodes.INTERNAL_ERROR, last_stream_id=stream_id)
            self.h2.state_machine.state = ConnectionState.SERVER_OPEN  # still read the gateway's frames
            self.flush()
            return
        if origin.goaway_after is not None and self.index == 0 and self.heads == origin.goaway_after[0]:
            keep = origin.goaway_after[1]
            last = self.last_stream_id = sorted(self.streams)[keep - 1] if keep else 0
            self.h2.close_connection(error_code=ErrorCodes.NO_ERROR, last_stream_id=last)
            self.h2.state_machine.state = ConnectionState.SERVER_OPEN  # let streams <= last finish
            for sid, other in self.streams.items():
                if sid > last:
                    origin.ignored += 1
                    if other.task is not None:
                        other.task.cancel()
            self.flush()
            if stream_id > last:
                return
        task = stream.task = asyncio.get_running_loop().create_task(self._answer(stream))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        """Send within the windows, waiting for WINDOW_UPDATE as needed."""
        origin = self.origin
        view = memoryview(data)
        while view:
            window = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            if window <= 0:
                self.window.clear()
                await self.window.wait()
                continue
            piece, view = view[:window], view[window:]
            self.h2.send_data(stream_id, bytes(piece))
            origin.sent[stream_id] = origin.sent.get(stream_id, 0) + len(piece)
            self.flush()
            await asyncio.sleep(0)
        if end:
            self.h2.end_stream(stream_id)
            self.flush()

    async def _answer(self, stream: _Stream) -> None:
        h2 = self.h2
        sid = stream.stream_id
        path = stream.headers.get(b":path", b"/").decode()
        url = urllib.parse.urlsplit(path)
        query = dict(urllib.parse.parse_qsl(url.query))
        route = url.path
        try:
            if route == "/hang":
                await asyncio.Event().wait()
            if route == "/close-early":
                assert self.transport is not None
                self.transport.close()
                return
            if route == "/drip":
                h2.send_headers(sid, [(b":status", b"200")])
                await self._send(sid, b"first;")
                released = await asyncio.get_running_loop().run_in_executor(None, self.origin.gate.wait, 10)
                await self._send(sid, b"second" if released else b"never released", end=True)
                self._finished(stream)
                return
            if route == "/short-body":
                h2.send_headers(sid, [(b":status", b"200"), (b"content-length", b"100")])
                h2.send_data(sid, b"only ten b", end_stream=True)
                self.flush()
                return
            if route == "/early":
                body = b"too large"
                h2.send_headers(sid, [(b":status", b"413"), (b"content-length", str(len(body)).encode())])
                h2.send_data(sid, body, end_stream=True)
                h2.reset_stream(sid, ErrorCodes.NO_ERROR)  # RFC 9113 8.1: stop sending the body
                self.flush()
                return
            if route == "/near-limit-head":  # under HTTP/2's usual 64 KB, over the gateway's 60 KB
                h2.send_headers(sid, [(b":status", b"200"), (b"x-big", b"h" * 63_000)], end_stream=True)
                self.flush()
                return
            if route == "/huge-head":
                h2.send_headers(sid, [(b":status", b"200"), (b"x-big", b"h" * 70_000)], end_stream=True)
                self.flush()
                return
            if route == "/evil-header":
                h2.send_headers(sid, [(b":status", b"200"), (b"x-a", b"1\r\nx-injected: yes")], end_stream=True)
                self.flush()
                return
            if route == "/reset-early":
                h2.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
                self.flush()
                return
            if route == "/echo-body":
                h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/octet-stream")])
                self.flush()
                while True:
                    chunk = await stream.data.get()
                    if chunk is None:
                        break
                    await self._send(sid, chunk)
                h2.end_stream(sid)
                self.flush()
                self._finished(stream)
                return
            await stream.ended.wait()
            delay = float(query.get("delay", self.origin.delay))
            if delay:
                await asyncio.sleep(delay)
            if route == "/big":
                size = int(query["size"])
                head = stream.headers.get(b":method") == b"HEAD"
                h2.send_headers(sid, [(b":status", b"200"), (b"content-length", str(size).encode())], end_stream=head)
                self.flush()
                if head:
                    self._finished(stream)
                    return
                chunk = b"x" * 65536
                left = size
                while left:
                    piece = chunk[: min(left, len(chunk))]
                    await self._send(sid, piece)
                    left -= len(piece)
                h2.end_stream(sid)
                self.flush()
            elif route == "/trailers":
                h2.send_headers(sid, [(b":status", b"200"), (b"trailer", b"x-checksum")])
                await self._send(sid, b"hello ")
                await self._send(sid, b"world")
                h2.send_headers(sid, [(b"x-checksum", b"abc"), (b"x-count", b"2")], end_stream=True)
                self.flush()
            elif route in ("/reset-mid", "/close-mid"):
                h2.send_headers(sid, [(b":status", b"200"), (b"content-length", b"100000")])
                await self._send(sid, b"y" * 1000)
                await asyncio.sleep(0.1)
                if route == "/reset-mid":
                    h2.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
                    self.flush()
                else:
                    assert self.transport is not None
                    self.transport.close()
                return
            elif route == "/interim":
                h2.send_headers(sid, [(b":status", b"103"), (b"link", b"</a.css>; rel=preload")])
                self.flush()
                await asyncio.sleep(0.05)
                await self._json(stream)
            else:
                await self._json(stream)
            self._finished(stream)
        except (ProtocolError, KeyError):
            pass  # the stream was reset by the gateway

    async def _json(self, stream: _Stream) -> None:
        self.origin.done.append((self.index, stream.stream_id, bytes(stream.body)))  # before the client sees it
        h = stream.headers
        info = {
            "method": h.get(b":method", b"").decode(),
            "path": h.get(b":path", b"").decode(),
            "scheme": h.get(b":scheme", b"").decode(),
            "authority": h.get(b":authority", b"").decode(),
            "headers": [[k.decode(), v.decode()] for k, v in stream.all_headers],
            "body_size": len(stream.body),
            "body_sha256": hashlib.sha256(stream.body).hexdigest(),
            "trailers": [[k.decode(), v.decode()] for k, v in stream.trailers],
            "connection": self.index,
            "stream": stream.stream_id,
        }
        body = json.dumps(info).encode()
        self.h2.send_headers(
            stream.stream_id,
            [
                (b":status", b"200"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        )
        await self._send(stream.stream_id, body, end=True)

    def _finished(self, stream: _Stream) -> None:
        self.answered.add(stream.stream_id)
        if self.last_stream_id is not None:
            pending = [sid for sid in self.streams if sid <= self.last_stream_id and sid not in self.answered]
            if not pending and self.transport is not None:
                self.transport.close()


class H2Origin:
    """See the module docstring. `port` is set once it listens; `stop()` ends it."""

    def __init__(
        self,
        tls: ssl.SSLContext | None = None,
        max_streams: int | None = None,
        delay: float = 0.0,
        goaway_after: tuple[int, int] | None = None,
        refuse: int = 0,
        settings_delay: float = 0.0,
        goaway_error: bool = False,
        goaway_at_start: bool = False,
    ) -> None:
        self.tls = tls
        self.max_streams = max_streams
        self.delay = delay
        self.goaway_after = goaway_after
        self.refuse = refuse
        self.settings_delay = settings_delay
        self.goaway_error = goaway_error
        self.goaway_at_start = goaway_at_start
        self.refused = 0
        self.ignored = 0
        self.connections = 0
        self.closed = 0
        self.most_streams = 0
        self.done: list[tuple[int, int, bytes]] = []
        self.paths: list[bytes] = []
        self.gate = threading.Event()  # of every request head, in arrival order
        self.sent: dict[int, int] = {}
        self.resets: list[Any] = []
        self.errors: list[str] = []
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._conns: list[_Conn] = []
        started = threading.Event()
        self._server: asyncio.Server | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self._server = self.loop.run_until_complete(
                self.loop.create_server(self._factory, "127.0.0.1", 0, ssl=self.tls)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="h2-origin", daemon=True)
        self.thread.start()
        started.wait(10)

    def _factory(self) -> _Conn:
        conn = _Conn(self, self.connections)
        self.connections += 1
        self._conns.append(conn)
        return conn

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for conn in self._conns:
                if conn.transport is not None:
                    conn.transport.abort()
            await asyncio.sleep(0)

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def h2_server_context(cert: str, key: str, alpn: tuple[str, ...] = ("h2",)) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(list(alpn))
    return context
