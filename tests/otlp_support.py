"""A small OTLP/HTTP trace receiver: what a collector would see from the gateway.

It accepts `POST /v1/traces` with a protobuf `ExportTraceServiceRequest` (gzip or not), decodes
it with opentelemetry-proto, and keeps every span flattened into a `ReceivedSpan` (ids as hex,
attributes as a dict, the resource's attributes alongside).
"""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

SERVER = Span.SPAN_KIND_SERVER
CLIENT = Span.SPAN_KIND_CLIENT
STATUS_ERROR = Status.STATUS_CODE_ERROR
STATUS_UNSET = Status.STATUS_CODE_UNSET


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind is not None else None


@dataclass
class ReceivedSpan:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    status: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    start_ns: int
    end_ns: int


@dataclass
class Export:
    path: str
    headers: dict[str, str]
    spans: list[ReceivedSpan] = field(default_factory=list)


class OtlpReceiver:
    """An OTLP/HTTP receiver on 127.0.0.1 (a free port), in a thread."""

    def __init__(self) -> None:
        self.exports: list[Export] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                message = ExportTraceServiceRequest()
                message.ParseFromString(body)
                receiver._add(self.path, dict(self.headers.items()), message)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="otlp", daemon=True)
        self.thread.start()

    def _add(self, path: str, headers: dict[str, str], message: ExportTraceServiceRequest) -> None:
        export = Export(path, {k.lower(): v for k, v in headers.items()})
        for resource_spans in message.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    export.spans.append(
                        ReceivedSpan(
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            status=span.status.code,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            resource=resource,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                        )
                    )
        with self._changed:
            self.exports.append(export)
            self._changed.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return [span for export in self.exports for span in export.spans]

    def wait_spans(self, count: int, timeout: float = 15.0) -> list[ReceivedSpan]:
        """At least `count` spans, waiting for them up to `timeout` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: sum(len(e.spans) for e in self.exports) >= count, timeout)
        spans = self.spans
        assert len(spans) >= count, f"expected {count} spans, got {len(spans)}: {spans}"
        return spans

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
