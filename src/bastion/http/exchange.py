"""One request through the gateway: route, plugins, balancer, upstream, response.

The exchange is the meeting point of the two connections. The client side (proto/h1.py)
feeds it request body chunks; the upstream side (upstream/conn.py) feeds it response
events. Body bytes are relayed the moment they arrive, never collected: a request body
waits in a small buffer only until an upstream connection is attached, a response body only
until the response head has been written. Backpressure crosses over: a slow upstream
pauses reading from the client, a slow client pauses reading from the upstream.

Every failure becomes a GatewayError and, while nothing has reached the client yet, the
contract's JSON response; after that, the client connection is aborted (a truncated
response must not look complete).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from bastion.errors import (
    GatewayError,
    NoHealthyTarget,
    PayloadTooLarge,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTimeout,
)
from bastion.http.model import Headers, Request, Response
from bastion.http.redirect import https_redirect
from bastion.pipeline import Context, Plugin, Reply, plugin_failed
from bastion.upstream.conn import UpstreamConnection
from bastion.upstream.targets import TargetState

if TYPE_CHECKING:
    from bastion.config.build import RouteRuntime, Snapshot
    from bastion.proto.h1 import H1Server

log = logging.getLogger("bastion.exchange")

# Body buffered before an upstream takes it; above this, reading from the client pauses.
BODY_BUFFER_HIGH = 64 * 1024

_FRAME_NONE, _FRAME_LENGTH, _FRAME_CHUNKED, _FRAME_CLOSE = range(4)
_NO_BODY_STATUSES = frozenset((204, 304))
_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_VIA = b"1.1 bastion"


def status_line(status: int, reason: bytes = b"") -> bytes:
    """`HTTP/1.1 200 OK\r\n`, cached per (status, reason): upstreams repeat a handful of them."""
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        if not reason:
            try:
                reason = HTTPStatus(status).phrase.encode()
            except ValueError:
                reason = b"Unknown"
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if len(_STATUS_LINES) < 1000:
            _STATUS_LINES[key] = line
    return line


class Exchange:
    __slots__ = (
        "server",
        "request",
        "expect_continue",
        "keep_alive",
        "started",
        "route",
        "ctx",
        "target",
        "conn",
        "status",
        "bytes_in",
        "bytes_out",
        "body_complete",
        "_body",
        "_body_buffered",
        "_paused_client",
        "_paused_by_upstream",
        "_to_upstream_chunked",
        "_response",
        "_resp_length",
        "_upstream_keep_alive",
        "_upstream_done",
        "_head_written",
        "_framing",
        "_pending",
        "_waiter",
        "_error",
        "_limit",
        "_client_gone",
        "_continue_sent",
        "snapshot",
    )

    def __init__(self, server: H1Server, request: Request, expect_continue: bool, snapshot: Snapshot) -> None:
        self.server = server
        self.request = request
        self.snapshot = snapshot  # the config current when the head arrived handles the request
        self.expect_continue = expect_continue
        self.keep_alive = request.keep_alive
        self.started = time.monotonic()
        self.route: RouteRuntime | None = None
        self.ctx: Context | None = None
        self.target: TargetState | None = None
        self.conn: UpstreamConnection | None = None
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.body_complete = not request.has_body
        self._body: list[bytes] = []
        self._body_buffered = 0
        self._paused_client = False
        self._paused_by_upstream = False
        self._to_upstream_chunked = request.chunked
        self._response: Response | None = None
        self._resp_length: int | None = None
        self._upstream_keep_alive = False
        self._upstream_done = False
        self._head_written = False
        self._framing = _FRAME_NONE
        self._pending: list[bytes] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._error: GatewayError | None = None
        self._limit: int | None = None
        self._client_gone = False
        self._continue_sent = False

    # --- request body from the client ----------------------------------------------------------

    def feed_body(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self._limit is not None and self.bytes_in > self._limit:
            self._abort_upload(PayloadTooLarge())
            return
        conn = self.conn
        if conn is not None:
            self._write_upstream_body(conn, data)
            return
        self._body.append(data)
        self._body_buffered += len(data)
        if self._body_buffered > BODY_BUFFER_HIGH and not self._paused_client:
            self._paused_client = True
            self.server.pause_reading()

    def end_body(self) -> None:
        self.body_complete = True
        conn = self.conn
        if conn is not None:
            if self._to_upstream_chunked:
                conn.write(b"0\r\n\r\n")
            conn.arm_response_timeout()

    def _write_upstream_body(self, conn: UpstreamConnection, data: bytes) -> None:
        if self._to_upstream_chunked:
            conn.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            conn.write(data)

    def _abort_upload(self, error: GatewayError) -> None:
        """The client sent more than allowed: stop forwarding and answer (or cut) now."""
        self.keep_alive = False
        self.body_complete = True
        self._limit = None
        self.server.stop_reading_body()
        self.upstream_failed(error)

    # --- events from the upstream connection ---------------------------------------------------

    def upstream_interim(self, response: Response) -> None:
        """A 1xx: relayed to an HTTP/1.1 client (RFC 9110 section 15.2), except a 100 Continue
        the gateway already sent itself. HTTP/1.0 clients cannot take one."""
        status = response.status
        if self.request.version != "1.1" or self._head_written or self._client_gone:
            return
        if status == 100:
            if self._continue_sent:
                return
            self._continue_sent = True
        parts = [status_line(status, response.reason)]
        for name, value in response.headers.items:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        self.server.write(b"".join(parts))

    def upstream_head(self, response: Response, content_length: int | None, keep_alive: bool) -> None:
        self._response = response
        self._resp_length = content_length
        self._upstream_keep_alive = keep_alive
        self._wake()

    def upstream_body(self, data: bytes) -> None:
        if self._head_written:
            self._write_client_body(data)
        elif self._pending is None:
            self._pending = [data]
        else:
            self._pending.append(data)

    def upstream_done(self, keep_alive: bool) -> None:
        self._upstream_keep_alive = keep_alive
        self._upstream_done = True
        self._wake()

    def upstream_failed(self, error: GatewayError) -> None:
        if self._error is None:
            self._error = error
        conn = self.conn
        if conn is not None and not conn.closed:
            conn.abort()
        self._wake()

    def upstream_paused(self, paused: bool) -> None:
        """The upstream's socket buffer is full (or drained): hold (or resume) the client."""
        if paused and not self._paused_by_upstream:
            self._paused_by_upstream = True
            self.server.pause_reading()
        elif not paused and self._paused_by_upstream:
            self._paused_by_upstream = False
            self.server.resume_reading()

    def client_paused(self, paused: bool) -> None:
        """The client's socket buffer is full (or drained): hold (or resume) the upstream."""
        conn = self.conn
        if conn is not None:
            if paused:
                conn.pause_reading()
            else:
                conn.resume_reading()

    def client_lost(self) -> None:
        """The client went away: nothing more to relay."""
        self.keep_alive = False
        self._client_gone = True
        self.upstream_failed(GatewayError("The client closed the connection."))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _next_event(self) -> asyncio.Future[None]:
        """A future resolved by the next upstream event (head, end or failure).

        A plain function returning the future, not a coroutine: awaiting it directly saves a
        coroutine object and a frame on every wait. Callers check `_error` after waking."""
        waiter = self._waiter = self.server.loop.create_future()
        return waiter

    # --- the exchange --------------------------------------------------------------------------

    async def run(self) -> None:
        snapshot = self.snapshot
        # Routing, plugins and the response relay all run in this one coroutine frame (with
        # _forward below it): every resume after an upstream event passes through each frame.
        request = self.request
        try:
            redirect = self.server.settings.redirect_https
            if redirect is not None:  # an http listener that only sends clients to https
                self.keep_alive = self.keep_alive and self.body_complete  # an unread body is not a next request
                self._send_whole(https_redirect(request, redirect), b"")
                return
            index, params = snapshot.router.match(request.method, request.host, request.path, request.headers)
            route = self.route = snapshot.routes[index]
            ctx = None
            if route.plugins:
                ctx = self.ctx = Context(request, route.name, params)
                ctx.upstream_name = route.upstream.name
                if await self._request_phase(route, ctx):
                    return
            target = await self._forward(route)
            await self._relay_response(route, ctx, target)
        except GatewayError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._fail(GatewayError("The gateway is shutting down."))
            raise
        except Exception:
            log.exception("request %s failed", self.request.request_id)
            self._fail(GatewayError())
        finally:
            self._finish(snapshot)

    async def _request_phase(self, route: RouteRuntime, ctx: Context) -> bool:
        """Run the request hooks; True when a plugin replied (and the reply was sent)."""
        request = self.request
        for ran, plugin in enumerate(route.request_plugins):
            try:
                reply = await plugin.on_request(ctx)
            except GatewayError:
                raise
            except Exception as exc:
                raise plugin_failed(plugin, "request", exc, request.request_id) from exc
            if reply is not None:
                await self._reply(route, ctx, reply, ran + 1)
                return True
        self._limit = ctx.max_body
        if self._limit is not None and self.bytes_in > self._limit:
            raise PayloadTooLarge()
        return False

    async def _forward(self, route: RouteRuntime) -> TargetState:
        """Pick a target, send, wait for the response head; retry while the policy allows."""
        upstream = route.upstream
        request = self.request
        tried: list[TargetState] = []
        attempt = 0
        stale_retries = 0
        last_error: GatewayError | None = None
        while True:
            attempt += 1
            try:
                target = upstream.pick(request, tried)
            except NoHealthyTarget:
                if last_error is not None:
                    raise last_error from None  # no other target to retry on: the real failure
                raise
            started = time.monotonic()
            try:
                conn = await target.pool.acquire()
            except (UpstreamConnectError, UpstreamConnectTimeout) as exc:
                upstream.report_failure(target, exc)
                tried.append(target)
                last_error = exc
                if upstream.may_retry(request, attempt, sent=False, tried=tried, error=exc):
                    continue
                raise
            reused = conn.served > 0
            self.target = target
            target.in_flight += 1
            try:
                self._send(route, target, conn)
                while self._response is None:
                    if self._error is not None:
                        raise self._error
                    await self._next_event()
            except GatewayError as exc:
                self._detach(target, reusable=False)
                if self._client_gone:
                    raise  # nobody is waiting for an answer: never send the request again
                replayable = not request.has_body
                if reused and replayable and stale_retries < 3 and not isinstance(exc, UpstreamTimeout):
                    # A pooled connection the upstream had already closed: not the target's fault.
                    stale_retries += 1
                    attempt -= 1
                    self._reset_attempt()
                    continue
                upstream.report_failure(target, exc)
                tried.append(target)
                last_error = exc
                if replayable and upstream.may_retry(request, attempt, sent=True, tried=tried, error=exc):
                    self._reset_attempt()
                    continue
                raise
            status = self._response.status
            if upstream.retry_statuses and status in upstream.retry_statuses and not request.has_body:
                last_error = UpstreamError(f"The upstream answered {status}.")
                upstream.report_failure(target, last_error)
                if upstream.may_retry(request, attempt, sent=True, tried=[*tried, target], error=last_error):
                    self._detach(target, reusable=False)
                    tried.append(target)
                    self._reset_attempt()
                    continue
            else:
                upstream.report_success(target, time.monotonic() - started)
            return target

    def _reset_attempt(self) -> None:
        """Forget a failed try's response state before the next one."""
        self._error = None
        self._response = None
        self._pending = None
        self._upstream_done = False

    def _send(self, route: RouteRuntime, target: TargetState, conn: UpstreamConnection) -> None:
        request = self.request
        head = self._upstream_head(route, target)
        if self._body:
            # One write for the head and whatever body arrived before the connection did.
            chunked = self._to_upstream_chunked
            framed = [b"%x\r\n%s\r\n" % (len(c), c) for c in self._body] if chunked else self._body
            head = b"".join((head, *framed))
            self._body = []
            self._body_buffered = 0
        elif self.expect_continue and not self.body_complete and self.bytes_in == 0 and not self._continue_sent:
            self._continue_sent = True
            self.server.write(_CONTINUE)
        if self.body_complete and request.chunked:
            head += b"0\r\n\r\n"
        conn.start(self, head, request.method == "HEAD", route.upstream.response_timeout)
        self.conn = conn
        if self._paused_client:
            self._paused_client = False
            self.server.resume_reading()
        if self.body_complete:
            conn.arm_response_timeout()

    def _upstream_head(self, route: RouteRuntime, target: TargetState) -> bytes:
        request = self.request
        path = request.path
        prefix = route.strip_prefix
        if prefix is not None and path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
            path = path[len(prefix) :] or "/"
        if request.query:
            path = path + "?" + request.query
        parts = [request.method.encode(), b" ", path.encode("latin-1"), b" HTTP/1.1\r\n"]
        forwarded_for = None
        via = None
        for name, value in request.headers.items:
            if name == b"x-forwarded-for":
                forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
                continue
            if name == b"via":
                via = value if via is None else via + b", " + value
                continue
            if name == b"host" and not route.preserve_host:
                continue
            parts += (name, b": ", value, b"\r\n")
        client = request.client_ip.encode()
        parts += (b"x-forwarded-for: ", client if forwarded_for is None else forwarded_for + b", " + client, b"\r\n")
        parts += (b"via: ", _VIA if via is None else via + b", " + _VIA, b"\r\n")
        if not route.preserve_host:
            parts += (b"host: ", target.host_header, b"\r\n")
        host = request.headers.get_raw(b"host")
        if host:
            parts += (b"x-forwarded-host: ", host, b"\r\n")
        parts += (b"x-real-ip: ", client, b"\r\nx-forwarded-proto: ", request.scheme.encode(), b"\r\nx-request-id: ")
        parts += (request.request_id.encode(), b"\r\n")
        if request.chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        elif request.content_length is not None:
            parts += (b"content-length: ", str(request.content_length).encode(), b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    async def _relay_response(self, route: RouteRuntime, ctx: Context | None, target: TargetState) -> None:
        response = self._response
        assert response is not None
        if ctx is not None:
            ctx.response = response
        extra = route.upstream.response_headers(self.request, target)
        if extra:
            response.headers.items.extend(extra)
        if route.response_plugins:
            assert ctx is not None
            await self._response_phase(route.response_plugins, ctx, response)
        if self._error is not None:
            raise self._error
        pending, self._pending = self._pending, None
        finished = self._upstream_done
        self._write_head(response, self._resp_length, pending, finished)
        while not self._upstream_done:
            if self._error is not None:
                raise self._error
            await self._next_event()
        if not finished:
            self._end_client_body()
        reusable = self._upstream_keep_alive and self.body_complete
        if not self.body_complete:
            self.keep_alive = False  # the client's unsent body would be read as the next request
        self._detach(target, reusable)

    def _detach(self, target: TargetState, reusable: bool) -> None:
        conn = self.conn
        target.in_flight -= 1
        target.requests += 1
        if conn is not None:
            self.conn = None
            target.pool.release(conn, reusable and not conn.closed)

    # --- writing to the client -----------------------------------------------------------------

    def _write_head(
        self, response: Response, length: int | None, body: list[bytes] | None = None, last: bool = False
    ) -> None:
        """Write the response head, with `body` (and the end, if `last`) in the same write."""
        request = self.request
        status = response.status
        self.status = status
        parts = [status_line(status, response.reason)]
        for name, value in response.headers.items:
            parts += (name, b": ", value, b"\r\n")
        if request.method == "HEAD" or status in _NO_BODY_STATUSES:
            self._framing = _FRAME_NONE
            if length is not None and status != 204:
                parts += (b"content-length: ", str(length).encode(), b"\r\n")
        elif length is not None:
            self._framing = _FRAME_LENGTH
            parts += (b"content-length: ", str(length).encode(), b"\r\n")
        elif request.version == "1.1":
            self._framing = _FRAME_CHUNKED
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            self._framing = _FRAME_CLOSE
            self.keep_alive = False
        parts += (b"x-request-id: ", request.request_id.encode(), b"\r\nvia: 1.1 bastion\r\n")
        if not self.keep_alive or not self.server.keep_alive:
            self.keep_alive = False
            parts.append(b"connection: close\r\n")
        elif request.version != "1.1":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self._head_written = True
        framing = self._framing
        if body and framing != _FRAME_NONE:
            for chunk in body:
                self.bytes_out += len(chunk)
                parts += (b"%x\r\n%s\r\n" % (len(chunk), chunk),) if framing == _FRAME_CHUNKED else (chunk,)
        if last and framing == _FRAME_CHUNKED:
            parts.append(b"0\r\n\r\n")
        self.server.write(b"".join(parts))

    def _write_client_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self._framing == _FRAME_CHUNKED:
            self.server.write(b"%x\r\n%s\r\n" % (len(data), data))
        elif self._framing != _FRAME_NONE:
            self.server.write(data)

    def _end_client_body(self) -> None:
        if self._framing == _FRAME_CHUNKED:
            self.server.write(b"0\r\n\r\n")

    async def _reply(self, route: RouteRuntime, ctx: Context, reply: Reply, ran: int) -> None:
        """A plugin answered: run the response hooks of the plugins that ran, then send it."""
        response = Response(reply.status, reply.headers)
        ctx.response = response
        # Every plugin up to the one that replied, in chain order (with or without a request hook).
        ran_plugins = set(route.plugins[: route.plugins.index(route.request_plugins[ran - 1]) + 1])
        await self._response_phase([p for p in route.response_plugins if p in ran_plugins], ctx, response)
        body = reply.body
        if body.startswith(b'{"error":') and reply.status >= 400:
            body = self._with_request_id(body)
        if reply.status >= 400 and self.request.has_body and not self.body_complete:
            self.keep_alive = False
        self._send_whole(response, body)

    async def _response_phase(self, plugins: Sequence[Plugin], ctx: Context, response: Response) -> None:
        """Run response hooks (already in reverse chain order); a plugin bug becomes a 500."""
        for plugin in plugins:
            try:
                await plugin.on_response(ctx, response)
            except GatewayError:
                raise
            except Exception as exc:
                raise plugin_failed(plugin, "response", exc, self.request.request_id) from exc

    def _with_request_id(self, body: bytes) -> bytes:
        try:
            doc: dict[str, Any] = json.loads(body)
        except ValueError:
            return body
        doc["request_id"] = self.request.request_id
        return json.dumps(doc).encode()

    def _send_whole(self, response: Response, body: bytes) -> None:
        headers = response.headers
        headers.remove(b"content-length")
        headers.remove(b"transfer-encoding")
        if body and b"content-type" not in headers:
            headers.add(b"content-type", b"application/json")
        self._write_head(response, len(body), [body] if body else None, True)

    def _fail(self, error: GatewayError) -> None:
        """Answer with the contract's JSON error, or cut the connection if it is too late."""
        if self._head_written:
            self.keep_alive = False
            self.server.abort()
            return
        if self.conn is not None and self.target is not None:
            self._detach(self.target, reusable=False)
        if error.status in (400, 413, 431) or (self.request.has_body and not self.body_complete):
            self.keep_alive = False
        body = json.dumps(
            {"error": error.word, "message": error.message, "request_id": self.request.request_id}
        ).encode()
        headers = Headers([*error.headers, (b"content-type", b"application/json")])
        self._send_whole(Response(error.status, headers), body)

    def _finish(self, snapshot: Snapshot) -> None:
        if self._paused_by_upstream:
            # The upstream connection went away while full: its resume will never come.
            self._paused_by_upstream = False
            self.server.resume_reading()
        if self._paused_client:
            self._paused_client = False
            self.server.resume_reading()
        if snapshot.access_log is not None:
            snapshot.access_log.record(self, snapshot)
        route = self.route
        if route is not None and route.log_plugins and self.ctx is not None:
            record = self.log_record()
            for plugin in route.log_plugins:
                try:
                    plugin.on_log(self.ctx, record)
                except Exception:
                    log.exception("plugin %s failed in its log hook", plugin.name)
        self.server.exchange_finished(self)

    def _consumer_name(self) -> str | None:
        consumer = self.ctx.consumer if self.ctx is not None else None
        return consumer.name if consumer is not None else None

    def log_record(self) -> dict[str, Any]:
        request = self.request
        target = self.target
        route = self.route
        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "request_id": request.request_id,
            "client": request.client_ip,
            "method": request.method,
            "host": request.host,
            "path": request.path,
            "route": route.name if route is not None else None,
            "upstream": route.upstream.name if route is not None else None,
            "target": str(target.address) if target is not None else None,
            "consumer": self._consumer_name(),
            "status": self.status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
        }
