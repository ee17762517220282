"""A raw HTTP/2 client for the attack tests: h2's client-side connection over a plain socket,
plus hand-made frames (hyperframe) for what a well-behaved client would never send."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
from h2.connection import ConnectionInputs, ConnectionState
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, SettingsFrame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class RawH2:
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

    def wait_closed(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.timeout)
        while self.read(0.2):
            if time.monotonic() > deadline:
                raise AssertionError("the gateway did not close the connection")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class FrameClient:
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

    def wait_closed(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.timeout)
        while self.read(0.2):
            if time.monotonic() > deadline:
                raise AssertionError("the gateway did not close the connection")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> FrameClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
