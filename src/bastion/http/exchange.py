"""One request through the gateway: route, plugins, balancer, upstream, response.

The exchange is where the two sides meet, and it speaks only the interfaces of
http/streams.py: a `Downstream` toward the client (which feeds it the request body as a
`DownstreamListener`) and an `UpstreamStream` toward a target (which reports the response as
an `UpstreamListener`). It knows no protocol's framing. Body bytes are relayed the moment
they arrive, never collected: a request body waits in a small buffer only until an upstream
stream exists, a response body only until the response head has been sent. Backpressure
crosses over: a slow upstream pauses reading from the client, a slow client pauses reading
from the upstream.

The jobs around it live beside it: plugin phases (phases.py), forwarded headers
(header_policy.py), error rendering (the downstream's renderer, error_render.py), the log
record (access_record.py). Every failure becomes a GatewayError and, while nothing has
reached the client yet, the protocol's error response; after that, the stream is reset (a
truncated response must not look complete).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bastion.errors import (
    ClientClosed,
    GatewayError,
    NoHealthyTarget,
    PayloadTooLarge,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTimeout,
)
from bastion.http import grpc_web
from bastion.http.access_record import access_record
from bastion.http.grpc import (
    GRPC_WEB,
    NOT_GRPC,
    format_timeout,
    grpc_kind,
    grpc_reply,
    parse_timeout,
    render_grpc,
    trailers_for,
    upstream_status_error,
)
from bastion.http.header_policy import forwarded_headers, gateway_response_headers
from bastion.http.model import Headers, Request, Response
from bastion.http.phases import reply_response, request_phase, response_phase, run_log_hooks
from bastion.http.redirect import https_redirect
from bastion.http.streams import BodyFilter, Downstream, Transcoder
from bastion.net.relay import Relay
from bastion.pipeline import Context
from bastion.proto.h2_client import H2Stream
from bastion.upstream.conn import UpstreamConnection
from bastion.upstream.targets import TargetState

if TYPE_CHECKING:
    from bastion.config.build import RouteRuntime, Snapshot
    from bastion.observability.tracing import RequestTrace

log = logging.getLogger("bastion.exchange")

# Body buffered before an upstream takes it; above this, reading from the client pauses.
BODY_BUFFER_HIGH = 64 * 1024


class Exchange:
    __slots__ = (
        "downstream",
        "request",
        "snapshot",
        "expect_continue",
        "close",
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
        "_req_trailers",
        "_paused_client",
        "_client_full",
        "_paused_by_upstream",
        "_response",
        "_resp_length",
        "_resp_trailers",
        "_upstream_reusable",
        "_upstream_done",
        "_head_sent",
        "_pending",
        "_waiter",
        "_error",
        "_limit",
        "_client_gone",
        "_continue_sent",
        "relay",
        "redirect_https",
        "trace",
        "grpc",
        "body_filter",
        "_grpc_timeout",
        "_deadline_timer",
        "grpc_status",
    )

    def __init__(self, downstream: Downstream, request: Request, snapshot: Snapshot, expect_continue: bool) -> None:
        self.downstream = downstream
        self.request = request
        self.snapshot = snapshot  # the config current when the head arrived handles the request
        self.expect_continue = expect_continue
        self.close = False  # no further request on this connection after this one
        self.started = time.monotonic()
        self.route: RouteRuntime | None = None
        self.ctx: Context | None = None
        self.target: TargetState | None = None
        self.conn: UpstreamConnection | H2Stream | None = None
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.body_complete = not request.has_body
        self._body: list[bytes] = []
        self._body_buffered = 0
        self._req_trailers: Headers | None = None
        self._paused_client = False
        self._client_full = False  # the client takes no response bytes now (on_client_paused)
        self._paused_by_upstream = False
        self._response: Response | None = None
        self._resp_length: int | None = None
        self._resp_trailers: Headers | None = None
        self._upstream_reusable = False
        self._upstream_done = False
        self._head_sent = False
        self._pending: list[bytes] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._error: GatewayError | None = None
        self._limit: int | None = None
        self._client_gone = False
        self._continue_sent = False
        self.relay: Relay | None = None  # after a 101: the byte relay that carries the connection
        self.redirect_https: int | None = None  # set by the protocol: answer 308 to https on this port
        self.trace: RequestTrace | None = None  # spans, when the snapshot has a tracer
        self.grpc = NOT_GRPC  # the kind of gRPC request (http/grpc.py): errors become grpc-status
        self.body_filter: BodyFilter | None = None  # a transcoder's rewrite of the request body
        self._grpc_timeout: float | None = None  # the call's grpc-timeout, in seconds
        self._deadline_timer: asyncio.TimerHandle | None = None
        self.grpc_status: bytes | None = None  # the call's grpc-status as the client got it (logged)

    # --- DownstreamListener: the request body from the client ---------------------------------

    def on_body(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self._limit is not None and self.bytes_in > self._limit:
            self._abort_upload(PayloadTooLarge())
            return
        body_filter = self.body_filter
        if body_filter is not None:
            try:
                data = body_filter.feed(data)
            except GatewayError as exc:
                self._abort_upload(exc)
                return
            if not data:
                return
        conn = self.conn
        if conn is not None:
            conn.send_data(data)
            return
        self._body.append(data)
        self._body_buffered += len(data)
        if self._body_buffered > BODY_BUFFER_HIGH and not self._paused_client:
            self._paused_client = True
            self.downstream.pause_reading()

    def on_end(self, trailers: Headers | None) -> None:
        self.body_complete = True
        if self.body_filter is not None:
            try:
                tail = self.body_filter.end()
            except GatewayError as exc:
                self.close = True
                self.upstream_failed(exc)
                return
            if tail:
                if self.conn is not None:
                    self.conn.send_data(tail)
                else:
                    self._body.append(tail)
        conn = self.conn
        if conn is not None:
            conn.send_end(trailers)
        else:
            self._req_trailers = trailers

    def on_client_paused(self, paused: bool) -> None:
        """The client's socket buffer is full (or drained): hold (or resume) the upstream.

        Remembered, because it can come before there is an upstream: an HTTP/2 connection
        whose other streams filled the socket is full for a stream still connecting."""
        self._client_full = paused
        conn = self.conn
        if conn is not None:
            if paused:
                conn.pause_reading()
            else:
                conn.resume_reading()

    def on_client_lost(self) -> None:
        """The client went away: nothing more to relay."""
        self.close = True
        self._client_gone = True
        self.upstream_failed(ClientClosed())

    def on_client_error(self, error: GatewayError) -> None:
        self.close = True
        self.upstream_failed(error)

    def _abort_upload(self, error: GatewayError) -> None:
        """The client sent more than allowed: stop forwarding and answer (or cut) now."""
        self.close = True
        self.body_complete = True
        self._limit = None
        self.downstream.discard_body()
        self.upstream_failed(error)

    # --- UpstreamListener: the response from the target ---------------------------------------

    def upstream_interim(self, response: Response) -> None:
        """A 1xx: relayed (RFC 9110 section 15.2), except a 100 the gateway already sent."""
        if self._head_sent or self._client_gone:
            return
        if response.status == 100:
            if self._continue_sent:
                return
            self._continue_sent = True
        self.downstream.send_interim(response)

    def upstream_head(self, response: Response, content_length: int | None) -> None:
        self._response = response
        self._resp_length = content_length
        self._wake()

    def upstream_data(self, data: bytes) -> None:
        if self._head_sent:
            self.bytes_out += len(data)
            self.downstream.send_data(data)
        elif self._pending is None:
            self._pending = [data]
        else:
            self._pending.append(data)

    def upstream_end(self, trailers: Headers | None, reusable: bool) -> None:
        self._resp_trailers = trailers
        self._upstream_reusable = reusable
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
            self.downstream.pause_reading()
        elif not paused and self._paused_by_upstream:
            self._paused_by_upstream = False
            self.downstream.resume_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _next_event(self) -> asyncio.Future[None]:
        """A future resolved by the next upstream event (head, end or failure).

        A plain function returning the future, not a coroutine: awaiting it directly saves a
        coroutine object and a frame on every wait. Callers check `_error` after waking."""
        waiter = self._waiter = self.downstream.loop.create_future()
        return waiter

    # --- the exchange --------------------------------------------------------------------------

    async def run(self) -> None:
        # Routing, plugins and the response relay all run in this one coroutine frame (with
        # _forward below it): every resume after an upstream event passes through each frame.
        snapshot = self.snapshot
        request = self.request
        if snapshot.tracer is not None:
            self.trace = snapshot.tracer.begin(request)
        grpc = NOT_GRPC
        if request.method == "POST":  # gRPC is always a POST: other methods skip the lookup
            grpc = self.grpc = grpc_kind(request.headers.get_raw(b"content-type"))
        try:
            if self.redirect_https is not None:  # a listener that only sends clients to https
                if not self.body_complete:
                    self.close = True  # an unread body is not a next request
                self._send_whole(https_redirect(request, self.redirect_https), b"")
                return
            index, params = snapshot.router.match(request.method, request.host, request.path, request.headers)
            route = self.route = snapshot.routes[index]
            if route.grpc_web and (grpc >= GRPC_WEB or request.method == "OPTIONS") and self._grpc_web(route.grpc_web):
                return  # a CORS preflight, answered
            ctx = None
            if route.plugins:
                ctx = self.ctx = Context(request, route.name, params)
                ctx.upstream_name = route.upstream.name
                replied = await request_phase(route, ctx)
                if replied is not None:
                    response, body = await reply_response(route, ctx, *replied)
                    refused = response.status
                    if grpc and refused >= 400:
                        response, body = grpc_reply(response, body, grpc)
                    if refused >= 400 and not self.body_complete:
                        self.close = True
                    self._send_whole(response, body)
                    self.status = refused  # counted and logged as what it stands for (429...)
                    return
                self._limit = ctx.max_body
                if self._limit is not None and self.bytes_in > self._limit:
                    raise PayloadTooLarge()
                if ctx.transcoder is not None:
                    self._transcode(ctx.transcoder)
            if grpc:
                self._grpc_call()
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

    async def _forward(self, route: RouteRuntime) -> TargetState:
        """Pick a target, send, wait for the response head; retry while the policy allows."""
        upstream = route.upstream
        request = self.request
        tried: list[TargetState] = []
        attempt = 0
        stale_retries = 0
        last_error: GatewayError | None = None
        trace = self.trace
        while True:
            attempt += 1
            try:
                target = upstream.pick(request, tried)
            except NoHealthyTarget:
                if last_error is not None:
                    raise last_error from None  # no other target to retry on: the real failure
                raise
            started = time.monotonic()
            if trace is not None:
                trace.start_attempt(upstream.name, target.address, target.pool.tls is not None)
            try:
                conn = await target.pool.acquire()
            except (UpstreamConnectError, UpstreamConnectTimeout) as exc:
                if trace is not None:
                    trace.end_attempt(None, exc)
                upstream.report_failure(target, exc)
                tried.append(target)
                last_error = exc
                if upstream.may_retry(request, attempt, sent=False, tried=tried, error=exc):
                    continue
                raise
            if self._client_gone:  # cancelled while waiting (HTTP/2 reset): the upstream sees nothing
                if isinstance(conn, H2Stream):
                    conn.release()
                else:
                    target.pool.release(conn, True)
                raise ClientClosed()
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

    def _send(self, route: RouteRuntime, target: TargetState, conn: UpstreamConnection | H2Stream) -> None:
        request = self.request
        path = request.path
        prefix = route.strip_prefix
        if prefix is not None and path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
            path = path[len(prefix) :] or "/"
        if request.query:
            path = path + "?" + request.query
        headers = forwarded_headers(request, target.host_header, route.preserve_host)
        if self.trace is not None:  # this attempt's traceparent replaces the client's
            headers = self.trace.outgoing(headers, str(target.address), path)
        upgrade = request.upgrade == "websocket" and route.websocket
        if upgrade:
            headers += ((b"connection", b"upgrade"), (b"upgrade", b"websocket"))
        body = self._body
        if body:
            self._body = []
            self._body_buffered = 0
        elif self.expect_continue and not self.body_complete and self.bytes_in == 0 and not self._continue_sent:
            self._continue_sent = True
            self.downstream.send_continue()
        trailers = self._req_trailers  # the whole body came before the connection, with trailers
        ended = self.body_complete and trailers is None
        length = request.content_length
        if self.body_filter is not None and ended:
            length = sum(map(len, body))  # rewritten: the declared length no longer holds
        timeout = route.upstream.response_timeout
        if self._grpc_timeout is not None and self._grpc_timeout < timeout:
            timeout = self._grpc_timeout
        conn.send_head(self, request.method, path, headers, length, body, ended, timeout)
        self.conn = conn
        if self._client_full:
            conn.pause_reading()
        if upgrade:
            conn.expect_upgrade()
        if trailers is not None:
            conn.send_end(trailers)
        if self._paused_client:
            self._paused_client = False
            self.downstream.resume_reading()

    async def _relay_response(self, route: RouteRuntime, ctx: Context | None, target: TargetState) -> None:
        response = self._response
        assert response is not None
        if self.grpc and response.status != 200 and response.headers.get_raw(b"grpc-status") is None:
            raise upstream_status_error(response.status)  # a gRPC client reads only grpc-status
        if ctx is not None:
            ctx.response = response
        extra = route.upstream.response_headers(self.request, target)
        if extra:
            response.headers.items.extend(extra)
        if route.response_plugins:
            assert ctx is not None
            await response_phase(route.response_plugins, ctx, response)
        if self._error is not None:
            raise self._error
        if response.status == 101:
            await self._relay_upgraded(route, target, response)
            return
        pending, self._pending = self._pending, None
        finished = self._upstream_done
        if not self.body_complete:
            self.close = True  # the client's unsent body would be read as the next request
        self._send_head(response, self._resp_length, pending or (), finished and self._resp_trailers is None)
        if pending:
            for chunk in pending:
                self.bytes_out += len(chunk)
        while not self._upstream_done:
            if self._error is not None:
                raise self._error
            await self._next_event()
        if not finished or self._resp_trailers is not None:
            if self.grpc and self._resp_trailers is not None:
                self.grpc_status = self._resp_trailers.get_raw(b"grpc-status")
            self.downstream.send_end(self._resp_trailers)
        self._detach(target, self._upstream_reusable and self.body_complete)

    async def _relay_upgraded(self, route: RouteRuntime, target: TargetState, response: Response) -> None:
        """The upstream switched protocols (WebSocket): relay the 101, then bytes both ways
        until either side closes; the access log line is written at the end."""
        conn = self.conn
        assert conn is not None and self.request.upgrade is not None
        response.headers.items += ((b"connection", b"upgrade"), (b"upgrade", self.request.upgrade.encode("latin-1")))
        self.close = True
        self._send_head(response, None, (), False)
        upstream_transport, upstream_pending = conn.take_over()
        client_transport, client_pending, client_paused = self.downstream.take_over(self._abort_relay)
        relay = self.relay = Relay(
            self.downstream.loop,
            client_transport,
            upstream_transport,
            idle_timeout=route.config.websocket_idle_timeout,
            max_duration=route.config.websocket_max_duration,
        )
        relay.start(
            client_pending,
            upstream_pending,
            client_write_paused=client_paused,
            upstream_write_paused=self._paused_by_upstream,
        )
        # The relay owns both transports' reading now: no pause of ours is left to release.
        self._paused_by_upstream = self._paused_client = False
        try:
            stats = await relay.wait_closed()
        except asyncio.CancelledError:
            relay.abort("shutdown")
            raise
        finally:
            self.conn = None
            target.in_flight -= 1
            target.requests += 1
            conn.relay_ended()
        self.bytes_in, self.bytes_out = stats.bytes_in, stats.bytes_out

    def _abort_relay(self) -> None:
        """The gateway is shutting down (drain over): end the relay now."""
        if self.relay is not None:
            self.relay.abort("shutdown")

    def _detach(self, target: TargetState, reusable: bool) -> None:
        if self.trace is not None:
            self.trace.end_attempt(self._response, self._error)
        conn = self.conn
        target.in_flight -= 1
        target.requests += 1
        if conn is not None:
            self.conn = None
            if isinstance(conn, H2Stream):
                conn.release()  # HTTP/2: the stream ends, its connection serves on
            else:
                target.pool.release(conn, reusable and not conn.closed)

    # --- gRPC and body rewrites ------------------------------------------------------------------

    def _grpc_web(self, mode: int) -> bool:
        """A gRPC-Web route: translate the call, or answer a CORS preflight (True: answered)."""
        request = self.request
        if self.grpc:
            self._transcode(grpc_web.GrpcWeb(request, self.grpc, mode))
            return False
        if mode != grpc_web.OWN_CORS:
            return False
        response = grpc_web.preflight(request)
        if response is None:
            return False
        self._send_whole(response, b"")
        return True

    def _grpc_call(self) -> None:
        """What every gRPC call to an upstream gets: `te: trailers` and its deadline."""
        request = self.request
        headers = request.headers
        if headers.get_raw(b"te") is None:
            headers.items.append((b"te", b"trailers"))
        value = headers.get_raw(b"grpc-timeout")
        if value is None:
            return
        seconds = parse_timeout(value)
        if seconds is None:
            return
        left = max(self.started + seconds - time.monotonic(), 0.0)
        self._grpc_timeout = left
        headers.set(b"grpc-timeout", format_timeout(left))  # what is left of it, for the server
        self._deadline_timer = self.downstream.loop.call_later(left, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline_timer = None
        self.upstream_failed(UpstreamTimeout("The call's deadline (grpc-timeout) passed."))

    def _transcode(self, transcoder: Transcoder) -> None:
        """Route the response through the transcoder, and the request body through its filter
        (what arrived so far included)."""
        self.downstream = transcoder.wrap(self.downstream, self)
        body_filter = transcoder.request_filter()
        if body_filter is None:
            return
        self.body_filter = body_filter
        self.request.has_body = True  # the body is consumed as it passes: never replayed
        self.request.content_length = None
        if self._body:
            data = body_filter.feed(b"".join(self._body))
            self._body = [data] if data else []
            self._body_buffered = len(data)
        if self.body_complete:
            tail = body_filter.end()
            if tail:
                self._body.append(tail)

    # --- toward the client ---------------------------------------------------------------------

    def _send_head(self, response: Response, length: int | None, body: Sequence[bytes], end_stream: bool) -> None:
        self.status = response.status
        if self.grpc:  # a trailers-only answer carries it in the head
            self.grpc_status = response.headers.get_raw(b"grpc-status")
        response.headers.items.extend(gateway_response_headers(self.request.request_id))
        self._head_sent = True
        self.downstream.send_head(response, length, body, end_stream, self.close)

    def _send_whole(self, response: Response, body: bytes) -> None:
        headers = response.headers
        headers.remove(b"content-length")
        headers.remove(b"transfer-encoding")
        if body and b"content-type" not in headers:
            headers.add(b"content-type", b"application/json")
        self.bytes_out += len(body)
        self._send_head(response, len(body), (body,) if body else (), True)

    def _fail(self, error: GatewayError) -> None:
        """Answer with the protocol's error response, or cut the stream if it is too late."""
        self._error = error  # what went wrong, for the metrics' recent errors (GET /errors)
        if self.trace is not None:
            self.trace.failed(error)
        if self._head_sent:
            if self.grpc and self._resp_length is None and not self._client_gone:
                # A gRPC response can still end cleanly: its status goes in the trailers.
                if self.conn is not None and self.target is not None:
                    self._detach(self.target, reusable=False)
                trailers = trailers_for(error)
                self.grpc_status = trailers.get_raw(b"grpc-status")
                self.downstream.send_end(trailers)
                return
            self.close = True
            self.downstream.reset(error)
            return
        if self.conn is not None and self.target is not None:
            self._detach(self.target, reusable=False)
        if error.status in (400, 413, 431) or not self.body_complete:
            self.close = True
        if self.grpc:
            response, body = render_grpc(error, self.grpc)
            self._send_whole(response, body)
            self.status = error.status  # the client got 200 + grpc-status; metrics count the error
            return
        response, body = self.downstream.render_error(error, self.request.request_id)
        self._send_whole(response, body)

    def _finish(self, snapshot: Snapshot) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        if self._paused_by_upstream:
            # The upstream connection went away while full: its resume will never come.
            self._paused_by_upstream = False
            self.downstream.resume_reading()
        if self._paused_client:
            self._paused_client = False
            self.downstream.resume_reading()
        snapshot.metrics.observe(self)
        route = self.route
        access_log = snapshot.access_log
        if access_log is not None or (route is not None and route.log_plugins):
            record = self.log_record()
            if access_log is not None:
                access_log.write(record)
            if route is not None and route.log_plugins and self.ctx is not None:
                run_log_hooks(route, self.ctx, record)
        if self.trace is not None:
            self._end_trace(self.trace)
        self.downstream.finished(self.close)

    def _end_trace(self, trace: RequestTrace) -> None:
        """End the request's spans; a failure here must not keep the connection from going on."""
        route = self.route
        consumer = self.ctx.consumer if self.ctx is not None else None
        try:
            if route is None:
                trace.finish(self.status, self._response, None, None, None, None)
                return
            match = route.config.match
            template = match.path or match.path_exact or match.path_regex
            consumer_name = consumer.name if consumer is not None else None
            trace.finish(self.status, self._response, route.name, template, route.upstream.name, consumer_name)
        except Exception:
            log.exception("request %s: ending its trace failed", self.request.request_id)

    def log_record(self) -> dict[str, Any]:
        route = self.route
        target = self.target
        consumer = self.ctx.consumer if self.ctx is not None else None
        record = access_record(
            self.request,
            route.name if route is not None else None,
            route.upstream.name if route is not None else None,
            str(target.address) if target is not None else None,
            consumer.name if consumer is not None else None,
            self.status,
            self.bytes_in,
            self.bytes_out,
            self.started,
        )
        relay = self.relay
        if relay is not None:  # a relayed connection (WebSocket): why it ended
            record["close_reason"] = relay.reason
        if self.grpc:  # the HTTP status of a gRPC call is 200 whatever happened
            status = self.grpc_status
            record["grpc_status"] = int(status) if status is not None and status.isdigit() else None
        return record
