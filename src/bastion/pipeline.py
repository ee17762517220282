"""The plugin pipeline: request hooks in order, response hooks in reverse, then log hooks.

A plugin is a class with a typed `Config` model and up to three hooks. `on_request` either
returns None (continue) or a `Reply` (short-circuit: the gateway answers, the upstream is
never contacted; the response hooks of the plugins that already ran still run). A chain is
built once per config snapshot; it keeps only the plugins that override each hook, so a
route without plugins costs nothing per request.

This module is also the public API for custom plugins (`python: {module: "pkg.mod:Class"}`):
subclass `Plugin`, give it a `PluginConfig` model, override the hooks you need. Everything a
plugin may touch is here: `Context`, `Reply`, `BuildEnv`, and the `Headers` / `Request` /
`Response` models re-exported from `bastion.http.model`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from bastion.config.schema import Consumer
from bastion.errors import GatewayError
from bastion.http.model import Headers, Request, Response
from bastion.http.streams import Transcoder

if TYPE_CHECKING:
    from bastion.config.schema import Loc
    from bastion.plugins.consumers import ConsumerIndex
    from bastion.store.base import Store

__all__ = [
    "BuildEnv",
    "Consumer",
    "Context",
    "Headers",
    "Plugin",
    "PluginConfig",
    "PluginConfigError",
    "PluginError",
    "PluginProblems",
    "Reply",
    "Request",
    "Response",
    "plugin_failed",
]

log = logging.getLogger("bastion.plugins")

_X_CONSUMER = b"x-consumer"


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


class RateState:
    """The most constrained rate limit of a request so far, for the RateLimit-* headers."""

    __slots__ = ("limit", "remaining", "reset", "policy", "written")

    def __init__(self, limit: int, remaining: int, reset: int, policy: bytes) -> None:
        self.limit = limit
        self.remaining = remaining
        self.reset = reset
        self.policy = policy
        self.written = False


class Context:
    """Per-request state shared by the plugins of one request.

    `client_ip` starts as the socket peer; ip_filter replaces it with the address named by
    X-Forwarded-For when the peer is a trusted proxy, and later plugins (rate_limit key ip)
    read it from here.
    """

    __slots__ = (
        "request",
        "route_name",
        "params",
        "client_ip",
        "consumer",
        "claims",
        "vars",
        "response",
        "upstream_name",
        "max_body",
        "rate",
        "transcoder",
    )

    def __init__(self, request: Request, route_name: str, params: dict[str, str] | None) -> None:
        self.request = request
        self.route_name = route_name
        self.params = params or {}
        self.client_ip = request.client_ip
        self.consumer: Consumer | None = None
        self.claims: dict[str, Any] | None = None
        self.vars: dict[str, Any] = {}
        self.response: Response | None = None
        self.upstream_name = ""
        self.max_body: int | None = None  # set by body_limit; the proxy enforces it while streaming
        self.rate: RateState | None = None  # set by rate_limit
        self.transcoder: Transcoder | None = None  # set by grpc_json: rewrites both bodies

    def authenticate(self, consumer: Consumer) -> None:
        """Record who is calling and tell the upstream (X-Consumer).

        Any X-Consumer already on the request is removed first: the client's is stripped by
        the protocol layer, but an earlier authentication or a custom plugin may have set one.
        """
        self.consumer = consumer
        headers = self.request.headers
        items = headers.items
        for name, _ in items:  # a plain loop: this runs on every authenticated request
            if name == _X_CONSUMER:
                items = headers.items = [item for item in items if item[0] != _X_CONSUMER]
                break
        items.append((_X_CONSUMER, consumer.name.encode("latin-1")))


@dataclass(frozen=True, slots=True)
class BuildEnv:
    """What a plugin gets when it is built, besides its config.

    `consumers` and `store` are shared by every plugin of a snapshot; `scope` is "" for a
    global plugin and the route's name for a route plugin (so a counter can be per route).
    """

    consumers: ConsumerIndex
    store: Store
    scope: str = ""
    config_path: str = ""


class PluginProblems(ValueError):
    """Config problems a plugin finds itself, each with a key path below the plugin's entry."""

    def __init__(self, problems: Sequence[tuple[Loc, str]]) -> None:
        super().__init__("; ".join(message for _, message in problems))
        self.problems = list(problems)


class PluginConfigError(ValueError):
    """A config model below a plugin's entry refused its settings: the `python` plugin raises it
    for its class's `config:`, so those errors read like any other (`did you mean ...`)."""

    def __init__(self, error: ValidationError, model: type[BaseModel], prefix: Loc) -> None:
        super().__init__(str(error))
        self.error = error
        self.model = model
        self.prefix = prefix


class PluginError(GatewayError):
    """A plugin raised: that request gets a 500, the gateway carries on."""

    word = "plugin_error"
    message = "A plugin failed to handle the request."


def plugin_failed(plugin: Plugin, phase: str, exc: BaseException, request_id: str) -> PluginError:
    """Log a plugin's unexpected exception (with its name) and make the 500 for the client."""
    log.error("plugin %s failed in its %s hook (request %s)", plugin.name, phase, request_id, exc_info=exc)
    return PluginError()


class Plugin:
    """Base class of every plugin, built-in or custom.

    `stage` orders plugins across the global and route lists: network checks (50) run first,
    then CORS preflights (60), authentication (100), authorization (200), traffic control
    (300) and transformations (400); within a stage, global plugins run first, then the
    route's, in list order.

    Construction happens when the config is loaded and must not do I/O: raise ValueError
    (or PluginProblems) for a bad config. I/O belongs in `start()`.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    stage: ClassVar[int] = 400

    NETWORK: ClassVar[int] = 50
    PREFLIGHT: ClassVar[int] = 60
    AUTHENTICATION: ClassVar[int] = 100
    AUTHORIZATION: ClassVar[int] = 200
    TRAFFIC: ClassVar[int] = 300
    TRANSFORM: ClassVar[int] = 400

    # Request fields this plugin sets from what it verified (jwt's forward_claims): the gateway
    # removes client-sent copies on every route, not only where this plugin runs.
    identity_headers: frozenset[bytes] = frozenset()
    # An authentication plugin's WWW-Authenticate challenge (b'Key realm="api"'): acl repeats
    # the challenges of a route's authentication plugins on its own 401.
    challenge: bytes | None = None

    def __init__(self, config: Any, env: BuildEnv) -> None:
        self.config = config
        self.env = env

    @classmethod
    def create(cls, raw: Any, env: BuildEnv) -> Plugin:
        """Validate a raw config entry and build the plugin (pydantic errors propagate)."""
        return cls(cls.Config.model_validate(raw if raw is not None else {}), env)

    def check_chain(self, chain: Sequence[Plugin]) -> str | None:
        """A problem with the route chain this plugin ends up in (e.g. acl without auth), or None.

        Runs together with every other check of the config, so an entry of the chain that has
        problems of its own is there as an instance of its class that was never initialised:
        look only at the other plugins' class attributes (`stage`, `name`, the class itself).
        """
        return None

    def prepare_route(self, route: str, chain: Sequence[Plugin]) -> None:
        """Called once per route this plugin serves, when the whole config is valid, with that
        route's ordered chain: precompute what depends on the other plugins (acl: their
        challenges; rate_limit: every limit of the route for RateLimit-Policy)."""

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
