"""OpenTelemetry spans for requests: one SERVER span for the gateway's handling, one CLIENT span
per upstream attempt, exported over OTLP/HTTP.

This module imports the OpenTelemetry SDK (the `otel` extra), so only a config with `tracing:`
imports it (config/build.py). Without `tracing:` the snapshot has no tracer, the exchange skips
every hook on one `is None` check, and trace-context fields pass through untouched like any
other header.

A `Tracer` belongs to one snapshot: its own `TracerProvider` (never the process-global one, so a
reload can change every setting), sampler and `BatchSpanProcessor`. The event loop's only work
per span is creating it and, when it ends, appending it to the processor's queue; encoding and
sending happen on the processor's own thread. `close()` shuts that down from another thread so
the loop never waits on a collector, and gives up after the export timeout.

Per request the exchange holds a `RequestTrace`. Its parent is the client's valid `traceparent`
(tracecontext.py), else it starts a new trace. Sampling is parent-based (an incoming sampled
flag is followed) with `sample_ratio` for new traces, unless `parent_based` is off, and it is
decided in `Tracer.begin` before the SDK is called: a request that is not sampled gets a plain
`RequestTrace` (span ids from `random`, no SDK object, a few microseconds), a sampled one a
`RecordedTrace` with SDK spans. Either way the upstream gets a `traceparent` naming the current
attempt's CLIENT span, and the client's `tracestate` as it came.

Attributes follow the stable HTTP semantic conventions, plus `bastion.*` ones. The query string
is left out of `url.full` (it often carries credentials, such as key_auth's `apikey`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from bastion.observability.tracecontext import (
    TRACEPARENT,
    TRACESTATE,
    TraceParent,
    format_traceparent,
    incoming_context,
)

log = logging.getLogger("bastion.tracing")

TRACES_PATH = "/v1/traces"

# http.request.method values of the semantic conventions; any other method is "_OTHER".
KNOWN_METHODS = frozenset(("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"))

_ERROR = Status(StatusCode.ERROR)


# What the tracer reads from the gateway's objects, described here so that observability imports
# nothing of the rest of the package (http.model.Request, upstream.targets' HostPort, errors).
class TracedRequest(Protocol):
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def scheme(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def client_ip(self) -> str: ...
    @property
    def client_port(self) -> int: ...
    @property
    def request_id(self) -> str: ...
    @property
    def headers(self) -> _Fields: ...


class _Fields(Protocol):
    @property
    def items(self) -> list[tuple[bytes, bytes]]: ...


class TracedAddress(Protocol):
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...


class TracedResponse(Protocol):
    @property
    def status(self) -> int: ...


def traces_url(endpoint: str) -> str:
    """The URL spans are posted to: a base URL (no path) gets the OTLP path `/v1/traces`, as
    OTEL_EXPORTER_OTLP_ENDPOINT does; a URL with a path is used as it is."""
    rest = endpoint.partition("://")[2]
    slash, path = rest.partition("/")[1:]
    if not slash or not path:
        return endpoint.rstrip("/") + TRACES_PATH
    return endpoint


def error_type(error: BaseException) -> str:
    """`error.type`: a gateway error's machine word (`upstream_timeout`), else the class name."""
    word = getattr(error, "word", None)
    return word if isinstance(word, str) else type(error).__qualname__


class OncePerInterval(logging.Filter):
    """Lets each message of a logger through once per `interval` seconds. The SDK warns once per
    span it drops from a full queue: at full load with a collector down, that is a line per
    request, written by the event loop."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._next: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        key = str(record.msg)
        if now < self._next.get(key, 0.0):
            return False
        self._next[key] = now + self.interval
        return True


# The loggers of the SDK's batch processor (it moved between SDK versions).
_BATCH_LOGGERS = ("opentelemetry.sdk._shared_internal", "opentelemetry.sdk.trace.export")
_THROTTLE = OncePerInterval()


def _throttle_sdk_warnings() -> None:
    for name in _BATCH_LOGGERS:
        logger = logging.getLogger(name)
        if _THROTTLE not in logger.filters:
            logger.addFilter(_THROTTLE)


class Tracer:
    """Spans for one snapshot. Built with no side effects; `start()` opens the export thread."""

    def __init__(
        self,
        *,
        endpoint: str,
        sample_ratio: float = 1.0,
        parent_based: bool = True,
        service_name: str = "bastion",
        service_version: str = "",
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        compression: str = "none",
        batch_delay: float = 5.0,
        batch_size: int = 512,
        queue_size: int = 2048,
        resource_attributes: Mapping[str, str] | None = None,
    ) -> None:
        self.url = traces_url(endpoint)
        root = TraceIdRatioBased(sample_ratio)
        self.sampler: Sampler = ParentBased(root) if parent_based else root
        self.parent_based = parent_based
        self.bound = root.bound  # a trace id whose low 64 bits are below it is sampled
        attributes = dict(resource_attributes or {})
        attributes["service.name"] = service_name
        if service_version:
            attributes.setdefault("service.version", service_version)
        self.resource = Resource.create(attributes)
        self.version = service_version or None
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.compression = Compression(compression)
        self.batch_delay = batch_delay
        self.batch_size = batch_size
        self.queue_size = queue_size
        self.provider: TracerProvider | None = None
        self._tracer: trace_api.Tracer | None = None
        self._ids = PresetIds()

    def start(self) -> None:
        """Create the provider and the batch processor (its export thread starts here)."""
        if self.provider is not None:
            return
        _throttle_sdk_warnings()
        exporter = OTLPSpanExporter(
            endpoint=self.url, headers=self.headers, timeout=self.timeout, compression=self.compression
        )
        processor = BatchSpanProcessor(
            exporter,
            max_queue_size=self.queue_size,
            schedule_delay_millis=self.batch_delay * 1000,
            max_export_batch_size=self.batch_size,
            export_timeout_millis=self.timeout * 1000,
        )
        provider = TracerProvider(
            sampler=self.sampler, resource=self.resource, shutdown_on_exit=False, id_generator=self._ids
        )
        provider.add_span_processor(processor)
        self.provider = provider
        self._tracer = provider.get_tracer("bastion", self.version)

    def begin(self, request: TracedRequest) -> RequestTrace | None:
        """The trace of one request: recorded (its SERVER span started now) or, when it is not
        sampled, ids to propagate and nothing else. None once the tracer is closed.

        The sampling decision is taken here, before the SDK is involved, with the rules of the
        SDK's own sampler (the same one the provider has, so the two always agree): an
        unsampled request, most of them at a low ratio, then costs a few microseconds instead
        of two SDK spans."""
        tracer = self._tracer
        if tracer is None:
            return None
        parent, tracestate, replace = incoming_context(request.headers.items)
        trace_id = parent.trace_id if parent is not None else new_trace_id()
        if not self.sampled(parent, trace_id):
            # Flags as the SDK sets them: not sampled; random trace id (W3C level 2) when it is ours
            # or the parent says so.
            flags = _RANDOM if parent is None else parent.flags & _RANDOM
            return RequestTrace(trace_id, flags, tracestate, replace)
        return RecordedTrace(tracer, self._ids, request, parent, trace_id, tracestate, replace)

    def sampled(self, parent: TraceParent | None, trace_id: int) -> bool:
        """The decision `self.sampler` (the SDK's) takes for a request's SERVER span."""
        if parent is not None and self.parent_based:
            return parent.sampled
        return (trace_id & _LOW_64) < self.bound

    async def close(self) -> None:
        """Export what is queued and stop the export thread, waiting at most `timeout`.

        The shutdown runs on a thread of its own (not the loop's executor, which the loop's own
        shutdown would wait for): a collector that does not answer cannot hold up a stop."""
        provider, self.provider = self.provider, None
        self._tracer = None
        if provider is None:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def shutdown() -> None:
            try:
                provider.shutdown()
            except Exception:
                log.exception("tracing: shutting down the exporter failed")
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(finished)

        threading.Thread(target=shutdown, name="bastion-tracing-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done, self.timeout + 1.0)
        except TimeoutError:
            log.warning("tracing: spans not exported within %gs of stopping were dropped", self.timeout)


class PresetIds(RandomIdGenerator):
    """The provider's id generator: a new trace's id is chosen (and sampled) by `Tracer.begin`
    before the SDK starts its root span, so the SDK must take that id instead of making one."""

    def __init__(self) -> None:
        self.next_trace_id = 0

    def generate_trace_id(self) -> int:
        trace_id, self.next_trace_id = self.next_trace_id, 0
        return trace_id or super().generate_trace_id()


_LOW_64 = (1 << 64) - 1
_RANDOM = 0x02  # W3C trace-context level 2: the trace id is random
_SAMPLED = 0x01


def new_trace_id() -> int:
    trace_id = random.getrandbits(128)
    while not trace_id:
        trace_id = random.getrandbits(128)
    return trace_id


def new_span_id() -> int:
    span_id = random.getrandbits(64)
    while not span_id:
        span_id = random.getrandbits(64)
    return span_id


class RequestTrace:
    """A request that is not sampled: ids to propagate, nothing recorded, no SDK object.

    It is also the base of `RecordedTrace`, which records the same steps as spans. Either way
    the upstream gets a `traceparent` naming the current attempt (`span_id`) and the client's
    `tracestate` when its `traceparent` was valid."""

    __slots__ = ("trace_id", "flags", "span_id", "_tracestate", "_replace")

    def __init__(self, trace_id: int, flags: int, tracestate: bytes | None, replace: bool) -> None:
        self.trace_id = trace_id
        self.flags = flags
        self.span_id = 0  # the current attempt's (CLIENT span's) id
        self._tracestate = tracestate
        self._replace = replace  # the client sent trace-context fields: they are replaced

    def start_attempt(self, upstream: str, address: TracedAddress, tls: bool) -> None:
        """A try at `address` begins, before its connection is taken."""
        self.span_id = new_span_id()

    def outgoing(self, fields: list[tuple[bytes, bytes]], target: str, path: str) -> list[tuple[bytes, bytes]]:
        """The upstream's request fields, the client's trace context replaced by this attempt's.
        (`target` and `path` are for a recorded trace's `url.full`.)"""
        if self._replace:
            fields = [item for item in fields if item[0] != TRACEPARENT and item[0] != TRACESTATE]
        fields.append((TRACEPARENT, format_traceparent(self.trace_id, self.span_id or new_span_id(), self.flags)))
        if self._tracestate is not None:
            fields.append((TRACESTATE, self._tracestate))
        return fields

    def end_attempt(self, response: TracedResponse | None, error: BaseException | None) -> None:
        """The attempt is over: with the upstream's response, or failed with `error`."""

    def failed(self, error: BaseException) -> None:
        """The gateway answers (or cuts) the request with `error`."""

    def finish(
        self,
        status: int,
        response: TracedResponse | None,
        route: str | None,
        template: str | None,
        upstream: str | None,
        consumer: str | None,
    ) -> None:
        """The request is over (`status` as sent to the client, 0 if none was)."""


class RecordedTrace(RequestTrace):
    """A sampled request: the SERVER span, and the CLIENT span of the current attempt."""

    __slots__ = ("_tracer", "server", "_parent", "client", "_method", "_error", "_attempts", "_scheme")

    def __init__(
        self,
        tracer: trace_api.Tracer,
        ids: PresetIds,
        request: TracedRequest,
        parent: TraceParent | None,
        trace_id: int,
        tracestate: bytes | None,
        replace: bool,
    ) -> None:
        super().__init__(trace_id, _SAMPLED, tracestate, replace)
        self._tracer = tracer
        context: Context | None = None
        if parent is not None:
            remote = SpanContext(parent.trace_id, parent.span_id, is_remote=True, trace_flags=TraceFlags(parent.flags))
            context = trace_api.set_span_in_context(NonRecordingSpan(remote))
        else:
            ids.next_trace_id = trace_id
        method = request.method
        self._method = method if method in KNOWN_METHODS else "_OTHER"
        # Attributes given at the start are stored once (set later, each call takes a lock).
        attributes = self._server_attributes(request)
        self.server: Span = tracer.start_span(self._method, context, SpanKind.SERVER, attributes)
        ids.next_trace_id = 0  # taken by the root span; never left for another one
        self.flags = self.server.get_span_context().trace_flags
        self._parent = trace_api.set_span_in_context(self.server)
        self.client: Span | None = None
        self._error: BaseException | None = None
        self._attempts = 0
        self._scheme = "http"

    def _server_attributes(self, request: TracedRequest) -> dict[str, str | int]:
        attributes: dict[str, str | int] = {
            "http.request.method": self._method,
            "url.path": request.path,
            "url.scheme": request.scheme,
            "network.protocol.name": "http",
            "network.protocol.version": request.version,
            "client.address": request.client_ip,
            "network.peer.address": request.client_ip,
            "network.peer.port": request.client_port,
            "bastion.request_id": request.request_id,
        }
        if self._method == "_OTHER":
            attributes["http.request.method_original"] = request.method
        if request.host:
            attributes["server.address"] = request.host
            _, colon, port = _field(request.headers.items, b"host").rpartition(b":")
            if colon and port.isdigit():
                attributes["server.port"] = int(port)
            else:
                attributes["server.port"] = 443 if request.scheme == "https" else 80
        agent = _field(request.headers.items, b"user-agent")
        if agent:
            attributes["user_agent.original"] = agent.decode("latin-1")
        return attributes

    def start_attempt(self, upstream: str, address: TracedAddress, tls: bool) -> None:
        """A CLIENT span for a try at `address`, from before its connection is taken."""
        if self.client is not None:
            self.end_attempt(None, None)
        self._scheme = "https" if tls else "http"
        attributes: dict[str, str | int] = {
            "http.request.method": self._method,
            "server.address": address.host,
            "server.port": address.port,
            "network.peer.address": address.host,
            "network.peer.port": address.port,
            "url.scheme": self._scheme,
            "bastion.upstream": upstream,
        }
        if self._attempts:
            attributes["http.request.resend_count"] = self._attempts
        self._attempts += 1
        span = self.client = self._tracer.start_span(self._method, self._parent, SpanKind.CLIENT, attributes)
        context = span.get_span_context()
        self.span_id, self.flags = context.span_id, context.trace_flags

    def outgoing(self, fields: list[tuple[bytes, bytes]], target: str, path: str) -> list[tuple[bytes, bytes]]:
        span = self.client
        if span is not None and span.is_recording():
            span.set_attribute("url.full", f"{self._scheme}://{target}{path.partition('?')[0]}")
        return super().outgoing(fields, target, path)

    def end_attempt(self, response: TracedResponse | None, error: BaseException | None) -> None:
        span, self.client = self.client, None
        if span is None:
            return
        if span.is_recording():
            status = response.status if response is not None else 0
            attributes: dict[str, str | int] = {}
            if status:
                attributes["http.response.status_code"] = status
            if error is not None and status < 400:  # no (or a good) response: the failure is the error
                attributes["error.type"] = error_type(error)
            elif status >= 400:  # a CLIENT span counts 4xx as errors too
                attributes["error.type"] = str(status)
            span.set_attributes(attributes)  # one call: the span takes a lock per call
            if "error.type" in attributes:
                span.set_status(_ERROR)
        span.end()

    def failed(self, error: BaseException) -> None:
        self._error = error

    def finish(
        self,
        status: int,
        response: TracedResponse | None,
        route: str | None,
        template: str | None,
        upstream: str | None,
        consumer: str | None,
    ) -> None:
        """End the SERVER span, and before it an attempt still open: a WebSocket's (ended by
        the relay, `response` its 101) or one that failed before it had a connection."""
        if self.client is not None:
            self.end_attempt(response, self._error)
        span = self.server
        if span.is_recording():
            attributes: dict[str, str | int] = {}
            if template is not None:
                span.update_name(f"{self._method} {template}")
                attributes["http.route"] = template
            if route is not None:
                attributes["bastion.route"] = route
            if upstream is not None:
                attributes["bastion.upstream"] = upstream
            if consumer is not None:
                attributes["bastion.consumer"] = consumer
            if status:
                attributes["http.response.status_code"] = status
            error = self._error
            if error is not None:
                attributes["bastion.error"] = error_type(error)
            failed = status >= 500 or not status  # a SERVER span counts only 5xx (or no answer) as errors
            if failed:
                attributes["error.type"] = error_type(error) if error is not None else str(status or "_OTHER")
            span.set_attributes(attributes)
            if failed:
                span.set_status(_ERROR)
        span.end()


def _field(fields: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    for key, value in fields:
        if key == name:
            return value
    return b""
