"""The plugin pipeline: request hooks in order, response hooks in reverse, then log hooks.

A plugin is a class with a typed `Config` model and up to three hooks. `on_request` either
returns None (continue) or a `Reply` (short-circuit: the gateway answers, the upstream is
never contacted; the response hooks of the plugins that already ran still run). A chain is
built once per config snapshot; it keeps only the plugins that override each hook, so a
route without plugins costs nothing per request.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from bastion.http.model import Headers, Request, Response


class PluginConfig(BaseModel):
    """Base for plugin config models: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Reply:
    """A response a plugin makes instead of forwarding the request."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, body: bytes = b"", headers: Headers | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else Headers()

    @classmethod
    def error(cls, status: int, word: str, message: str, headers: Headers | None = None) -> Reply:
        """The contract's JSON error; the request id is filled in when it is sent."""
        reply = cls(status, b"", headers)
        reply.body = json.dumps({"error": word, "message": message}).encode()
        return reply


class Context:
    """Per-request state shared by the plugins of one request."""

    __slots__ = (
        "request",
        "route_name",
        "params",
        "consumer",
        "claims",
        "vars",
        "response",
        "upstream_name",
        "max_body",
    )

    def __init__(self, request: Request, route_name: str, params: dict[str, str] | None) -> None:
        self.request = request
        self.route_name = route_name
        self.params = params or {}
        self.consumer: Any = None  # bastion.config.schema.Consumer once authenticated
        self.claims: dict[str, Any] | None = None
        self.vars: dict[str, Any] = {}
        self.response: Response | None = None
        self.upstream_name = ""
        self.max_body: int | None = None  # set by body_limit; the proxy enforces it while streaming


class Plugin:
    """Base class of every plugin, built-in or custom.

    `stage` orders plugins across the global and route lists: authentication (100) always
    runs before authorization (200) and traffic control (300); within a stage, global
    plugins run first, then the route's, in list order.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    stage: ClassVar[int] = 400

    AUTHENTICATION: ClassVar[int] = 100
    AUTHORIZATION: ClassVar[int] = 200
    TRAFFIC: ClassVar[int] = 300
    TRANSFORM: ClassVar[int] = 400

    def __init__(self, config: Any) -> None:
        self.config = config

    async def start(self) -> None:
        """Called once when the snapshot goes live (open clients, start refreshers)."""

    async def close(self) -> None:
        """Called when the snapshot is retired; safe after a partial start."""

    async def on_request(self, ctx: Context) -> Reply | None:
        return None

    async def on_response(self, ctx: Context, response: Response) -> None:
        return None

    def on_log(self, ctx: Context, record: dict[str, Any]) -> None:
        return None
