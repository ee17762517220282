"""Adversarial HTTP/1.1 peers for tests: a scripted origin and a raw client.

Why: the gateway's hardest bugs hide in timing and framing (a 1xx before the final response,
a body that arrives a second after its head, bytes after a complete response). A well-behaved
origin never produces those and http.client hides them, so both peers here speak raw bytes:
the origin replies with *timelines* of steps (write, pause, close, reset, read a request) and
the client sees every byte, 1xx interim responses included.

    origin = ScriptedOrigin(reply=lambda req: [Write(b"HTTP/1.1 103 Early Hints\\r\\n\\r\\n"),
                                               Pause(0.3), Write(http_response(200, b"ok"))])
    with RawClient(port) as client:
        client.send(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        response = client.read_response()   # response.interim holds the 103

Both run on plain blocking sockets: the origin has one thread per connection, which keeps a
timeline a straight-line loop and lets `stop()` end everything in bounded time.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

# --- timeline steps ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    """Send these bytes in one write."""

    data: bytes


@dataclass(frozen=True)
class Pause:
    """Wait (interrupted by `stop()`)."""

    seconds: float


@dataclass(frozen=True)
class Close:
    """Half-close (FIN after everything written), then wait for the peer to close too, so
    bytes it sent meanwhile never turn the close into a reset."""


@dataclass(frozen=True)
class Reset:
    """Abort with SO_LINGER 0: the peer sees a TCP RST."""


@dataclass(frozen=True)
class ReadRequest:
    """Wait until one whole request (head, and its Content-Length or chunked body) was read."""


Step = Write | Pause | Close | Reset | ReadRequest


def trickle(data: bytes, rng: random.Random, pieces: int = 4, pauses: Sequence[float] = (0, 0.002)) -> list[Step]:
    """`data` as up to `pieces` writes cut at random offsets, with a random pause from
    `pauses` between writes: heads split mid-line, bodies split mid-chunk."""
    cuts = sorted(rng.sample(range(1, len(data)), min(pieces - 1, len(data) - 1))) if len(data) > 1 else []
    steps: list[Step] = []
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        if steps:
            steps.append(Pause(rng.choice(pauses)))
        steps.append(Write(data[start:end]))
    return steps


def byte_by_byte(data: bytes, pause: float = 0.001) -> list[Step]:
    """One write per byte, `pause` apart."""
    steps: list[Step] = []
    for i in range(len(data)):
        if steps:
            steps.append(Pause(pause))
        steps.append(Write(data[i : i + 1]))
    return steps


def http_response(status: int, body: bytes = b"", *headers: tuple[str, str], reason: str = "X") -> bytes:
    """A response framed by Content-Length (omitted for 1xx, 204 and 304)."""
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{name}: {value}" for name, value in headers)]
    if not (100 <= status < 200 or status in (204, 304)):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --- messages ---------------------------------------------------------------------------------


class PeerClosed(Exception):
    """The peer closed (FIN) or reset (RST) the connection before a whole message arrived."""

    def __init__(self, data: bytes, reset: bool) -> None:
        super().__init__(f"peer {'reset' if reset else 'closed'} the connection; unread: {data[:200]!r}")
        self.data = data
        self.reset = reset


class BadMessage(Exception):
    """The peer sent bytes that are not valid HTTP/1.1 framing."""


@dataclass
class _Headed:
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        """The first value of a field (names compare case-insensitively)."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


@dataclass
class Head(_Headed):
    """A response head: a 1xx interim response, or the head of the final one."""

    version: str
    status: int
    reason: str


@dataclass
class Response(Head):
    """A final response, with the interim (1xx) responses that came before it."""

    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    interim: list[Head] = field(default_factory=list)


@dataclass
class Request(_Headed):
    """A request as the origin read it; `connection` is the accept index, `number` its order on it."""

    method: str
    target: str
    version: str
    body: bytes
    trailers: list[tuple[str, str]]
    connection: int
    number: int


def _parse_head(raw: bytes) -> tuple[list[str], list[tuple[str, str]]]:
    """The start line's three parts and the header fields."""
    start, *lines = raw.decode("latin-1").split("\r\n")
    parts = start.split(" ", 2)
    if len(parts) < 2:
        raise BadMessage(f"bad start line: {start!r}")
    headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadMessage(f"bad header line: {line!r}")
        headers.append((name, value.strip()))
    return parts, headers


def _chunked(headed: _Headed) -> bool:
    return (headed.header("transfer-encoding") or "").lower().endswith("chunked")


class _Reader:
    """Buffered reads from a socket, each bounded by a deadline; every byte read goes to `log`."""

    def __init__(self, sock: socket.socket, log: bytearray) -> None:
        self.sock = sock
        self.log = log
        self.buf = bytearray()
        self.closed = False

    def fill(self, deadline: float) -> None:
        """Read once more; TimeoutError past the deadline, PeerClosed at FIN or RST."""
        if self.closed:
            raise PeerClosed(bytes(self.buf), reset=False)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"nothing more within the deadline; unread: {bytes(self.buf[:200])!r}")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError(f"nothing more within the deadline; unread: {bytes(self.buf[:200])!r}") from None
        except ConnectionResetError:
            self.closed = True
            raise PeerClosed(bytes(self.buf), reset=True) from None
        if not data:
            self.closed = True
            raise PeerClosed(bytes(self.buf), reset=False)
        self.log += data
        self.buf += data

    def until(self, delimiter: bytes, deadline: float, limit: int = 1 << 20) -> bytes:
        """Bytes up to `delimiter` (consumed, not returned)."""
        while (index := self.buf.find(delimiter)) < 0:
            if len(self.buf) > limit:
                raise BadMessage(f"no {delimiter!r} in {limit} bytes")
            self.fill(deadline)
        data = bytes(self.buf[:index])
        del self.buf[: index + len(delimiter)]
        return data

    def exact(self, size: int, deadline: float) -> bytes:
        while len(self.buf) < size:
            self.fill(deadline)
        data = bytes(self.buf[:size])
        del self.buf[:size]
        return data

    def rest(self, deadline: float) -> bytes:
        """Everything until the peer closes (a close-delimited body)."""
        try:
            while True:
                self.fill(deadline)
        except PeerClosed:
            pass
        data = bytes(self.buf)
        self.buf.clear()
        return data

    def chunked(self, deadline: float) -> tuple[bytes, list[tuple[str, str]]]:
        """A chunked body (extensions ignored) and its trailer fields."""
        body = bytearray()
        while True:
            line = self.until(b"\r\n", deadline)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadMessage(f"bad chunk size line: {line!r}") from None
            if size == 0:
                break
            body += self.exact(size, deadline)
            if self.exact(2, deadline) != b"\r\n":
                raise BadMessage("chunk data not followed by CRLF")
        trailers = []
        while line := self.until(b"\r\n", deadline):
            name, _, value = line.decode("latin-1").partition(":")
            trailers.append((name, value.strip()))
        return bytes(body), trailers


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll `predicate` until it is true; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# --- the raw client ---------------------------------------------------------------------------


class RawClient:
    """One TCP connection to `port` that sends exact bytes and parses responses strictly.

    `received` holds every byte ever read, so a test can check that nothing foreign arrived.
    """

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.received = bytearray()
        self._reader = _Reader(self.sock, self.received)

    @property
    def closed(self) -> bool:
        """The server closed or reset the connection (seen by a read)."""
        return self._reader.closed

    def send(self, data: bytes, piece: int = 0, pause: float = 0.0) -> None:
        """Send `data`; with `piece`, that many bytes per write, `pause` seconds apart (trickling)."""
        size = piece or len(data) or 1
        for start in range(0, len(data), size):
            if start and pause:
                time.sleep(pause)
            self.sock.sendall(data[start : start + size])

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def read_head(self, timeout: float | None = None) -> Head:
        """The next response head (1xx or final); its body, if any, is still unread."""
        parts, headers = _parse_head(self._reader.until(b"\r\n\r\n", self._deadline(timeout)))
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise BadMessage(f"bad status line: {parts!r}")
        return Head(headers, parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "")

    def read_body(self, head: Head, method: str = "GET", timeout: float | None = None) -> Response:
        """The body framed by `head` (Content-Length, chunked, or until close)."""
        deadline = self._deadline(timeout)
        response = Response(head.headers, head.version, head.status, head.reason)
        length = head.header("content-length")
        try:
            if method == "HEAD" or head.status < 200 or head.status in (204, 304):
                pass
            elif _chunked(head):
                response.body, response.trailers = self._reader.chunked(deadline)
            elif length is not None:
                if not length.isdigit():
                    raise BadMessage(f"bad Content-Length: {length!r}")
                response.body = self._reader.exact(int(length), deadline)
            else:
                response.body = self._reader.rest(deadline)
        except TimeoutError as exc:
            framing = "chunked" if _chunked(head) else f"Content-Length {length}"
            raise TimeoutError(f"the body of a {head.status} response ({framing}) never completed; {exc}") from None
        return response

    def read_response(self, method: str = "GET", timeout: float | None = None) -> Response:
        """Exactly one final response; the 1xx responses before it land in `.interim`."""
        deadline = self._deadline(timeout)
        interim = []
        while (head := self.read_head(deadline - time.monotonic())).status < 200:
            interim.append(head)
        response = self.read_body(head, method, deadline - time.monotonic())
        response.interim = interim
        return response

    def read_available(self, wait: float = 0.2) -> bytes:
        """Whatever arrives within `wait` seconds (stops early at close; see `closed`)."""
        deadline = time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                self._reader.fill(deadline)
        except (TimeoutError, PeerClosed):
            pass
        data = bytes(self._reader.buf)
        self._reader.buf.clear()
        return data

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


# --- the scripted origin ----------------------------------------------------------------------

Replier = Callable[[Request], Sequence[Step]]


class ScriptedOrigin:
    """A raw TCP origin on 127.0.0.1 whose answers are timelines of steps.

    - `connections[i]` is the timeline of the i-th accepted connection (0-based); it reads
      requests only where it has `ReadRequest` steps.
    - `reply` answers each further request on a connection (after its timeline, or from the
      start): the origin reads a request, then runs `reply` (a fixed timeline, or a function
      of the request), and again, until the peer closes or a step closes.
    - Without `reply`, a connection whose timeline ended is held open, its bytes recorded.

    It records `raw` (bytes received, per connection), `requests` (parsed, in arrival order)
    and `connections` (accepted so far). A `reply` function that raises ends its connection and
    lands in `errors` (the `scripted_origin` fixture fails the test on any).
    """

    def __init__(
        self,
        reply: Sequence[Step] | Replier | None = None,
        connections: Sequence[Sequence[Step]] = (),
        read_timeout: float = 10.0,
    ) -> None:
        self.reply = reply
        self.timelines = [list(t) for t in connections]
        self.read_timeout = read_timeout
        self.raw: list[bytearray] = []
        self.requests: list[Request] = []
        self.errors: list[BaseException] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept, name="scripted-origin", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        return len(self.raw)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # stop() shut the listener down
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    return
                index = len(self.raw)
                self.raw.append(bytearray())
                self._open.add(sock)
                thread = threading.Thread(target=self._serve, args=(sock, index), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, index: int) -> None:
        reader = _Reader(sock, self.raw[index])
        steps: deque[Step] = deque(self.timelines[index] if index < len(self.timelines) else ())
        number = 0
        try:
            while True:
                if not steps:
                    if self.reply is None:
                        reader.rest(time.monotonic() + self.read_timeout)  # hold, recording
                        return
                    request = self._read(reader, index, number)
                    number += 1
                    steps.extend(self.reply(request) if callable(self.reply) else self.reply)
                    continue
                step = steps.popleft()
                if isinstance(step, Write):
                    sock.sendall(step.data)
                elif isinstance(step, Pause):
                    if self._stopping.wait(step.seconds):
                        return
                elif isinstance(step, ReadRequest):
                    self._read(reader, index, number)
                    number += 1
                elif isinstance(step, Close):
                    sock.shutdown(socket.SHUT_WR)
                    reader.rest(time.monotonic() + min(self.read_timeout, 2.0))
                    return
                else:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
        except (OSError, PeerClosed, TimeoutError, BadMessage):
            return  # the peer went away or misbehaved: this connection is over
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            with self._lock:
                self._open.discard(sock)
            sock.close()

    def _read(self, reader: _Reader, index: int, number: int) -> Request:
        deadline = time.monotonic() + self.read_timeout
        parts, headers = _parse_head(reader.until(b"\r\n\r\n", deadline))
        request = Request(headers, parts[0], parts[1], parts[2] if len(parts) > 2 else "", b"", [], index, number)
        length = request.header("content-length")
        if _chunked(request):
            request.body, request.trailers = reader.chunked(deadline)
        elif length is not None:
            request.body = reader.exact(int(length), deadline)
        self.requests.append(request)
        return request

    def stop(self, timeout: float = 3.0) -> None:
        """Stop accepting, cut every connection, join the threads. Safe to call twice."""
        self._stopping.set()
        for sock in [self._listener, *self._open_sockets()]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() or recv()
        self._listener.close()
        deadline = time.monotonic() + timeout
        self._acceptor.join(timeout)
        for thread in self._threads:  # no new ones: the acceptor has ended
            thread.join(max(0.0, deadline - time.monotonic()))

    def _open_sockets(self) -> list[socket.socket]:
        with self._lock:
            return list(self._open)

    def __enter__(self) -> ScriptedOrigin:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
