"""The admin API's endpoints: a table of (method, path pattern) -> handler.

A request a browser was tricked into sending (a `Host` that is not this listener's name, a
POST from another site's page) is refused first (guard.py). Then every request is checked
for the bearer token (when `admin.token` is set), so an unauthenticated client learns
nothing, not even which paths exist. The one exception is the dashboard's static files
(`GET /` and `GET /dashboard/FILE`): a browser cannot send a bearer token when it opens a
page, so the page loads without one and then asks for the token, which it sends with each
API call. Those files hold no data about the gateway (docs/admin.md). Then the path is
matched against `ENDPOINTS`: a path that matches under other methods gets 405 with `Allow`,
one that matches nothing 404, both in the contract's JSON error shape. Path parameters are
percent-decoded (`[::1]:80` may arrive as `%5B::1%5D:80`).

The handlers read the whole gateway through `AdminNode` (node.py); what is the same in
every worker (routes, config) is read from this process's snapshot.
"""

from __future__ import annotations

import hmac
import json
import posixpath
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

from bastion.admin import guard
from bastion.admin.http import AdminRequest, AdminResponse, error_response
from bastion.admin.node import AdminNode, TargetNotFound
from bastion.admin.openapi import document
from bastion.admin.redact import redact
from bastion.config.types import parse_duration
from bastion.observability.exposition import CONTENT_TYPE, render
from bastion.observability.window import INTERVAL, KEEP

if TYPE_CHECKING:
    from bastion.config.build import Snapshot
    from bastion.config.schema import Admin

Params = dict[str, str]
Endpoint = Callable[["AdminAPI", AdminRequest, Params], Awaitable[AdminResponse]]

PLACEHOLDER = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Bastion</title></head>
<body><h1>Bastion admin API</h1>
<p>The dashboard is not installed. The API: <a href="/status">/status</a>, <a href="/upstreams">/upstreams</a>,
<a href="/routes">/routes</a>, <a href="/metrics">/metrics</a>, <a href="/openapi.json">/openapi.json</a>.</p>
</body></html>
"""


DASHBOARD_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
"""Content types of the dashboard's files: fixed here, not guessed from the host's mime.types
(with `nosniff`, a browser refuses a script or stylesheet served under the wrong type)."""

DASHBOARD_HEADERS = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
]
"""Sent with every dashboard file: the page may talk to this listener only (no CDN, no other
host, even if someone slips markup into a route name), and may not be framed."""

PUBLIC_PREFIX = "/dashboard/"


def _json(status: int, data: Any) -> AdminResponse:
    return AdminResponse(status, json.dumps(data, indent=1).encode() + b"\n")


class AdminAPI:
    def __init__(self, node: AdminNode) -> None:
        self.node = node
        self.settings: Admin | None = None  # the running config's `admin` (the token)

    @property
    def snapshot(self) -> Snapshot:
        snapshot = self.node.gateway.running_snapshot
        assert snapshot is not None, "the admin listener opens once a config is live"
        return snapshot

    async def handle(self, request: AdminRequest) -> AdminResponse:
        settings = self.settings
        refused = guard.refuse(request, settings.bind) if settings is not None else None
        if refused is not None:
            return refused
        if (
            settings is not None
            and settings.token is not None
            and not _public(request)
            and not _authorized(request, settings.token)
        ):
            response = error_response(
                401, "unauthorized", "This admin API needs Authorization: Bearer TOKEN.", request.request_id
            )
            response.headers.append(("www-authenticate", 'Bearer realm="bastion admin"'))
            return response
        segments = [unquote(s) for s in request.path.split("/")[1:]] if request.path.startswith("/") else None
        if segments is None:
            return error_response(400, "bad_request", "The request target must be a path.", request.request_id)
        if segments == [""]:
            segments = []
        method = "GET" if request.method == "HEAD" else request.method
        allowed: list[str] = []
        for verb, pattern, endpoint in ENDPOINTS:
            params = _match(pattern, segments)
            if params is None:
                continue
            if verb == method:
                return await endpoint(self, request, params)
            allowed.append(verb)
        if allowed:
            if "GET" in allowed:
                allowed.append("HEAD")
            response = error_response(
                405,
                "method_not_allowed",
                f"{request.method} is not allowed here (allowed: {', '.join(allowed)}).",
                request.request_id,
            )
            response.headers.append(("allow", ", ".join(allowed)))
            return response
        return error_response(404, "not_found", f"No admin endpoint at {request.path}.", request.request_id)

    # --- reading ---------------------------------------------------------------------------

    async def dashboard(self, request: AdminRequest, params: Params) -> AdminResponse:
        page = _dashboard_file("index.html")
        body = page if page is not None else PLACEHOLDER
        return AdminResponse(200, body, DASHBOARD_TYPES[".html"], list(DASHBOARD_HEADERS))

    async def dashboard_file(self, request: AdminRequest, params: Params) -> AdminResponse:
        name = params["file"]
        kind = DASHBOARD_TYPES.get(posixpath.splitext(name)[1].lower())
        data = _dashboard_file(name) if kind is not None else None
        if data is None or kind is None:
            return error_response(404, "not_found", f"No dashboard file {name!r}.", request.request_id)
        return AdminResponse(200, data, kind, list(DASHBOARD_HEADERS))

    async def metrics(self, request: AdminRequest, params: Params) -> AdminResponse:
        return AdminResponse(200, render(await self.node.merged()), CONTENT_TYPE)

    async def healthz(self, request: AdminRequest, params: Params) -> AdminResponse:
        return _json(200, {"status": "ok"})

    async def readyz(self, request: AdminRequest, params: Params) -> AdminResponse:
        reports = await self.node.reports()
        ready = sum(1 for r in reports if r["ready"])
        expected = self.node.expected
        body = {"ready": ready >= expected, "workers_expected": expected, "workers_ready": ready}
        return _json(200 if ready >= expected else 503, body)

    async def status(self, request: AdminRequest, params: Params) -> AdminResponse:
        return _json(200, (await self.node.merged())["status"])

    async def routes(self, request: AdminRequest, params: Params) -> AdminResponse:
        snapshot = self.snapshot
        by_name = {route.name: route for route in snapshot.routes}
        rows = []
        for row in snapshot.router.table():
            route = by_name[row.name]
            match = route.config.match
            kind, _, path = row.path.partition(" ")
            rows.append(
                {
                    "order": row.order,
                    "name": row.name,
                    "hosts": list(match.hosts),
                    "path": path,
                    "path_kind": kind,
                    "methods": list(match.methods),
                    "headers": dict(match.headers),
                    "upstream": route.upstream.name,
                    "strip_prefix": route.strip_prefix,
                    "plugins": [plugin.name for plugin in route.plugins],
                }
            )
        return _json(200, {"routes": rows})

    async def upstreams(self, request: AdminRequest, params: Params) -> AdminResponse:
        merged = (await self.node.merged())["upstreams"]
        return _json(200, {"upstreams": [{"name": name, **upstream} for name, upstream in merged.items()]})

    async def stats(self, request: AdminRequest, params: Params) -> AdminResponse:
        values = parse_qs(request.query, keep_blank_values=True).get("window", ["1m"])
        try:
            seconds = parse_duration(values[-1])
        except ValueError:
            seconds = -1.0
        if not INTERVAL <= seconds <= KEEP:
            return error_response(
                400,
                "bad_request",
                f"window must be a duration from {INTERVAL:g}s to {KEEP / 60:g}m, like 1m or 30s.",
                request.request_id,
            )
        return _json(200, await self.node.traffic(seconds))

    async def errors(self, request: AdminRequest, params: Params) -> AdminResponse:
        return _json(200, await self.node.recent_errors())

    async def config(self, request: AdminRequest, params: Params) -> AdminResponse:
        data = self.snapshot.config.model_dump(mode="json", by_alias=True)
        return _json(200, redact(data))

    async def openapi(self, request: AdminRequest, params: Params) -> AdminResponse:
        return _json(200, document())

    # --- steering --------------------------------------------------------------------------

    async def drain(self, request: AdminRequest, params: Params) -> AdminResponse:
        return await self._set_drained(request, params, True)

    async def enable(self, request: AdminRequest, params: Params) -> AdminResponse:
        return await self._set_drained(request, params, False)

    async def _set_drained(self, request: AdminRequest, params: Params, drained: bool) -> AdminResponse:
        try:
            result = await self.node.set_drained(params["name"], params["address"], drained)
        except TargetNotFound as exc:
            return error_response(404, "not_found", str(exc), request.request_id)
        return _json(200, result)

    async def reload(self, request: AdminRequest, params: Params) -> AdminResponse:
        answers = await self.node.reload()
        answered = [a for a in answers if a is not None]
        refused = [a for a in answered if not a["applied"]]
        if refused:
            problems = list(dict.fromkeys(p for a in refused for p in a["problems"]))
            return error_response(
                422,
                "config_rejected",
                "The new config was refused; the running one stays.",
                request.request_id,
                problems=problems,
                workers=len(answers),
                workers_applied=len(answered) - len(refused),
            )
        if len(answered) < len(answers):
            return error_response(
                503,
                "workers_unavailable",
                f"{len(answers) - len(answered)} of {len(answers)} workers did not answer; the others reloaded.",
                request.request_id,
            )
        return _json(200, {"result": "applied", "config": answered[0]["config"], "workers": len(answered)})


def _public(request: AdminRequest) -> bool:
    """The dashboard's static files, which a browser must load before it can send a token."""
    return request.method in ("GET", "HEAD") and (request.path == "/" or request.path.startswith(PUBLIC_PREFIX))


def _authorized(request: AdminRequest, token: str) -> bool:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def _match(pattern: tuple[str, ...], segments: list[str]) -> Params | None:
    if len(pattern) != len(segments):
        return None
    params: Params = {}
    for part, segment in zip(pattern, segments, strict=True):
        if part.startswith("{"):
            if not segment:
                return None
            params[part[1:-1]] = segment
        elif part != segment:
            return None
    return params


def _dashboard_file(name: str) -> bytes | None:
    """A file of `bastion/admin/dashboard/` (no subdirectories, no dot files), or None."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    try:
        resource = resources.files("bastion.admin").joinpath("dashboard").joinpath(name)
        return resource.read_bytes() if resource.is_file() else None
    except (OSError, ModuleNotFoundError):
        return None


def _pattern(path: str) -> tuple[str, ...]:
    return tuple(path.split("/")[1:]) if path != "/" else ()


ENDPOINTS: list[tuple[str, tuple[str, ...], Endpoint]] = [
    ("GET", _pattern("/"), AdminAPI.dashboard),
    ("GET", _pattern("/dashboard/{file}"), AdminAPI.dashboard_file),
    ("GET", _pattern("/metrics"), AdminAPI.metrics),
    ("GET", _pattern("/healthz"), AdminAPI.healthz),
    ("GET", _pattern("/readyz"), AdminAPI.readyz),
    ("GET", _pattern("/status"), AdminAPI.status),
    ("GET", _pattern("/routes"), AdminAPI.routes),
    ("GET", _pattern("/upstreams"), AdminAPI.upstreams),
    ("GET", _pattern("/stats"), AdminAPI.stats),
    ("GET", _pattern("/errors"), AdminAPI.errors),
    ("POST", _pattern("/upstreams/{name}/targets/{address}/drain"), AdminAPI.drain),
    ("POST", _pattern("/upstreams/{name}/targets/{address}/enable"), AdminAPI.enable),
    ("POST", _pattern("/reload"), AdminAPI.reload),
    ("GET", _pattern("/config"), AdminAPI.config),
    ("GET", _pattern("/openapi.json"), AdminAPI.openapi),
]
"""Every endpoint; /openapi.json documents exactly these paths (a test holds them together)."""
