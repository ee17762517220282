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
flag is followed) with `sample_ratio` for new traces, unless `parent_based` is off. Whether a
span is sampled or not, it has ids: the upstream always gets a `traceparent` naming the current
attempt's CLIENT span, and the client's `tracestate` as it came. Attributes are only computed for
spans being recorded.

Attributes follow the stable HTTP semantic conventions, plus `bastion.*` ones. The query string
is left out of `url.full` (it often carries credentials, such as key_auth's `apikey`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Mapping
from typing import Protocol

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from bastion.observability.tracecontext import TRACEPARENT, TRACESTATE, format_traceparent, incoming_context

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
        root: Sampler = TraceIdRatioBased(sample_ratio)
        self.sampler: Sampler = ParentBased(root) if parent_based else root
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

    def start(self) -> None:
        """Create the provider and the batch processor (its export thread starts here)."""
        if self.provider is not None:
            return
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
        provider = TracerProvider(sampler=self.sampler, resource=self.resource, shutdown_on_exit=False)
        provider.add_span_processor(processor)
        self.provider = provider
        self._tracer = provider.get_tracer("bastion", self.version)

    def begin(self, request: TracedRequest) -> RequestTrace:
        """The trace of one request, its SERVER span started now."""
        tracer = self._tracer
        assert tracer is not None, "Tracer.start() was not called"
        return RequestTrace(tracer, request)

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


class RequestTrace:
    """The spans of one request: the SERVER span, and the CLIENT span of the current attempt."""

    __slots__ = (
        "_tracer",
        "server",
        "_parent",
        "client",
        "_method",
        "_tracestate",
        "_replace",
        "_error",
        "_attempts",
        "_scheme",
    )

    def __init__(self, tracer: trace_api.Tracer, request: TracedRequest) -> None:
        self._tracer = tracer
        parent, self._tracestate, self._replace = incoming_context(request.headers.items)
        context: Context | None = None
        if parent is not None:
            remote = SpanContext(parent.trace_id, parent.span_id, is_remote=True, trace_flags=TraceFlags(parent.flags))
            context = trace_api.set_span_in_context(NonRecordingSpan(remote))
        method = request.method
        self._method = method if method in KNOWN_METHODS else "_OTHER"
        self.server: Span = tracer.start_span(self._method, context, SpanKind.SERVER)
        self._parent = trace_api.set_span_in_context(self.server)
        self.client: Span | None = None
        self._error: BaseException | None = None
        self._attempts = 0
        self._scheme = "http"
        if self.server.is_recording():
            self.server.set_attributes(self._server_attributes(request))

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

    # --- one attempt toward a target -----------------------------------------------------------

    def start_attempt(self, upstream: str, address: TracedAddress, tls: bool) -> None:
        """A CLIENT span for a try at `address`, from before its connection is taken."""
        if self.client is not None:
            self.end_attempt(None, None)
        span = self.client = self._tracer.start_span(self._method, self._parent, SpanKind.CLIENT)
        self._scheme = "https" if tls else "http"
        if span.is_recording():
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
            span.set_attributes(attributes)
        self._attempts += 1

    def outgoing(self, fields: list[tuple[bytes, bytes]], target: str, path: str) -> list[tuple[bytes, bytes]]:
        """The upstream's request fields: the client's trace context replaced by this attempt's
        `traceparent` (and the incoming `tracestate`). `target` and `path` go into `url.full`."""
        span = self.client or self.server
        if span.is_recording():
            span.set_attribute("url.full", f"{self._scheme}://{target}{path.partition('?')[0]}")
        if self._replace:
            fields = [item for item in fields if item[0] != TRACEPARENT and item[0] != TRACESTATE]
        context = span.get_span_context()
        fields.append((TRACEPARENT, format_traceparent(context.trace_id, context.span_id, context.trace_flags)))
        if self._tracestate is not None:
            fields.append((TRACESTATE, self._tracestate))
        return fields

    def end_attempt(self, response: TracedResponse | None, error: BaseException | None) -> None:
        """The attempt is over: with the upstream's response status, or failed with `error`."""
        span, self.client = self.client, None
        if span is None:
            return
        if span.is_recording():
            status = response.status if response is not None else 0
            if status:
                span.set_attribute("http.response.status_code", status)
            if error is not None and status < 400:  # no (or a good) response: the failure is the error
                span.set_attribute("error.type", error_type(error))
                span.set_status(_ERROR)
            elif status >= 400:  # a CLIENT span counts 4xx as errors too
                span.set_attribute("error.type", str(status))
                span.set_status(_ERROR)
        span.end()

    # --- the request as a whole ----------------------------------------------------------------

    def failed(self, error: BaseException) -> None:
        """The gateway answers (or cuts) the request with `error`."""
        self._error = error

    def finish(
        self, status: int, route: str | None, template: str | None, upstream: str | None, consumer: str | None
    ) -> None:
        """End the open attempt, if any, and the SERVER span."""
        if self.client is not None:
            self.end_attempt(_Status(status) if status else None, None)
        span = self.server
        if span.is_recording():
            if template is not None:
                span.update_name(f"{self._method} {template}")
                span.set_attribute("http.route", template)
            if route is not None:
                span.set_attribute("bastion.route", route)
            if upstream is not None:
                span.set_attribute("bastion.upstream", upstream)
            if consumer is not None:
                span.set_attribute("bastion.consumer", consumer)
            if status:
                span.set_attribute("http.response.status_code", status)
            error = self._error
            if error is not None:
                span.set_attribute("bastion.error", error_type(error))
            if status >= 500 or not status:  # a SERVER span counts only 5xx (or no answer) as errors
                span.set_attribute("error.type", error_type(error) if error is not None else str(status or "_OTHER"))
                span.set_status(_ERROR)
        span.end()


class _Status:
    __slots__ = ("status",)

    def __init__(self, status: int) -> None:
        self.status = status


def _field(fields: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    for key, value in fields:
        if key == name:
            return value
    return b""
