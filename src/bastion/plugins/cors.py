"""cors: cross-origin requests, decided at the gateway.

A preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered here and
never reaches the upstream: 204 with the allow headers when the origin is configured, 403
otherwise. On other requests, a configured origin gets Access-Control-Allow-Origin (and the
credentials / expose headers) on the response; any access-control-* headers the upstream
sent are removed first, so only configured origins ever see allow headers, whatever the
upstream does. The plugin runs before authentication, so preflights (which carry no
credentials) are not refused with 401 and a browser can read the 401 of a real request.

Origins are exact (`https://app.example.com`), `*` (any), or a subdomain pattern
(`https://*.example.com`, which does not match `https://example.com` itself).
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from bastion.config.schema import HTTP_METHODS
from bastion.config.types import Duration
from bastion.http.model import Headers, Response
from bastion.pipeline import BuildEnv, Context, Plugin, PluginConfig, Reply
from bastion.plugins import register
from bastion.plugins.common import TOKEN

_ORIGIN = b"origin"
_REQUEST_METHOD = b"access-control-request-method"
_REQUEST_HEADERS = b"access-control-request-headers"
_ACAO = b"access-control-allow-origin"
_ACAC = b"access-control-allow-credentials"
_ACEH = b"access-control-expose-headers"
_VARY = b"vary"
_PATTERN = re.compile(r"^(https?)://(\*\.)?([a-z0-9.-]+)(:\d+)?$")


class CorsConfig(PluginConfig):
    origins: list[str] = Field(min_length=1, description="Allowed origins: exact, *, or https://*.example.com.")
    methods: list[str] = Field(
        default_factory=lambda: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
        description="Methods a preflight allows.",
    )
    headers: list[str] = Field(default_factory=list, description="Request headers a preflight allows; * echoes.")
    expose_headers: list[str] = Field(default_factory=list, description="Response headers scripts may read.")
    credentials: bool = Field(False, description="Allow cookies and Authorization (Allow-Credentials: true).")
    max_age: Duration | None = Field(None, description="How long a browser may cache a preflight answer.")

    @field_validator("origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        out = []
        for origin in value:
            origin = origin.strip().lower().rstrip("/")
            if origin != "*" and not _PATTERN.match(origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port]), * or https://*.domain")
            out.append(origin)
        return out

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        out = [m.upper() for m in value]
        for method in out:
            if method not in HTTP_METHODS:
                raise ValueError(f"not an HTTP method: {method!r}")
        return out

    @field_validator("headers", "expose_headers")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            if name != "*" and not TOKEN.match(name):
                raise ValueError(f"not a header name: {name!r}")
        return value

    @model_validator(mode="after")
    def _star_and_credentials(self) -> CorsConfig:
        if "*" in self.expose_headers and self.credentials:
            raise ValueError("expose_headers * has no effect with credentials; list the headers")
        return self


@register
class Cors(Plugin):
    name = "cors"
    Config = CorsConfig
    stage = Plugin.PREFLIGHT

    def __init__(self, config: CorsConfig, env: BuildEnv) -> None:
        super().__init__(config, env)
        self.any = "*" in config.origins
        self.exact = frozenset(o.encode() for o in config.origins if "*" not in o)
        patterns = [
            rf"{re.escape(m.group(1))}://([a-z0-9-]+\.)+{re.escape(m.group(3))}{re.escape(m.group(4) or '')}"
            for o in config.origins
            if o != "*" and (m := _PATTERN.match(o)) is not None and m.group(2)
        ]
        self.pattern = re.compile(("^(?:" + "|".join(patterns) + ")$").encode()) if patterns else None
        # With credentials, browsers refuse "*": the origin is echoed instead.
        self.star = self.any and not config.credentials
        self.methods = ", ".join(config.methods).encode()
        self.echo_headers = "*" in config.headers
        self.allow_headers = ", ".join(h for h in config.headers if h != "*").encode()
        self.credentials = config.credentials
        self.expose = ", ".join(config.expose_headers).encode()
        self.max_age = str(int(config.max_age)).encode() if config.max_age is not None else None

    def allowed(self, origin: bytes) -> bool:
        if self.any or origin in self.exact:
            return True
        return self.pattern is not None and self.pattern.match(origin.lower()) is not None

    async def on_request(self, ctx: Context) -> Reply | None:
        request = ctx.request
        if request.method != "OPTIONS":
            return None
        headers = request.headers
        origin = headers.get_raw(_ORIGIN)
        if origin is None or headers.get_raw(_REQUEST_METHOD) is None:
            return None  # a plain OPTIONS request: the upstream's business
        ctx.vars["cors.preflight"] = True  # answered here: the response hook adds nothing to it
        if not self.allowed(origin):
            return Reply.error(403, "cors_forbidden", "The origin is not allowed.", Headers([(_VARY, b"Origin")]))
        out = [
            (_ACAO, b"*" if self.star else origin),
            (b"access-control-allow-methods", self.methods),
        ]
        if not self.star:
            out.append((_VARY, b"Origin"))
        requested = headers.get_raw(_REQUEST_HEADERS)
        if self.echo_headers and requested:
            out.append((b"access-control-allow-headers", requested))
        elif self.allow_headers:
            out.append((b"access-control-allow-headers", self.allow_headers))
        if self.credentials:
            out.append((_ACAC, b"true"))
        if self.max_age is not None:
            out.append((b"access-control-max-age", self.max_age))
        return Reply(204, b"", Headers(out))

    async def on_response(self, ctx: Context, response: Response) -> None:
        origin = ctx.request.headers.get_raw(_ORIGIN)
        if origin is None:
            return
        if ctx.vars.get("cors.preflight"):
            return  # our own preflight answer (204 or 403), already complete
        headers = response.headers
        items = [item for item in headers.items if not item[0].startswith(b"access-control-")]
        if self.allowed(origin):
            items.append((_ACAO, b"*" if self.star else origin))
            if self.credentials:
                items.append((_ACAC, b"true"))
            if self.expose:
                items.append((_ACEH, self.expose))
        if not self.star:
            items.append((_VARY, b"Origin"))
        headers.items = items
