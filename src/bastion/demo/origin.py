"""A small HTTP/1.1 origin server: the demo's upstreams, the integration tests' backends.

How it works: one `_Conn` protocol per connection feeds bytes to an httptools parser. Each
complete request joins a queue and is answered in arrival order, so pipelined requests get
their responses in order. Most answers are written at once; the slow ones (/delay, /bytes,
/stream) run as a task that holds the queue until they finish. Request bodies are counted,
never kept. Streamed responses wait on the transport's pause_writing/resume_writing, so a
slow reader never makes the origin buffer more than the transport's high watermark.

Endpoints (any method unless noted; HEAD gets the same head without a body):

    /plain                 200 "hello" (the smallest response; for benchmarks)
    /healthz               200 "ok", or the status set by POST /admin/health?status=N
    /admin/health          POST ?status=N sets what /healthz answers; GET shows it
    /status/{code}         that status with a small JSON body
    /delay/{ms}            waits, then answers like the echo
    /bytes/{n}             n bytes, chunked, 64 KB per chunk
    /stream/{n}            n chunked JSON lines
    /cookies               two Set-Cookie headers
    /close                 answers with Connection: close, then closes
    /reset                 aborts the connection (RST) without answering
    /garbage               writes bytes that are not HTTP, then closes
    anything else          JSON echo of the request: origin, method, path, headers, body_bytes

Use `Origin` inside an event loop, `start_origin_thread()` from synchronous tests, or
`python -m bastion.demo.origin --port P --name N` as a standalone process.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import http
import json
import signal
import socket
import ssl
import struct
import sys
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar, cast

import httptools

T = TypeVar("T")

CHUNK_SIZE = 64 * 1024
_CHUNK = b"x" * CHUNK_SIZE
_MAX_QUEUED = 32  # pipelined requests waiting for an answer before we stop reading
_NO_BODY_STATUSES = frozenset({204, 304})
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}

_PLAIN_BODY = b"hello"
_PLAIN_KEEP = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
_PLAIN_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
_GARBAGE = b"\x00\xffTHIS IS NOT HTTP\r\n\x7f\x80garbage\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
    b"Connection: close\r\n\r\nbad request\n"
)


class Origin:
    """One origin server. `requests` counts requests answered; `connections` counts accepts."""

    def __init__(self, name: str = "origin") -> None:
        self.name = name
        self.host = "127.0.0.1"
        self.port = 0
        self.requests = 0
        self.connections = 0
        self.health_status = 200
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Conn] = set()

    @property
    def healthy(self) -> bool:
        """What /healthz reports; setting it is the in-process twin of POST /admin/health."""
        return self.health_status < 400

    @healthy.setter
    def healthy(self, value: bool) -> None:
        self.health_status = 200 if value else 503

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    async def start(self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        """Listen on host:port; port 0 picks a free port, readable as `.port` afterwards.
        With `tls`, the origin speaks HTTPS (for tests of TLS toward upstreams)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Conn(self), host, port, reuse_address=True, backlog=1024, ssl=tls
        )
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every open connection. Safe to call twice or before start."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._conns):
            conn.abort()
        await server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost callbacks run

    def buffered_bytes(self) -> int:
        """Bytes waiting in transport write buffers: stays small when backpressure works."""
        return sum(c.transport.get_write_buffer_size() for c in self._conns if c.transport is not None)

    def statistics(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "port": self.port,
            "requests": self.requests,
            "connections": self.connections,
            "open_connections": self.open_connections,
            "health_status": self.health_status,
        }


class _Request:
    __slots__ = ("method", "target", "headers", "body_bytes", "keep_alive", "version")

    def __init__(self) -> None:
        self.method = "GET"
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body_bytes = 0
        self.keep_alive = True
        self.version = "1.1"


class _Conn(asyncio.Protocol):
    """One client connection: parse, queue, answer in order."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.req: _Request | None = None
        self.queue: deque[_Request] = deque()
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.reading_paused = False
        self.upgraded = False
        self.can_write = asyncio.Event()
        self.can_write.set()

    # --- transport events ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses: no isinstance
        self.origin.connections += 1
        self.origin._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.origin._conns.discard(self)
        self.can_write.set()
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        if self.upgraded or self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # We never switch protocols: answer what was asked, then close.
            self.upgraded = True
            if self.queue:
                self.queue[-1].keep_alive = False
        except httptools.HttpParserError:
            if self.task is None and not self.queue:
                self._write(_BAD_REQUEST)
                self._close()
            else:
                self.abort()
            return
        self._dispatch()

    # --- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.req = _Request()

    def on_url(self, url: bytes) -> None:
        assert self.req is not None
        self.req.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.req is not None
        self.req.headers.append((name, value))

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        req.method = self.parser.get_method().decode("ascii", "replace")
        req.version = self.parser.get_http_version()
        req.keep_alive = self.parser.should_keep_alive()
        if req.version == "1.1" and self.task is None and not self.queue:
            for name, value in req.headers:
                if name.lower() == b"expect" and value.lower() == b"100-continue":
                    self._write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        assert self.req is not None
        self.req.body_bytes += len(body)

    def on_message_complete(self) -> None:
        assert self.req is not None
        self.queue.append(self.req)
        self.req = None
        if len(self.queue) > _MAX_QUEUED and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    # --- answering ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Answer queued requests in order until one needs to wait."""
        while self.queue and self.task is None and not self.closed:
            req = self.queue.popleft()
            self.origin.requests += 1
            pending = self._respond(req)
            if pending is not None:
                self.task = asyncio.get_running_loop().create_task(self._finish(pending))
        if self.reading_paused and len(self.queue) <= _MAX_QUEUED // 2 and not self.closed:
            self.reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    async def _finish(self, pending: Coroutine[Any, Any, None]) -> None:
        try:
            await pending
        except ConnectionError:
            self.abort()
        finally:
            self.task = None
        if not self.closed:
            self._dispatch()

    def _respond(self, req: _Request) -> Coroutine[Any, Any, None] | None:
        """Write the answer now, or return the coroutine that will write it."""
        path, _, query = req.target.decode("latin-1").partition("?")
        if path == "/plain":
            if req.method == "HEAD":
                self._send(req, 200, _PLAIN_BODY, "text/plain")
            else:
                self._write(_PLAIN_KEEP if req.keep_alive else _PLAIN_CLOSE)
                if not req.keep_alive:
                    self._close()
            return None
        if path == "/healthz":
            status = self.origin.health_status
            self._send(req, status, b"ok\n" if status < 400 else b"unhealthy\n", "text/plain")
            return None
        if path == "/admin/health":
            self._admin_health(req, query)
            return None
        if path == "/cookies":
            extra = [("Set-Cookie", "session=abc123; Path=/; HttpOnly"), ("Set-Cookie", "theme=dark; Path=/")]
            self._send_json(req, 200, {"origin": self.origin.name, "cookies": ["session", "theme"]}, extra)
            return None
        if path == "/close":
            self._send_json(req, 200, {"origin": self.origin.name, "closing": True}, close=True)
            return None
        if path == "/reset":
            self._reset()
            return None
        if path == "/garbage":
            self._write(_GARBAGE)
            self._close()
            return None
        kind, _, arg = path[1:].partition("/")
        if kind in ("status", "delay", "bytes", "stream") and arg:
            if not arg.isdigit() or len(arg) > 12:
                self._send_json(req, 400, {"origin": self.origin.name, "error": f"not a number: {arg!r}"})
                return None
            number = int(arg)
            if kind == "status":
                self._status(req, number)
                return None
            if kind == "delay":
                return self._delay(req, number)
            if kind == "bytes":
                return self._stream(req, "application/octet-stream", _byte_chunks(number))
            return self._stream(req, "application/x-ndjson", self._json_lines(number))
        self._send_json(req, 200, self._echo(req))
        return None

    def _echo(self, req: _Request) -> dict[str, Any]:
        headers: dict[str, str | list[str]] = {}
        for raw_name, raw_value in req.headers:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            seen = headers.get(name)
            if seen is None:
                headers[name] = value
            elif isinstance(seen, list):
                seen.append(value)
            else:
                headers[name] = [seen, value]
        return {
            "origin": self.origin.name,
            "method": req.method,
            "path": req.target.decode("latin-1"),
            "headers": headers,
            "body_bytes": req.body_bytes,
        }

    def _admin_health(self, req: _Request, query: str) -> None:
        if req.method == "POST":
            params = dict(part.partition("=")[::2] for part in query.split("&") if part)
            status = params.get("status", "")
            if not (status.isdigit() and 200 <= int(status) <= 599):
                self._send_json(req, 400, {"origin": self.origin.name, "error": "status must be 200..599"})
                return
            self.origin.health_status = int(status)
        self._send_json(req, 200, {"origin": self.origin.name, "health_status": self.origin.health_status})

    def _status(self, req: _Request, status: int) -> None:
        if not 200 <= status <= 599:
            self._send_json(req, 400, {"origin": self.origin.name, "error": "status must be 200..599"})
        else:
            self._send_json(req, status, {"origin": self.origin.name, "status": status})

    async def _delay(self, req: _Request, ms: int) -> None:
        await asyncio.sleep(ms / 1000)
        self._send_json(req, 200, {**self._echo(req), "delay_ms": ms})

    def _json_lines(self, count: int) -> Iterator[bytes]:
        name = json.dumps(self.origin.name)
        for index in range(count):
            yield b'{"origin": %s, "line": %d}\n' % (name.encode(), index)

    async def _stream(self, req: _Request, content_type: str, chunks: Iterator[bytes]) -> None:
        """Chunked to HTTP/1.1 clients; to HTTP/1.0 clients, the body runs until close."""
        chunked = req.version == "1.1"
        keep_alive = req.keep_alive and chunked
        headers = [("Content-Type", content_type), ("X-Origin", self.origin.name)]
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        self._write(self._head(req, 200, headers, keep_alive))
        if req.method != "HEAD":
            for chunk in chunks:
                if not self.can_write.is_set():
                    await self.can_write.wait()
                if self.closed:
                    return
                if chunked:
                    self._write(b"%x\r\n" % len(chunk))
                    self._write(chunk)
                    self._write(b"\r\n")
                else:
                    self._write(chunk)
            if chunked:
                self._write(b"0\r\n\r\n")
        if not keep_alive:
            self._close()

    # --- writing ------------------------------------------------------------------------------

    def _head(self, req: _Request, status: int, headers: list[tuple[str, str]], keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
        lines.extend(f"{name}: {value}" for name, value in headers)
        if not keep_alive:
            lines.append("Connection: close")
        elif req.version == "1.0":
            lines.append("Connection: keep-alive")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1")

    def _send(
        self,
        req: _Request,
        status: int,
        body: bytes,
        content_type: str,
        extra: list[tuple[str, str]] | None = None,
        close: bool = False,
    ) -> None:
        keep_alive = req.keep_alive and not close
        headers = [("Content-Type", content_type), ("X-Origin", self.origin.name)]
        if status not in _NO_BODY_STATUSES:
            headers.append(("Content-Length", str(len(body))))
        else:
            body = b""
        if extra:
            headers.extend(extra)
        head = self._head(req, status, headers, keep_alive)
        self._write(head if req.method == "HEAD" else head + body)
        if not keep_alive:
            self._close()

    def _send_json(
        self,
        req: _Request,
        status: int,
        payload: dict[str, Any],
        extra: list[tuple[str, str]] | None = None,
        close: bool = False,
    ) -> None:
        body = json.dumps(payload).encode() + b"\n"
        self._send(req, status, body, "application/json", extra, close)

    def _write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def _close(self) -> None:
        """Close after the buffered bytes are sent; later queued requests are dropped."""
        self.closed = True
        self.queue.clear()
        if self.transport is not None:
            self.transport.close()

    def _reset(self) -> None:
        """Abort with SO_LINGER 0 so the peer sees a TCP RST, not a clean FIN."""
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.abort()

    def abort(self) -> None:
        self.closed = True
        self.queue.clear()
        if self.transport is not None:
            self.transport.abort()


def _byte_chunks(total: int) -> Iterator[bytes]:
    while total > 0:
        size = min(total, CHUNK_SIZE)
        yield _CHUNK if size == CHUNK_SIZE else _CHUNK[:size]
        total -= size


# --- in a background thread (for synchronous tests) ------------------------------------------


class OriginHandle:
    """An `Origin` running on its own event loop in a daemon thread. Use as a context manager."""

    def __init__(self, origin: Origin, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.origin = origin
        self.loop = loop
        self.thread = thread

    @property
    def port(self) -> int:
        return self.origin.port

    @property
    def address(self) -> str:
        """'127.0.0.1:PORT', as a config target address."""
        return f"{self.origin.host}:{self.origin.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def call(self, fn: Callable[[], T], timeout: float = 5.0) -> T:
        """Run `fn` on the origin's loop and return its result (to read state without races)."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the origin and end its thread. Safe to call twice."""
        if not self.thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self.origin.close(), self.loop)
        with contextlib.suppress(concurrent.futures.TimeoutError):
            future.result(timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)

    def __enter__(self) -> OriginHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_origin_thread(
    name: str = "origin",
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 5.0,
    tls: ssl.SSLContext | None = None,
) -> OriginHandle:
    """Start an origin in a background thread and return once it listens (or raise why not)."""
    origin = Origin(name)
    loop = asyncio.new_event_loop()
    ready: concurrent.futures.Future[None] = concurrent.futures.Future()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(origin.start(host, port, tls))
        except BaseException as exc:
            ready.set_exception(exc)
            loop.close()
            return
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    thread = threading.Thread(target=run, name=f"origin-{name}", daemon=True)
    thread.start()
    ready.result(timeout)
    return OriginHandle(origin, loop, thread)


# --- standalone -------------------------------------------------------------------------------


async def serve(name: str, host: str, port: int) -> None:
    """Run one origin until SIGINT or SIGTERM."""
    origin = Origin(name)
    await origin.start(host, port)
    print(f"origin {name} listening on http://{host}:{origin.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await origin.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bastion.demo.origin", description="Bastion's demo origin server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9101)
    parser.add_argument("--name", default="origin")
    args = parser.parse_args(argv)
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(serve(args.name, args.host, args.port))
        else:
            uvloop.run(serve(args.name, args.host, args.port))
    except OSError as exc:
        print(f"origin {args.name}: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a signal that came before the handlers were installed
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
