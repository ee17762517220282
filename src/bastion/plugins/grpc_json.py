"""grpc_json: REST/JSON clients call gRPC methods, as Envoy's grpc_json_transcoder does.

At config load, the descriptor set's `google.api.http` rules are compiled (grpc_http_rules.py).
A request whose method and path match a rule is rewritten before it is forwarded:
`POST /pkg.Service/Method`, `content-type: application/grpc`, `te: trailers`, and a body of one
gRPC frame holding the request message, built from the path variables, the query parameters
and the JSON body (`body: "*"`: the whole message; `body: "field"`: that field; none: query
only). A request that matches no rule passes through untouched, so one route can serve gRPC
clients and REST clients alike.

The response is buffered (bounded), unframed and written as JSON: one object for a unary
method (or its `response_body` field), a JSON array for a server-streaming one. A grpc-status
other than 0 becomes its HTTP status (google.rpc.Code's mapping: NOT_FOUND 404,
INVALID_ARGUMENT 400, UNAVAILABLE 503, ...) with the contract's JSON error body. Client- and
bidi-streaming methods are not transcoded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

from pydantic import Field

from bastion.config.types import Size
from bastion.errors import BadRequest, GatewayError, PayloadTooLarge
from bastion.http.grpc import OK, STATUS_WORDS, decode_message, http_from_status
from bastion.http.model import Headers, Response
from bastion.http.streams import BodyFilter, Downstream, DownstreamListener
from bastion.http.wrap import DownstreamWrapper
from bastion.pipeline import BuildEnv, Context, Plugin, PluginConfig, PluginProblems, Reply
from bastion.plugins import register
from bastion.plugins.grpc_http_rules import Binding, RuleError, compile_bindings, load_descriptor_set, resolve_field

_GRPC_HEADERS = frozenset((b"content-type", b"content-length", b"grpc-status", b"grpc-message", b"trailer"))


class ResponseTooLarge(GatewayError):
    status, word, message = 502, "response_too_large", "The upstream's response is over max_response_body_size."


class PrintOptions(PluginConfig):
    add_whitespace: bool = Field(False, description="Indent the JSON responses (else compact).")
    always_print_primitive_fields: bool = Field(
        False, description='Print fields that hold their default value (0, "", false, empty lists).'
    )
    always_print_enums_as_ints: bool = Field(False, description="Print enum values as numbers, not names.")
    preserve_proto_field_names: bool = Field(
        False, description="Use the .proto field names (book_id), not their JSON names (bookId)."
    )


class GrpcJsonConfig(PluginConfig):
    descriptor: str = Field(
        description="FileDescriptorSet file (protoc --include_imports --descriptor_set_out), relative to the "
        "config file's directory."
    )
    services: list[str] = Field(
        default_factory=list, description="Services to transcode (package.Service); empty: every service in the file."
    )
    print_options: PrintOptions = Field(PrintOptions(), description="How responses are written as JSON.")
    ignore_unknown_query_parameters: bool = Field(
        False, description="Ignore query parameters that name no request field (else 400)."
    )
    max_request_body_size: Size = Field(4 * 1024 * 1024, description="Largest JSON request body (else 413).")
    max_response_body_size: Size = Field(
        4 * 1024 * 1024, description="Largest gRPC response buffered for one call (else 502)."
    )


@register
class GrpcJson(Plugin):
    name = "grpc_json"
    Config = GrpcJsonConfig
    stage = Plugin.TRANSFORM

    def __init__(self, config: GrpcJsonConfig, env: BuildEnv) -> None:
        super().__init__(config, env)
        base = Path(env.config_path)
        base = base.resolve().parent if base.is_file() else Path.cwd()
        path = base / config.descriptor
        try:
            fds = load_descriptor_set(path)
        except OSError as exc:
            raise PluginProblems([(("descriptor",), f"cannot read {path}: {exc.strerror}")]) from None
        except RuleError as exc:
            raise PluginProblems([(("descriptor",), str(exc))]) from None
        bindings, problems = compile_bindings(fds, config.services)
        if problems:
            where = ("services",) if config.services else ("descriptor",)
            raise PluginProblems([(where, problem) for problem in problems])
        self.by_method: dict[str, list[Binding]] = {}
        for binding in bindings:
            self.by_method.setdefault(binding.http_method, []).append(binding)

    def match(self, method: str, path: str) -> tuple[Binding, dict[str, str]] | None:
        for binding in self.by_method.get(method, ()):
            found = binding.template.regex.fullmatch(path)
            if found is not None:
                return binding, {
                    name: unquote(value) for name, value in zip(binding.template.variables, found.groups(), strict=True)
                }
        return None

    async def on_request(self, ctx: Context) -> Reply | None:
        request = ctx.request
        found = self.match(request.method, request.path)
        if found is None:
            return None
        binding, variables = found
        config = self.config
        try:
            fields = query_fields(binding, request.query, config.ignore_unknown_query_parameters)
        except ValueError as exc:
            return Reply.error(400, "bad_request", str(exc))
        fields.update(variables)
        ctx.transcoder = JsonTranscoder(self, binding, fields, request.request_id)
        request.method = "POST"
        request.path = binding.rpc_path
        request.query = ""
        headers = request.headers
        headers.set(b"content-type", b"application/grpc")
        headers.set(b"te", b"trailers")
        headers.remove(b"accept-encoding")
        return None


def query_fields(binding: Binding, query: str, ignore_unknown: bool) -> dict[str, str | list[str]]:
    """Query parameters naming request fields (not allowed with body "*", as in the spec)."""
    out: dict[str, str | list[str]] = {}
    if not query or binding.body == "*":
        return out
    descriptor = binding.request_class.DESCRIPTOR
    for name, value in parse_qsl(query, keep_blank_values=True):
        field = resolve_field(descriptor, name)
        if field is None or (field.message_type is not None and not _is_wrapper_or_wkt(field)):
            if ignore_unknown:
                continue
            raise ValueError(f"The query parameter {name!r} names no field of {descriptor.full_name}.")
        if _is_repeated(field):
            previous = out.setdefault(name, [])
            if isinstance(previous, list):
                previous.append(value)
        else:
            out[name] = value
    return out


def _is_repeated(field: Any) -> bool:
    return bool(field.label == field.LABEL_REPEATED) if hasattr(field, "label") else bool(field.is_repeated)


def _is_wrapper_or_wkt(field: Any) -> bool:
    return str(field.message_type.full_name).startswith("google.protobuf.")


def _set(doc: dict[str, Any], descriptor: Any, path: str, value: Any) -> None:
    """doc[path] = value, nested along the dotted path, reusing keys the body already spelled."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        field = descriptor.fields_by_name.get(part) or descriptor.fields_by_camelcase_name.get(part)
        key = field.name if field.name in doc or field.json_name not in doc else field.json_name
        if i == len(parts) - 1:
            if field.type == field.TYPE_BOOL and isinstance(value, str):
                value = {"true": True, "false": False, "1": True, "0": False}.get(value.lower(), value)
            doc[key] = value
            return
        child = doc.get(key)
        if not isinstance(child, dict):
            child = doc[key] = {}
        doc = child
        descriptor = field.message_type


def frame(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def unframe(data: bytes) -> list[bytes]:
    """gRPC length-prefixed messages -> payloads (ValueError if cut or compressed)."""
    out, at = [], 0
    while at < len(data):
        if len(data) - at < 5:
            raise ValueError("a gRPC frame is cut short")
        if data[at] != 0:
            raise ValueError("the upstream sent a compressed message")
        size = int.from_bytes(data[at + 1 : at + 5], "big")
        if len(data) - at - 5 < size:
            raise ValueError("a gRPC frame is cut short")
        out.append(data[at + 5 : at + 5 + size])
        at += 5 + size
    return out


class JsonBody:
    """The request `BodyFilter`: collect the JSON (bounded), then emit one gRPC frame."""

    __slots__ = ("binding", "fields", "limit", "_parts", "_size")

    def __init__(self, binding: Binding, fields: dict[str, Any], limit: int) -> None:
        self.binding = binding
        self.fields = fields
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> bytes:
        self._size += len(data)
        if self._size > self.limit:
            raise PayloadTooLarge()
        self._parts.append(data)
        return b""

    def end(self) -> bytes:
        from google.protobuf import json_format  # type: ignore[import-untyped]

        binding = self.binding
        raw = b"".join(self._parts)
        doc: dict[str, Any] = {}
        if binding.body and raw.strip():
            try:
                value = json.loads(raw)
            except ValueError as exc:
                raise BadRequest(f"The request body is not JSON: {exc}.") from None
            except RecursionError:  # [[[[... : json nests by recursion
                raise BadRequest("The request body nests too deeply.") from None
            if binding.body == "*":
                if not isinstance(value, dict):
                    raise BadRequest("The request body must be a JSON object.")
                doc = value
            else:
                _set(doc, binding.request_class.DESCRIPTOR, binding.body, value)
        descriptor = binding.request_class.DESCRIPTOR
        for path, value in self.fields.items():
            _set(doc, descriptor, path, value)
        message = binding.request_class()
        try:
            json_format.ParseDict(doc, message)
        except json_format.ParseError as exc:
            raise BadRequest(f"The request does not fit {descriptor.full_name}: {exc}") from None
        return frame(message.SerializeToString())


class JsonTranscoder:
    """The `Transcoder` of one transcoded call."""

    __slots__ = ("plugin", "binding", "fields", "request_id")

    def __init__(self, plugin: GrpcJson, binding: Binding, fields: dict[str, Any], request_id: str) -> None:
        self.plugin = plugin
        self.binding = binding
        self.fields = fields
        self.request_id = request_id

    def request_filter(self) -> BodyFilter | None:
        return JsonBody(self.binding, self.fields, self.plugin.config.max_request_body_size)

    def wrap(self, downstream: Downstream, listener: DownstreamListener) -> Downstream:
        return JsonDownstream(downstream, self, listener)


class JsonDownstream(DownstreamWrapper):
    """The client's Downstream, receiving JSON: a gRPC response is collected, then converted."""

    def __init__(self, inner: Downstream, call: JsonTranscoder, listener: DownstreamListener) -> None:
        super().__init__(inner)
        self.call = call
        self.listener = listener
        self.head: Response | None = None  # a gRPC response being collected
        self.parts: list[bytes] = []
        self.size = 0
        self.over = False
        self.close = False

    def send_head(
        self, response: Response, length: int | None, body: Sequence[bytes], end_stream: bool, close: bool
    ) -> None:
        content_type = response.headers.get_raw(b"content-type") or b""
        if response.status != 200 or not content_type.startswith(b"application/grpc"):
            self.inner.send_head(response, length, body, end_stream, close)  # not gRPC: as it is
            return
        self.head = response
        self.close = close
        for chunk in body:
            self.send_data(chunk)
        if end_stream:
            self.send_end(None)

    def send_data(self, data: bytes) -> None:
        if self.head is None:
            self.inner.send_data(data)
            return
        if self.over:
            return
        self.size += len(data)
        if self.size > self.call.plugin.config.max_response_body_size:
            # Stop the call: the upstream may stream for ever. Not from inside its data callback.
            self.over = True
            self.parts = []
            self.loop.call_soon(self.listener.on_client_error, ResponseTooLarge())
            return
        self.parts.append(data)

    def send_end(self, trailers: Headers | None) -> None:
        head = self.head
        if head is None:
            self.inner.send_end(trailers)
            return
        self.head = None
        source = trailers if trailers is not None and trailers.get_raw(b"grpc-status") is not None else head.headers
        raw_status = source.get_raw(b"grpc-status")
        code = int(raw_status) if raw_status is not None and raw_status.isdigit() else None
        message = decode_message(source.get_raw(b"grpc-message") or b"")
        if code is None:
            self._error(502, "bad_gateway", "The upstream's gRPC response has no grpc-status.", head)
        elif code != OK:
            self._error(http_from_status(code), STATUS_WORDS.get(code, "unknown"), message or "gRPC error", head)
        elif self.over:
            self._error(502, ResponseTooLarge.word, ResponseTooLarge.message, head)
        else:
            try:
                body = self._json(b"".join(self.parts))
            except ValueError as exc:
                self._error(502, "bad_gateway", f"The upstream's response cannot be read: {exc}.", head)
                return
            self._send(200, body, head)

    def _json(self, data: bytes) -> bytes:
        from google.protobuf import json_format

        binding = self.call.binding
        options = self.call.plugin.config.print_options
        docs = []
        for payload in unframe(data):
            message = binding.response_class()
            try:
                message.ParseFromString(payload)
            except Exception as exc:
                raise ValueError(f"not a {message.DESCRIPTOR.full_name}") from exc
            doc = json_format.MessageToDict(
                message,
                always_print_fields_with_no_presence=options.always_print_primitive_fields,
                preserving_proto_field_name=options.preserve_proto_field_names,
                use_integers_for_enums=options.always_print_enums_as_ints,
            )
            if binding.response_body:
                field = message.DESCRIPTOR.fields_by_name[binding.response_body]
                doc = doc.get(field.name if options.preserve_proto_field_names else field.json_name)
            docs.append(doc)
        if binding.server_streaming:
            result: Any = docs
        elif len(docs) == 1:
            result = docs[0]
        else:
            raise ValueError(f"{len(docs)} messages for a unary call")
        if options.add_whitespace:
            return json.dumps(result, indent=2).encode() + b"\n"
        return json.dumps(result, separators=(",", ":")).encode()

    def _error(self, status: int, word: str, message: str, head: Response) -> None:
        body = json.dumps({"error": word, "message": message, "request_id": self.call.request_id}).encode()
        self._send(status, body, head)

    def _send(self, status: int, body: bytes, head: Response) -> None:
        items = [item for item in head.headers.items if item[0] not in _GRPC_HEADERS]
        items.append((b"content-type", b"application/json"))
        self.parts = []
        self.inner.send_head(Response(status, Headers(items)), len(body), (body,), True, self.close)

    def reset(self, error: GatewayError) -> None:
        """A failure while the response was being collected: nothing was sent, so answer it."""
        head = self.head
        if head is None:
            self.inner.reset(error)
            return
        self.head = None
        self._error(error.status, error.word, error.message, head)
