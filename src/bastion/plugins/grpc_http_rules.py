"""grpc_json's map: a FileDescriptorSet's `google.api.http` rules, compiled once per config.

Each rule (`get: "/v1/{name=shelves/*}/books/{book_id}"`, `body`, `response_body`,
`additional_bindings`) becomes a `Binding`: the HTTP method, a regular expression for the path
template with one group per variable, and what to call (`/pkg.Service/Method`, the request
and response classes). Template grammar (google/api/http.proto):

    Template = "/" Segments [ ":" Verb ] ;   Segment = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;

`*` is one path segment, `**` any number (last only); a variable without `= ...` is one
segment. At request time the bindings of the request's method are tried most specific first
(literal segments before variables before `**`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_LITERAL = re.compile(r"^[A-Za-z0-9._~!$&'()+,;=@%-]+$")
_METHODS = ("get", "put", "post", "delete", "patch")


class RuleError(ValueError):
    """A rule that cannot be compiled: the message names the method and the problem."""


@dataclass
class Template:
    regex: re.Pattern[str]
    variables: list[str]  # field paths, in group order
    ranks: tuple[int, ...]  # per segment: 0 literal, 1 one segment, 2 many; verbs rank first


def compile_template(text: str) -> Template:
    """A path template -> a regular expression over the normalised request path."""
    if not text.startswith("/"):
        raise RuleError(f"path template {text!r} does not start with /")
    body, verb = text[1:], ""
    last_slash = body.rfind("/")
    colon = body.rfind(":")
    if colon > last_slash and "}" not in body[colon:]:
        body, verb = body[:colon], body[colon + 1 :]
        if not _LITERAL.match(verb):
            raise RuleError(f"path template {text!r}: bad verb {verb!r}")
    pattern: list[str] = []
    variables: list[str] = []
    ranks: list[int] = []
    segments = _split(body, text)
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment.startswith("{"):
            if not segment.endswith("}"):
                raise RuleError(f"path template {text!r}: unclosed variable")
            name, _, sub = segment[1:-1].partition("=")
            if not _IDENT.match(name):
                raise RuleError(f"path template {text!r}: bad variable name {name!r}")
            if name in variables:
                raise RuleError(f"path template {text!r}: variable {name!r} bound twice")
            inner, inner_ranks = _segments(sub.split("/") if sub else ["*"], text, last)
            variables.append(name)
            pattern.append(f"({inner})")
            ranks += inner_ranks
        else:
            inner, inner_ranks = _segments([segment], text, last)
            pattern.append(inner)
            ranks += inner_ranks
    regex = "/" + "/".join(pattern) + (re.escape(":" + verb) if verb else "")
    return Template(re.compile(regex), variables, (0 if verb else 1, *ranks))


def _split(body: str, text: str) -> list[str]:
    """Segments at top-level slashes (a variable's `=a/*` stays one piece)."""
    out, depth, start = [], 0, 0
    for i, char in enumerate(body):
        if char == "{":
            depth += 1
            if depth > 1:
                raise RuleError(f"path template {text!r}: nested variable")
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise RuleError(f"path template {text!r}: unbalanced }}")
        elif char == "/" and depth == 0:
            out.append(body[start:i])
            start = i + 1
    if depth:
        raise RuleError(f"path template {text!r}: unclosed variable")
    out.append(body[start:])
    if any(not segment for segment in out):
        raise RuleError(f"path template {text!r}: empty segment")
    return out


def _segments(parts: list[str], text: str, last: bool) -> tuple[str, list[int]]:
    pattern, ranks = [], []
    for i, part in enumerate(parts):
        if part == "*":
            pattern.append("[^/]+")
            ranks.append(1)
        elif part == "**":
            if not (last and i == len(parts) - 1):
                raise RuleError(f"path template {text!r}: ** must be the last segment")
            pattern.append(".+")
            ranks.append(2)
        elif _LITERAL.match(part):
            pattern.append(re.escape(part))
            ranks.append(0)
        else:
            raise RuleError(f"path template {text!r}: bad segment {part!r}")
    return "/".join(pattern), ranks


@dataclass
class Binding:
    """One HTTP method + path template mapped to one gRPC method."""

    http_method: str
    template: Template
    rpc_path: str  # /pkg.Service/Method
    request_class: Any
    response_class: Any
    body: str  # "" (none), "*" or a request field name
    response_body: str
    server_streaming: bool
    source: str = field(default="")  # `pkg.Service.Method: get /v1/...`, for messages


def load_descriptor_set(path: Path) -> Any:
    """The FileDescriptorSet in `path`, with `google.api.http` options readable."""
    from google.api import annotations_pb2  # type: ignore[import-untyped]  # noqa: F401 - the http option
    from google.protobuf import descriptor_pb2  # type: ignore[import-untyped]
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

    data = path.read_bytes()
    try:
        return descriptor_pb2.FileDescriptorSet.FromString(data)
    except DecodeError as exc:
        raise RuleError(f"{path} is not a FileDescriptorSet (protoc --descriptor_set_out): {exc}") from None


def compile_bindings(fds: Any, services: list[str]) -> tuple[list[Binding], list[str]]:
    """Every transcodable method of `services` (all services when empty) -> bindings.

    Returns (bindings, problems): unknown services and bad rules are problems."""
    from google.api import annotations_pb2
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    problems: list[str] = []
    try:
        for file in fds.file:
            pool.Add(file)
    except Exception as exc:  # protobuf raises TypeError/KeyError for broken sets
        return [], [f"the descriptor set does not load: {exc} (build it with --include_imports)"]
    known = {
        f"{file.package}.{svc.name}" if file.package else svc.name: (file, svc)
        for file in fds.file
        for svc in file.service
    }
    wanted = services or list(known)
    bindings: list[Binding] = []
    for name in wanted:
        if name not in known:
            problems.append(f"no service {name!r} in the descriptor set (it has: {', '.join(sorted(known)) or 'none'})")
            continue
        _, svc = known[name]
        for method in svc.method:
            if not method.options.HasExtension(annotations_pb2.http):
                continue
            full = f"{name}.{method.name}"
            if method.client_streaming:
                continue  # not transcoded: a REST call has one request body
            rule = method.options.Extensions[annotations_pb2.http]
            try:
                request_class = message_factory.GetMessageClass(
                    pool.FindMessageTypeByName(method.input_type.lstrip("."))
                )
                response_class = message_factory.GetMessageClass(
                    pool.FindMessageTypeByName(method.output_type.lstrip("."))
                )
            except KeyError as exc:
                problems.append(f"{full}: {exc}")
                continue
            for one in [rule, *rule.additional_bindings]:
                try:
                    bindings.append(
                        _binding(
                            one, full, f"/{name}/{method.name}", request_class, response_class, method.server_streaming
                        )
                    )
                except RuleError as exc:
                    problems.append(f"{full}: {exc}")
    bindings.sort(key=lambda b: b.template.ranks)
    return bindings, problems


def _binding(rule: Any, full: str, rpc_path: str, request_class: Any, response_class: Any, streaming: bool) -> Binding:
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise RuleError("the http rule has no pattern (get, post, ...)")
    if kind == "custom":
        method, path = rule.custom.kind.upper(), rule.custom.path
    else:
        method, path = kind.upper(), getattr(rule, kind)
    descriptor = request_class.DESCRIPTOR
    template = compile_template(path)
    for variable in template.variables:
        if resolve_field(descriptor, variable) is None:
            raise RuleError(f"path {path!r}: {descriptor.full_name} has no field {variable!r}")
    if rule.body not in ("", "*") and resolve_field(descriptor, rule.body) is None:
        raise RuleError(f"body: {descriptor.full_name} has no field {rule.body!r}")
    if rule.response_body and response_class.DESCRIPTOR.fields_by_name.get(rule.response_body) is None:
        raise RuleError(f"response_body: {response_class.DESCRIPTOR.full_name} has no field {rule.response_body!r}")
    return Binding(
        method,
        template,
        rpc_path,
        request_class,
        response_class,
        rule.body,
        rule.response_body,
        streaming,
        f"{full}: {method} {path}",
    )


def resolve_field(descriptor: Any, path: str) -> Any:
    """The field a dotted path names (proto or JSON names), or None."""
    found = None
    for part in path.split("."):
        if descriptor is None:
            return None
        found = descriptor.fields_by_name.get(part) or descriptor.fields_by_camelcase_name.get(part)
        if found is None:
            return None
        descriptor = found.message_type
    return found
