"""A small HTTP/1.1 server for the admin API: whole requests in, whole responses out.

The admin listener is not on the request path, so this favours plain code over speed: the
request head and body are collected completely (httptools parses, as on the gateway's own
listeners), handed to an async handler, and its response is written with a Content-Length.
Requests on one connection are answered in order; keep-alive and pipelining work, `HEAD` is
answered like `GET` without the body.

Bounded like everything else: a head of at most 16 KB, a body of at most 1 MB, 256
connections, a request must arrive within 10 s and an idle connection closes after 60 s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import cast

import httptools

log = logging.getLogger("bastion.admin")

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
MAX_CONNECTIONS = 256
MAX_QUEUED = 8  # pipelined requests waiting for their answer; more pause reading
HEAD_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0

_ID_PREFIX = "admin-" + os.urandom(4).hex()
_counter = 0


def new_request_id() -> str:
    global _counter
    _counter += 1
    return f"{_ID_PREFIX}-{_counter:x}"


@dataclass
class AdminRequest:
    method: str
    path: str  # as sent, still percent-encoded, without the query
    query: str
    headers: dict[str, str]  # lower-case names; a repeated field keeps its last value
    body: bytes
    client: str
    request_id: str = field(default_factory=new_request_id)


@dataclass
class AdminResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[AdminRequest], Awaitable[AdminResponse]]


def error_response(status: int, word: str, message: str, request_id: str, **extra: object) -> AdminResponse:
    """The contract's error shape: {"error", "message", "request_id"} (plus any `extra` keys)."""
    body = {"error": word, "message": message, "request_id": request_id, **extra}
    return AdminResponse(status, json.dumps(body).encode())


class _BadRequest(Exception):
    def __init__(self, status: int, word: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.word = word


class AdminConnection(asyncio.Protocol):
    """One client connection: parse, queue complete requests, answer them in order."""

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client = ""
        self.queue: list[AdminRequest] = []
        self.task: asyncio.Task[None] | None = None
        self.closing = False
        self.last = False  # the listener moved: close after the answer being made
        self.paused = False
        self.timer: asyncio.TimerHandle | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._name = b""
        self._body: list[bytes] = []
        self._head_bytes = 0
        self._body_bytes = 0
        self._keep_alive = True

    # --- asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if len(self.server.connections) >= MAX_CONNECTIONS:
            self.transport.abort()
            return
        self.server.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) else ""
        self._arm(HEAD_TIMEOUT)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:  # raised in one of the callbacks below
            cause = exc.__context__
            if isinstance(cause, _BadRequest):
                self._refuse(cause.status, cause.word, str(cause))
            else:
                self._refuse(400, "bad_request", "Malformed request.")
        except httptools.HttpParserUpgrade:
            self._refuse(400, "bad_request", "Upgrades are not supported here.")
        except httptools.HttpParserError as exc:
            self._refuse(400, "bad_request", f"Malformed request: {exc}.")

    def _arm(self, seconds: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(seconds, self._timed_out)

    def _timed_out(self) -> None:
        if self.transport is not None and not self.task:
            self.transport.close()

    # --- httptools callbacks ---------------------------------------------------------------

    def _count(self, data: bytes) -> None:
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD:
            raise _BadRequest(431, "headers_too_large", "The request head is over 16 KB.")

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._head_bytes = 0
        self._body_bytes = 0
        self._arm(HEAD_TIMEOUT)

    def on_url(self, url: bytes) -> None:
        self._count(url)
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(name + value)
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1").strip()

    def on_headers_complete(self) -> None:
        self._keep_alive = bool(self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY:
            raise _BadRequest(413, "body_too_large", "The request body is over 1 MB.")
        self._body.append(body)

    def on_message_complete(self) -> None:
        path, _, query = self._url.decode("latin-1").partition("?")
        method = self.parser.get_method().decode("ascii", "replace")
        request = AdminRequest(method, path, query, self._headers, b"".join(self._body), self.client)
        if not self._keep_alive:
            request.headers["connection"] = "close"
        self.queue.append(request)
        if len(self.queue) >= MAX_QUEUED and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        if self.task is None:
            if self.timer is not None:
                self.timer.cancel()
            self.task = asyncio.get_running_loop().create_task(self._answer_queue())

    # --- answering -------------------------------------------------------------------------

    async def _answer_queue(self) -> None:
        try:
            while self.queue and not self.closing:
                request = self.queue.pop(0)
                if self.paused and self.transport is not None:
                    self.paused = False
                    self.transport.resume_reading()
                try:
                    response = await self.server.handler(request)
                except Exception:
                    log.exception("admin request %s %s failed", request.method, request.path)
                    response = error_response(500, "internal_error", "The admin API failed.", request.request_id)
                close = self.last or request.headers.get("connection", "").lower() == "close"
                self._write(request, response, close)
                if close:
                    self._close()
                    return
        finally:
            self.task = None
        if not self.closing:
            self._arm(IDLE_TIMEOUT)

    def _write(self, request: AdminRequest, response: AdminResponse, close: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            reason = HTTPStatus(response.status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [
            f"HTTP/1.1 {response.status} {reason}",
            f"content-type: {response.content_type}",
            f"content-length: {len(response.body)}",
            f"x-request-id: {request.request_id}",
            "cache-control: no-store",
        ]
        lines += [f"{name}: {value}" for name, value in response.headers]
        if close:
            lines.append("connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.transport.write(head if request.method == "HEAD" else head + response.body)

    def _refuse(self, status: int, word: str, message: str) -> None:
        """A request that cannot be parsed: answer with the error and close."""
        request = AdminRequest("GET", "", "", {}, b"", self.client)
        self._write(request, error_response(status, word, message, request.request_id), close=True)
        self._close()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


class AdminServer:
    """The admin listener: one socket, its connections, and the handler that answers them."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections: set[AdminConnection] = set()
        self.server: asyncio.Server | None = None
        self.bind = ""

    async def listen(self, host: str, port: int, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: AdminConnection(self), host, port, reuse_address=True, reuse_port=reuse_port or None
        )

    def retire(self) -> None:
        """Stop listening; idle connections close now, busy ones after their answer (a reload
        asked for over this listener still gets its answer when the listener moves)."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for conn in list(self.connections):
            if conn.task is not None:
                conn.last = True
            elif conn.transport is not None:
                conn.transport.close()

    def close(self) -> None:
        """Stop listening and close every connection (answers being written are cut)."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        self.connections.clear()
