"""WebSocket test support: a real origin (the `websockets` library), clients, and a reference front.

`WsOrigin` is a `websockets` server on 127.0.0.1 in its own thread and event loop. Its paths:

- `/echo` (and any other path): sends every message back as it came (text as text,
  binary as binary);
- `/close/CODE`: closes at once with that code and the reason `origin closes`;
- `/big`: sends one 1 MiB binary message, then echoes;
- `/flood/N`: sends N binary messages of 1 MiB as fast as the connection takes them
  (`flood_sent` counts them), then echoes;
- `/reject`: refuses the handshake: `403` with `X-Origin-Says: no` and a text body;
- `/slow`: reads nothing until `gate` is set; then counts the bytes of every message and
  answers the text message `done` with that count.

A request without `Upgrade: websocket` gets a plain `200` with the text `plain http`, and is
recorded in `plain_requests`; every request's path and headers are in `requests`. The close
code and reason each connection received from the client go to `closes`.

`RelayFront` is a minimal proxy built on `bastion.net.relay`: it forwards the handshake as
is and relays bytes after a 101. It is not the gateway (no routing, plugins, header
policy): WebSocket tests run against it to show that the tests themselves and the relay are
right, and against the gateway to show that the gateway is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import uvloop
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.client import ClientConnection, connect

from bastion.net.relay import Relay, RelayStats

MIB = 1024 * 1024
BLOCK = bytes(range(256)) * 4096  # 1 MiB


class WsOrigin:
    def __init__(self, max_queue: int = 2) -> None:
        self.requests: list[tuple[str, Headers]] = []
        self.plain_requests: list[tuple[str, Headers]] = []
        self.closes: list[tuple[int | None, str | None]] = []
        self.gate = threading.Event()
        self.flood_sent = 0
        self.slow_received = 0
        self.open_connections = 0
        self.errors: list[BaseException] = []
        self._max_queue = max_queue
        self._loop = asyncio.new_event_loop()
        self._server: Server | None = None
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="ws-origin", daemon=True)
        self._thread.start()
        ready.result(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await serve(
                self._handler,
                sock=self.sock,
                process_request=self._process_request,
                max_size=None,
                max_queue=self._max_queue,
                ping_interval=None,
                compression=None,
            )

        try:
            self._loop.run_until_complete(start())
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        self._loop.run_forever()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.requests.append((request.path, request.headers))
        if "websocket" not in request.headers.get("Upgrade", "").lower():
            self.plain_requests.append((request.path, request.headers))
            return connection.respond(200, "plain http")
        if request.path == "/reject":
            response = connection.respond(403, "origin refuses the upgrade")
            response.headers["X-Origin-Says"] = "no"
            return response
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        path = ws.request.path if ws.request is not None else "/"
        self.open_connections += 1
        try:
            if path.startswith("/close/"):
                await ws.close(int(path.split("/")[2]), "origin closes")
                return
            if path == "/big":
                await ws.send(BLOCK)
            elif path.startswith("/flood/"):
                for _ in range(int(path.split("/")[2])):
                    await ws.send(BLOCK)
                    self.flood_sent += 1
            elif path == "/slow":
                await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 60)
                async for message in ws:
                    if message == "done":
                        await ws.send(str(self.slow_received))
                    else:
                        self.slow_received += len(message)
                return
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass
        except Exception as exc:  # a bug in the origin: the test using it fails
            self.errors.append(exc)
        finally:
            self.open_connections -= 1
            self.closes.append((ws.close_code, ws.close_reason))

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        self.gate.set()
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()


def ws_connect(
    port: int, path: str = "/echo", headers: dict[str, str] | None = None, **options: Any
) -> ClientConnection:
    """A WebSocket client (sync API) without compression or keepalive pings, so the bytes on
    the wire are exactly the frames a test sends."""
    settings: dict[str, Any] = {
        "additional_headers": headers,
        "compression": None,
        "max_size": None,
        "ping_interval": None,
        "open_timeout": 5,
        "close_timeout": 5,
    }
    settings.update(options)
    return connect(f"ws://127.0.0.1:{port}{path}", **settings)


def wait_until(check: Callable[[], bool], timeout: float = 10, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def wait_steady(read: Callable[[], int], quiet: float = 0.3, timeout: float = 15) -> int:
    """Wait until `read()` stops changing for `quiet` seconds; return its value."""
    deadline = time.monotonic() + timeout
    last = read()
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        value = read()
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return value
    raise AssertionError(f"still moving after {timeout} s (at {last})")


class _Head(asyncio.Protocol):
    """Collects an HTTP head; bytes after it stay in `rest` (reading pauses at the head)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end >= 0 and not self.head.done():
            assert self.transport is not None
            self.transport.pause_reading()
            head = bytes(self.buffer[: end + 4])
            del self.buffer[: end + 4]
            self.head.set_result(head)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectionError("closed before a complete head"))


class RelayFront:
    """The reference front: the handshake forwarded untouched, then `Relay` (see the module doc)."""

    def __init__(self, origin_port: int, idle_timeout: float | None = None) -> None:
        self.origin_port = origin_port
        self.idle_timeout = idle_timeout
        self.stats: list[RelayStats] = []
        self.relays: list[Relay] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.loop = uvloop.new_event_loop()
        self._server: asyncio.Server | None = None
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="relay-front", daemon=True)
        self._thread.start()
        self.port = ready.result(10)

    def _run(self, ready: concurrent.futures.Future[int]) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> int:
            server = self._server = await self.loop.create_server(lambda: _Accepted(self), "127.0.0.1", 0)
            return int(server.sockets[0].getsockname()[1])

        try:
            port = self.loop.run_until_complete(start())
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(port)
        self.loop.run_forever()

    async def serve(self, client: _Head) -> None:
        try:
            request = await asyncio.wait_for(client.head, 10)
            upstream_transport, upstream = await self.loop.create_connection(_Head, "127.0.0.1", self.origin_port)
            upstream_transport.write(request)
            response = await asyncio.wait_for(upstream.head, 10)
        except (OSError, ConnectionError, TimeoutError):
            if client.transport is not None:
                client.transport.abort()
            return
        assert client.transport is not None
        client.transport.write(response)
        if not response.startswith(b"HTTP/1.1 101"):
            client.transport.close()
            upstream_transport.close()
            return
        relay = Relay(
            self.loop, client.transport, upstream_transport, idle_timeout=self.idle_timeout, on_close=self.stats.append
        )
        self.relays.append(relay)
        relay.start(client_pending=bytes(client.buffer), upstream_pending=bytes(upstream.buffer))

    def stop(self) -> None:
        async def close() -> None:
            for relay in self.relays:
                relay.abort()
            if self._server is not None:
                self._server.close()

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()


class _Accepted(_Head):
    def __init__(self, front: RelayFront) -> None:
        super().__init__()
        self.front = front

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        task = self.front.loop.create_task(self.front.serve(self))
        self.front.tasks.add(task)
        task.add_done_callback(self.front.tasks.discard)
