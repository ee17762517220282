"""The config file's models. Every model forbids unknown keys: typos must not pass silently.

These models are the single source of truth for the config reference (docs/config.md) and
for `bastion schema`. Cross-references (a route naming an upstream) are checked in
`cross_check`, which returns problems with their key paths so the loader can report them
together with the model's own errors.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from bastion.config.types import Address, Duration, HostPort, Size

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A template segment: `{name}`, a whole segment (the router compiles templates with it).
TEMPLATE_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def path_problem(path: str) -> str | None:
    """Why `path` is not a usable prefix or template, or None; config checks can reuse it."""
    seen: set[str] = set()
    for segment in path[1:].split("/"):
        if "{" not in segment and "}" not in segment:
            continue
        found = TEMPLATE_PARAM.fullmatch(segment)
        if found is None:
            return f"segment {segment!r} must be exactly {{name}} (a param is a whole segment)"
        if found.group(1) in seen:
            return f"param {{{found.group(1)}}} appears twice"
        seen.add(found.group(1))
    return None


# --- listeners -------------------------------------------------------------------------------


class ListenerTimeouts(Model):
    header: Duration = Field(10.0, description="Time a client has to send a complete request head.")
    keepalive: Duration = Field(75.0, description="How long an idle keep-alive client connection stays open.")
    body: Duration = Field(60.0, description="Longest gap between two reads of a request body.")
    send: Duration = Field(60.0, description="Longest time a response write may stay blocked on a slow client.")
    idle: Duration = Field(
        3600.0,
        gt=0,
        description="tcp and tls_passthrough listeners: a connection with no byte moving either way for this "
        "long is closed (close_reason idle_timeout).",
    )


class ListenerLimits(Model):
    max_header_bytes: Size = Field(32 * 1024, ge=1024, description="Request line + headers; over it: 431.")
    max_uri_bytes: Size = Field(8 * 1024, ge=256, description="Request target; over it: 414.")
    max_headers: int = Field(100, ge=1, le=10000, description="Number of header fields; over it: 431.")
    max_requests_per_connection: int = Field(0, ge=0, description="0 means unlimited.")
    min_body_rate: Size = Field(
        1024,
        ge=0,
        description="Slowest request-body upload accepted, in bytes per second averaged from the body's start, "
        "after a grace of timeouts.body; a slower client gets 400 and is closed. 0: no minimum.",
    )
    max_connections: int = Field(
        0,
        ge=0,
        description="tcp and tls_passthrough listeners: open client connections at most; one more is closed at "
        "once (close_reason over_limit). 0: unlimited.",
    )
    h2_max_concurrent_streams: int = Field(
        100, ge=1, le=10000, description="HTTP/2: streams one client connection may have open at once."
    )
    h2_initial_window_size: Size = Field(
        65535,
        ge=1024,
        le=2**31 - 1,
        description="HTTP/2: request body bytes a client may send on one stream before the gateway has "
        "passed them on (the stream's flow-control window).",
    )
    h2_connection_window: Size = Field(
        1024 * 1024,
        ge=65535,
        le=2**31 - 1,
        description="HTTP/2: request body bytes in flight on one connection, all streams together.",
    )
    h2_max_frame_size: Size = Field(
        16384, ge=16384, le=16777215, description="HTTP/2: largest frame payload the gateway accepts."
    )
    h2_max_resets: int = Field(
        200,
        ge=1,
        description="HTTP/2: streams a client may cancel (RST_STREAM) per 10 seconds; above it the "
        "connection ends with GOAWAY ENHANCE_YOUR_CALM (rapid reset, CVE-2023-44487).",
    )
    h2_max_control_frames: int = Field(
        1000,
        ge=10,
        description="HTTP/2: PING, SETTINGS, PRIORITY and empty DATA frames a client may send per 10 "
        "seconds; above it the connection ends with GOAWAY ENHANCE_YOUR_CALM.",
    )


def _tls_version(value: Any) -> Any:
    """`min_version: 1.2` unquoted is a YAML float: take it as the string it reads as."""
    return f"{value:g}" if isinstance(value, float) else value


TlsVersion = Annotated[Literal["1.2", "1.3"], BeforeValidator(_tls_version)]


class TlsCertificate(Model):
    cert: str = Field(
        min_length=1,
        description="PEM file: the certificate, then its intermediates. Relative paths start at the config "
        "file's directory.",
    )
    key: str = Field(min_length=1, description="PEM file: the certificate's private key (not encrypted).")


class ListenerTls(Model):
    certificates: list[TlsCertificate] = Field(
        min_length=1,
        description="SNI picks one: exact names, then wildcards, then the first. Names come from each "
        "certificate's subjectAltName DNS entries (its CN when it has none).",
    )
    min_version: TlsVersion = Field("1.2", description="Oldest TLS version accepted: 1.2 or 1.3.")
    client_ca: str | None = Field(
        None,
        description="PEM file of CAs that sign client certificates: clients may then present one "
        "(mTLS; the mtls_auth plugin maps it to a consumer). A certificate that does not verify fails the handshake.",
    )


def _cidrs(value: list[str]) -> list[str]:
    for spec in value:
        try:
            ipaddress.ip_network(spec.strip(), strict=False)
        except ValueError as exc:
            raise ValueError(f"{spec!r} is not an IP address or CIDR range ({exc})") from None
    return value


class ProxyProtocolAccept(Model):
    accept: bool = Field(
        False,
        description="Read a PROXY protocol header (v1 or v2) at the start of every connection; its client "
        "address replaces the socket peer (X-Forwarded-For, ip_filter, rate limits, logs). Without a valid "
        "header within timeouts.header the connection is closed.",
    )
    trusted: list[str] = Field(
        default_factory=list,
        description="CIDR ranges of the front balancers allowed to connect; any other peer is closed at once "
        "(0.0.0.0/0 and ::/0 trust everyone).",
    )

    @field_validator("trusted")
    @classmethod
    def _trusted(cls, value: list[str]) -> list[str]:
        return _cidrs(value)

    @model_validator(mode="after")
    def _trusted_when_accepting(self) -> ProxyProtocolAccept:
        if self.accept and not self.trusted:
            raise ValueError("accept: true needs trusted: [CIDR, ...] (the addresses of the front balancers)")
        return self


class ListenerUdp(Model):
    session_idle: Duration = Field(
        30.0, gt=0, description="A client address with no datagram either way for this long loses its session."
    )
    max_sessions: int = Field(
        10000,
        ge=1,
        description="Client sessions kept at once; at the limit a new client takes the place of the least "
        "recently active session.",
    )
    max_datagram: Size = Field(
        65535, ge=512, le=65535, description="Largest datagram relayed either way; bigger ones are dropped."
    )


_SNI_HOST = re.compile(r"^(\*|(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*)$")


class SniRoute(Model):
    hosts: list[str] = Field(
        min_length=1,
        description="Server names (SNI) this route takes: exact names, *.suffix wildcards (any depth, longest "
        "suffix first) or * for every other hello, SNI-less and malformed ones included.",
    )
    upstream: str = Field(min_length=1, description="The upstream whose targets get the bytes, untouched.")

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        out = []
        for host in value:
            host = host.strip().lower().rstrip(".")
            if not _SNI_HOST.match(host):
                raise ValueError(f"not a host name, *.wildcard or *: {host!r}")
            out.append(host)
        return out


L4_PROTOCOLS = ("tcp", "tls_passthrough")
_HTTP_ONLY_TIMEOUTS = ("keepalive", "body", "send")
_HTTP_ONLY_LIMITS = (
    "max_header_bytes",
    "max_uri_bytes",
    "max_headers",
    "max_requests_per_connection",
    "min_body_rate",
    "h2_max_concurrent_streams",
    "h2_initial_window_size",
    "h2_connection_window",
    "h2_max_frame_size",
    "h2_max_resets",
    "h2_max_control_frames",
)


class Listener(Model):
    name: str = Field(min_length=1)
    bind: Address
    protocol: Literal["http", "https", "tcp", "tls_passthrough", "udp"] = "http"
    tls: ListenerTls | None = Field(
        None, description="Certificates and TLS settings; required for https, optional on tcp (TLS terminated first)."
    )
    upstream: str | None = Field(
        None,
        description="tcp and udp listeners: the upstream whose targets get the relayed bytes or datagrams "
        "(required there).",
    )
    sni_routes: list[SniRoute] | None = Field(
        None,
        description="tls_passthrough listeners: the upstream for each server name read from the ClientHello "
        "(required there); exact names win over wildcards, wildcards over *.",
    )
    http2: bool | Literal["prior_knowledge"] | None = Field(
        None,
        description="https: offer h2 in ALPN (default true). http: prior_knowledge serves cleartext HTTP/2 "
        "to clients that start with its preface (HTTP/1.1 otherwise).",
    )
    redirect_https: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="On an http listener: answer every request with 308 to https://HOST:PORT/path, no route, "
        "no upstream.",
    )
    timeouts: ListenerTimeouts = ListenerTimeouts()
    limits: ListenerLimits = ListenerLimits()
    backlog: int = Field(2048, ge=1)
    underscores_in_headers: bool = Field(
        False,
        description="Keep request header fields whose names contain '_' (dropped by default: CGI and WSGI "
        "origins read X_Consumer as X-Consumer).",
    )
    proxy_protocol: ProxyProtocolAccept | None = Field(
        None, description="Accept the PROXY protocol from front balancers (http, https and tcp listeners)."
    )
    udp: ListenerUdp | None = Field(None, description="Sessions of a udp listener (defaults when omitted).")

    @model_validator(mode="after")
    def _l4_keys_match_protocol(self) -> Listener:
        l4 = self.protocol in L4_PROTOCOLS or self.protocol == "udp"
        if self.protocol == "udp" and (
            "idle" in self.timeouts.model_fields_set or "max_connections" in self.limits.model_fields_set
        ):
            raise ValueError("a udp listener sets udp.session_idle and udp.max_sessions instead")
        if self.protocol == "tcp" and self.upstream is None:
            raise ValueError("a tcp listener needs upstream: NAME")
        if self.protocol not in ("tcp", "udp") and self.upstream is not None:
            raise ValueError(
                f"upstream is for tcp and udp listeners (this one is {self.protocol}; http ones use routes)"
            )
        if self.protocol == "tls_passthrough" and not self.sni_routes:
            raise ValueError("a tls_passthrough listener needs sni_routes: [{ hosts: [...], upstream: NAME }]")
        if self.protocol != "tls_passthrough" and self.sni_routes is not None:
            raise ValueError(f"sni_routes is for tls_passthrough listeners (this one is {self.protocol})")
        if l4:
            for key in ("http2", "redirect_https", "underscores_in_headers"):
                if key in self.model_fields_set:
                    raise ValueError(f"{key} is for http and https listeners (this one is {self.protocol})")
            for key in _HTTP_ONLY_TIMEOUTS:
                if key in self.timeouts.model_fields_set:
                    raise ValueError(f"timeouts.{key} is for http and https listeners (this one is {self.protocol})")
            for key in _HTTP_ONLY_LIMITS:
                if key in self.limits.model_fields_set:
                    raise ValueError(f"limits.{key} is for http and https listeners (this one is {self.protocol})")
        else:
            if "idle" in self.timeouts.model_fields_set:
                raise ValueError("timeouts.idle is for tcp and tls_passthrough listeners (http ones use keepalive)")
            if "max_connections" in self.limits.model_fields_set:
                raise ValueError("limits.max_connections is for tcp and tls_passthrough listeners")
        return self

    @model_validator(mode="after")
    def _tls_matches_protocol(self) -> Listener:
        if self.protocol == "https" and self.tls is None:
            raise ValueError("an https listener needs tls: { certificates: [{ cert: ..., key: ... }] }")
        if self.protocol not in ("https", "tcp") and self.tls is not None:
            raise ValueError(f"tls is for https and tcp listeners (this one is {self.protocol})")
        if self.redirect_https is not None and self.protocol != "http":
            raise ValueError("redirect_https is for http listeners")
        if self.http2 is True and self.protocol != "https":
            raise ValueError("http2: true is for https listeners (ALPN); cleartext HTTP/2 is http2: prior_knowledge")
        if self.http2 == "prior_knowledge" and self.protocol != "http":
            raise ValueError("http2: prior_knowledge is for http listeners; https negotiates h2 with ALPN (true)")
        if self.protocol == "udp" and self.upstream is None:
            raise ValueError("a udp listener needs upstream: NAME")
        if self.udp is not None and self.protocol != "udp":
            raise ValueError("udp is for udp listeners")
        if self.protocol == "udp" and self.proxy_protocol is not None and self.proxy_protocol.accept:
            raise ValueError("proxy_protocol is read on stream listeners (http, https, tcp), not udp")
        return self


# --- upstreams -------------------------------------------------------------------------------


class Target(Model):
    address: Address = Field(description="host:port of the target.")
    weight: int = Field(1, ge=0, le=10000, description="Share of traffic; 0 takes the target out of rotation.")
    backup: bool = Field(False, description="Used only when no primary target is healthy.")


class ActiveHealthCheck(Model):
    type: Literal["http", "tcp", "grpc"] = Field(
        "http",
        description="http: GET path, status checked; tcp: connect only; "
        "grpc: grpc.health.v1 Check, SERVING is healthy (h2 and h2c upstreams only).",
    )
    service: str = Field("", description="Service name asked of grpc checks; empty: the server as a whole.")
    path: str = Field("/", description="Path of http probes.")
    host: str | None = Field(None, description="Host header for http checks; default: the target address.")
    statuses: list[int] = Field(
        default_factory=lambda: list(range(200, 400)), min_length=1, description="Statuses that count as healthy."
    )
    interval: Duration = Field(5.0, description="Time between probes of one target.")
    timeout: Duration = Field(1.0, description="A probe that takes longer has failed.")
    healthy: int = Field(2, ge=1, description="Consecutive successes to mark a target healthy.")
    unhealthy: int = Field(2, ge=1, description="Consecutive failures to mark a target unhealthy.")

    @field_validator("path")
    @classmethod
    def _path_is_absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with /")
        return value


class PassiveHealthCheck(Model):
    max_failures: int = Field(3, ge=1, description="Consecutive failures that eject a target.")
    ejection: Duration = Field(10.0, description="How long an ejected target stays out.")


class HealthCheck(Model):
    active: ActiveHealthCheck | None = Field(None, description="Probes sent to every target; omitted: none.")
    passive: PassiveHealthCheck | None = Field(None, description="Ejection after failed requests; omitted: none.")


class Sticky(Model):
    cookie: str = Field("bastion_affinity", pattern=_TOKEN.pattern, description="Name of the affinity cookie.")
    ttl: Duration = Field(3600.0, description="Cookie lifetime (Max-Age); 0: a session cookie.")
    secret: str | None = Field(
        None,
        min_length=16,
        description="Key for the opaque cookie values; set it to keep pins across restarts and gateways.",
    )


class Retries(Model):
    attempts: int = Field(1, ge=0, le=10, description="Retries after the first try (0 disables).")
    on_statuses: list[Literal[502, 503, 504]] = Field(
        default_factory=list, description="Upstream statuses that are retried too (besides connection failures)."
    )
    budget: float = Field(0.2, ge=0.0, le=1.0, description="Retries allowed as a share of live requests.")
    min_retries_per_second: int = Field(10, ge=0, description="Retries always allowed, budget or not.")


class UpstreamTimeouts(Model):
    connect: Duration = Field(5.0, description="Longest wait for a connection to a target.")
    response: Duration = Field(60.0, description="From request sent to response head, and between body reads.")
    idle: Duration = Field(60.0, description="How long an idle pooled connection is kept.")


class Queue(Model):
    size: int = Field(0, ge=0, description="Requests that may wait for a connection slot; 0: none.")
    timeout: Duration = Field(1.0, description="Longest wait in the queue; then 503.")


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*$"
)


class UpstreamTls(Model):
    verify: bool = Field(True, description="Check the target's certificate chain and name (false: accept any).")
    ca: str | None = Field(None, description="PEM file of CAs to trust for the targets; default: the system's.")
    sni: str | None = Field(
        None, description="Server name sent and verified; default: the target's host (no SNI for an IP address)."
    )
    cert: str | None = Field(None, description="PEM client certificate to present to the targets (with key).")
    key: str | None = Field(None, description="PEM private key of cert.")

    @field_validator("sni")
    @classmethod
    def _sni(cls, value: str | None) -> str | None:
        if value is not None and not _HOSTNAME.match(value):
            raise ValueError(f"not a host name: {value!r}")
        return value

    @model_validator(mode="after")
    def _pair(self) -> UpstreamTls:
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both cert and key, or neither")
        return self


class Upstream(Model):
    balance: Literal["round_robin", "least_connections", "p2c_ewma", "consistent_hash", "random"] = "round_robin"
    hash_on: str = Field("ip", description="consistent_hash key: ip | path | header:NAME | cookie:NAME | query:NAME")
    targets: list[Target] = Field(min_length=1)
    health_check: HealthCheck = HealthCheck()
    sticky: Sticky | None = None
    retries: Retries = Retries()
    timeouts: UpstreamTimeouts = UpstreamTimeouts()
    max_connections: int = Field(1000, ge=1, description="Open connections per target.")
    max_idle_connections: int = Field(128, ge=0, description="Idle keep-alive connections kept per target.")
    queue: Queue = Queue()
    slow_start: Duration = Field(0.0, description="A target that joins or recovers ramps up over this window.")
    tls: UpstreamTls | None = Field(None, description="Connect to the targets over TLS.")
    send_proxy_protocol: Literal["v1", "v2"] | None = Field(
        None,
        description="Start every connection to a target with a PROXY protocol header naming the client "
        "(tcp, udp and tls_passthrough listeners; udp takes v2 only, one header per datagram).",
    )
    protocol: Literal["http1", "h2", "h2c"] = Field(
        "http1",
        description="HTTP version toward the targets: http1; h2 (HTTP/2 over TLS, ALPN h2; tls optional, "
        "defaults apply); h2c (cleartext HTTP/2 with prior knowledge). Streams are multiplexed.",
    )

    @model_validator(mode="after")
    def _protocol(self) -> Upstream:
        if self.protocol == "h2c" and self.tls is not None:
            raise ValueError("tls is for h2 or http1 upstreams (h2c is cleartext HTTP/2)")
        active = self.health_check.active
        if active is not None and active.type == "grpc" and self.protocol == "http1":
            raise ValueError("health_check.active.type grpc needs protocol h2 or h2c (gRPC runs over HTTP/2)")
        return self

    @field_validator("hash_on")
    @classmethod
    def _hash_on(cls, value: str) -> str:
        kind, _, name = value.partition(":")
        if kind in ("ip", "path") and not name:
            return value
        if kind in ("header", "cookie", "query") and name:
            return value
        raise ValueError("must be ip, path, header:NAME, cookie:NAME or query:NAME")


# --- routes ----------------------------------------------------------------------------------


class RouteMatch(Model):
    hosts: list[str] = Field(default_factory=list, description="Exact or *.wildcard hosts; empty: any host.")
    path: str | None = Field(None, description="Prefix at a segment boundary, or a template with {name}.")
    path_exact: str | None = Field(None, description="This path only: no prefix, no params.")
    path_regex: str | None = Field(None, description="Python regular expression matched from the path's start.")
    methods: list[str] = Field(default_factory=list, description="Methods; empty: any (GET also accepts HEAD).")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Header fields that must have exactly this value."
    )

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        out = []
        for host in value:
            host = host.strip().lower()
            bare = host[2:] if host.startswith("*.") else host
            if not bare or "*" in bare or "/" in bare:
                raise ValueError(f"not a host or *.wildcard host: {host!r}")
            out.append(host)
        return out

    @field_validator("path", "path_exact")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must start with /")
        return value

    @field_validator("path_regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        out = [m.upper() for m in value]
        for method in out:
            if not _TOKEN.match(method):
                raise ValueError(f"not an HTTP method: {method!r}")
        return out

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _TOKEN.match(name):
                raise ValueError(f"not a header name: {name!r}")
        return value

    @model_validator(mode="after")
    def _one_path_kind(self) -> RouteMatch:
        if sum(p is not None for p in (self.path, self.path_exact, self.path_regex)) > 1:
            raise ValueError("give one of path, path_exact or path_regex")
        return self


# The JSON Schema of an entry depends on the plugin registry, which this module does not
# import: the marker is replaced by every plugin's own schema in config/json_schema.py.
PLUGIN_ENTRY_MARKER = "x-bastion-plugin-entry"
PluginEntry = Annotated[dict[str, Any], WithJsonSchema({"type": "object", PLUGIN_ENTRY_MARKER: True})]
"""`{NAME: {...config}}`; validated against the plugin registry when the snapshot is built."""


class Route(Model):
    name: str = Field(min_length=1, description="Unique name, shown by bastion routes and in the access log.")
    match: RouteMatch = Field(RouteMatch(), description="Conditions a request must meet; omitted: every request.")
    upstream: str = Field(description="Name of the upstream the route forwards to.")
    strip_prefix: str | None = Field(
        None, description="Leading path prefix removed before forwarding (at a / boundary)."
    )
    preserve_host: bool = Field(True, description="Send the client's Host upstream (else the target's).")
    plugins: list[PluginEntry] = Field(
        default_factory=list, description="Plugins of this route, run after the global ones of the same stage."
    )
    websocket: bool = Field(
        False,
        description="Allow WebSocket upgrades on this route: the handshake goes through the route's plugins, "
        "then bytes are relayed both ways. Without it an Upgrade request is forwarded as a plain request.",
    )
    grpc_web: bool = Field(
        False,
        description="Also accept gRPC-Web (application/grpc-web, -web-text) from browsers: translated to gRPC "
        "toward the upstream, trailers returned in the body; CORS preflights answered unless a cors plugin is on.",
    )
    websocket_idle_timeout: Duration = Field(
        300.0, description="A WebSocket with no byte in either direction for this long is closed; 0: never."
    )
    websocket_max_duration: Duration = Field(
        0.0, description="A WebSocket open this long is closed, busy or not; 0: no limit."
    )

    @field_validator("strip_prefix")
    @classmethod
    def _strip_prefix(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or value == "/"):
            raise ValueError("must start with / and be longer than /")
        return value.rstrip("/") if value else value


# --- consumers -------------------------------------------------------------------------------


class KeyCredential(Model):
    key: str | None = Field(None, min_length=1, description="The API key (better from the environment: ${NAME}).")
    key_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="The key's SHA-256 digest (hex), instead of the key itself."
    )

    @model_validator(mode="after")
    def _one_form(self) -> KeyCredential:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give one of key or key_sha256")
        return self


class BasicCredential(Model):
    username: str = Field(min_length=1, description="The user name.")
    password_hash: str = Field(description="bcrypt ($2b$...) or argon2 ($argon2id$...) hash.")


class JwtCredential(Model):
    subject: str = Field(min_length=1, description="A token whose consumer_claim equals this names the consumer.")


class MtlsCredential(Model):
    fingerprint_sha256: str | None = Field(
        None, description="SHA-256 of the client certificate (DER), hex; colons and case are ignored."
    )
    subject: str | None = Field(
        None, description="The certificate's subject as RFC 4514 writes it, most specific first: CN=app,O=Example."
    )

    @field_validator("fingerprint_sha256")
    @classmethod
    def _fingerprint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        digest = value.replace(":", "").strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError("not a SHA-256 fingerprint (64 hex digits, colons allowed)")
        return digest

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        from bastion.config.certnames import canonical_subject

        return canonical_subject(value) if value is not None else None

    @model_validator(mode="after")
    def _one_form(self) -> MtlsCredential:
        if (self.fingerprint_sha256 is None) == (self.subject is None):
            raise ValueError("give one of fingerprint_sha256 or subject")
        return self


class Credentials(Model):
    key_auth: list[KeyCredential] = Field(default_factory=list, description="API keys for key_auth.")
    basic_auth: list[BasicCredential] = Field(default_factory=list, description="Users for basic_auth.")
    jwt: list[JwtCredential] = Field(default_factory=list, description="JWT subjects for jwt.")
    mtls_auth: list[MtlsCredential] = Field(
        default_factory=list, description="Client certificates (SHA-256 fingerprint or subject) for mtls_auth."
    )


class Consumer(Model):
    name: str = Field(
        min_length=1, pattern=r"^[A-Za-z0-9._~-]+$", description="Unique name, sent upstream as X-Consumer."
    )
    groups: list[str] = Field(default_factory=list, description="Groups, for acl.")
    credentials: Credentials = Field(Credentials(), description="Credentials per authentication plugin.")


# --- the rest ---------------------------------------------------------------------------------


class Admin(Model):
    bind: Address = Field(
        HostPort("127.0.0.1", 9901),
        description="Address of the admin API, metrics and dashboard. Anything but a loopback address needs a token.",
    )
    token: str | None = Field(
        None,
        min_length=16,
        description="Bearer token every admin request must send (Authorization: Bearer TOKEN); "
        "required when bind is not a loopback address. Use ${NAME} to keep it out of the file.",
    )


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine can connect."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


class Cluster(Model):
    redis: str = Field(
        description="redis://, rediss:// (TLS), unix://, redis+sentinel://HOSTS/SERVICE or redis+cluster://HOSTS."
    )
    on_store_error: Literal["allow", "deny"] = Field(
        "allow", description="What a rate limit does while Redis cannot answer: let requests through or refuse (503)."
    )
    timeout: Duration = Field(0.25, description="Longest wait for Redis on a request; past it Redis counts as failed.")
    retry_interval: Duration = Field(
        1.0, description="After a failure, how long requests skip Redis before one probes it again."
    )
    pool_size: int = Field(8, ge=1, le=1024, description="Redis connections per gateway process for rate limits.")
    prefix: str = Field("bastion", description="Prefix of every Redis key, so several clusters can share one Redis.")

    @field_validator("redis")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        from bastion.cluster.connect import parse_url

        parse_url(value)
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        from bastion.cluster.connect import check_prefix

        return check_prefix(value)

    @model_validator(mode="after")
    def _times(self) -> Cluster:
        if self.timeout <= 0:
            raise ValueError("timeout must be longer than 0")
        return self


class Tracing(Model):
    otlp_endpoint: str = Field(
        "http://127.0.0.1:4318",
        description="OTLP/HTTP collector: a base URL gets /v1/traces appended; a URL with a path is used as it is.",
    )
    sample_ratio: float = Field(
        1.0, ge=0.0, le=1.0, description="Share of new traces recorded and exported, 0 to 1 (0.1: one in ten)."
    )
    parent_based: bool = Field(
        True,
        description="Follow the sampled flag of a client's traceparent (false: sample_ratio decides for every "
        "request, so clients cannot ask for tracing).",
    )
    service_name: str = Field("bastion", min_length=1, description="The service.name resource attribute of spans.")
    resource_attributes: dict[str, str] = Field(
        default_factory=dict, description="More resource attributes, e.g. deployment.environment.name: prod."
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Header fields sent with each export (a collector's API key: ${NAME})."
    )
    timeout: Duration = Field(10.0, description="Longest wait for one export; also the wait for the last at stop.")
    compression: Literal["none", "gzip"] = Field("none", description="Compression of export requests.")
    batch_delay: Duration = Field(5.0, description="Longest a finished span waits before it is exported.")
    batch_size: int = Field(512, ge=1, le=100000, description="Most spans in one export request.")
    queue_size: int = Field(
        2048, ge=1, le=1000000, description="Finished spans waiting for export; past it, new ones are dropped."
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        host = rest.partition("/")[0]
        if not sep or scheme not in ("http", "https") or not host or "?" in value or "#" in value:
            raise ValueError("not an http:// or https:// URL (e.g. http://127.0.0.1:4318)")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _TOKEN.match(name):
                raise ValueError(f"not a header name: {name!r}")
            if any(ch in text for ch in "\r\n\0"):
                raise ValueError(f"the value of {name} holds a line break or NUL")
        return value

    @model_validator(mode="after")
    def _positive(self) -> Tracing:
        if self.timeout <= 0 or self.batch_delay <= 0:
            raise ValueError("timeout and batch_delay must be longer than 0")
        if self.queue_size < self.batch_size:
            raise ValueError("queue_size must be at least batch_size")
        return self


class Log(Model):
    access: bool = Field(True, description="One JSON line per request (on stdout unless access_file is set).")
    access_file: str | None = Field(
        None,
        min_length=1,
        description="Append access lines to this file instead of stdout; SIGUSR1 reopens it (log rotation).",
    )
    access_buffer: Size = Field(
        4 * 1024 * 1024,
        ge=64 * 1024,
        description="Access lines held for a slow reader; lines that do not fit are dropped and counted.",
    )
    access_stall_timeout: Duration = Field(
        10.0,
        gt=0,
        description="A destination that takes nothing for this long: held lines dropped, new ones too until it reads.",
    )
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Level of the gateway's own messages (stderr); read at start."
    )


class Config(Model):
    version: Literal[1]
    listeners: list[Listener] = Field(min_length=1)
    upstreams: dict[str, Upstream] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)
    plugins: list[PluginEntry] = Field(
        default_factory=list, description="Global plugins, on every route: entries { NAME: { ...settings } }."
    )
    consumers: list[Consumer] = Field(default_factory=list)
    admin: Admin | None = Field(
        None, description="The admin API (status, metrics, drain, reload); omitted: no admin listener."
    )
    cluster: Cluster | None = None
    tracing: Tracing | None = Field(
        None,
        description="OpenTelemetry spans exported over OTLP/HTTP (needs the otel extra). W3C traceparent and "
        "tracestate are propagated with or without it.",
    )
    log: Log = Log()
    drain_timeout: Duration = Field(30.0, description="How long shutdown waits for in-flight requests.")


Loc = tuple[str | int, ...]


def cross_check(config: Config) -> list[tuple[Loc, str]]:
    """Problems a single model cannot see: names that must be unique or must exist."""
    problems: list[tuple[Loc, str]] = []

    def unique(items: list[Any], attr: str, section: Loc) -> None:
        seen: set[Any] = set()
        for index, item in enumerate(items):
            value = getattr(item, attr)
            if value in seen:
                problems.append(((*section, index, attr), f"duplicate {attr} {value!s}"))
            seen.add(value)

    admin = config.admin
    if admin is not None and admin.token is None and not is_loopback(admin.bind.host):
        problems.append(
            (
                ("admin", "token"),
                f"required when admin.bind is not a loopback address ({admin.bind} is reachable from elsewhere)",
            )
        )
    if admin is not None:
        for index, listener in enumerate(config.listeners):
            if listener.bind == admin.bind:
                problems.append((("admin", "bind"), f"{admin.bind} is already listeners[{index}].bind"))
    unique(config.listeners, "name", ("listeners",))
    unique(config.listeners, "bind", ("listeners",))
    unique(config.routes, "name", ("routes",))
    unique(config.consumers, "name", ("consumers",))
    for name, upstream in config.upstreams.items():
        unique(upstream.targets, "address", ("upstreams", name, "targets"))
        if upstream.balance != "consistent_hash" and "hash_on" in upstream.model_fields_set:
            problems.append((("upstreams", name, "hash_on"), "only used with balance: consistent_hash"))
    uses_mtls = any("mtls_auth" in entry for entry in config.plugins if isinstance(entry, dict)) or any(
        "mtls_auth" in entry for route in config.routes for entry in route.plugins if isinstance(entry, dict)
    )
    if uses_mtls and not any(listener.tls is not None and listener.tls.client_ca for listener in config.listeners):
        problems.append((("listeners",), "mtls_auth is used but no https listener sets tls.client_ca"))

    problems.extend(_l4_problems(config))
    for listener in config.listeners:
        if listener.protocol == "udp" and listener.upstream in config.upstreams:
            upstream = config.upstreams[listener.upstream]  # udp: listener.upstream is set
            active = upstream.health_check.active
            if active is not None and active.type == "tcp":
                problems.append(
                    (
                        ("upstreams", listener.upstream, "health_check", "active", "type"),
                        "a tcp check cannot probe a udp service: use http checks or none",
                    )
                )
            if upstream.send_proxy_protocol == "v1":
                problems.append((("upstreams", listener.upstream, "send_proxy_protocol"), "udp upstreams take v2 only"))
    routed = {route.upstream for route in config.routes}
    for name, upstream in config.upstreams.items():
        if upstream.send_proxy_protocol is not None and name in routed:
            problems.append(
                (("upstreams", name, "send_proxy_protocol"), "for upstreams of tcp, udp and tls_passthrough listeners")
            )

    for index, route in enumerate(config.routes):
        problem = path_problem(route.match.path) if route.match.path else None
        if problem:
            problems.append((("routes", index, "match", "path"), problem))
        if route.upstream not in config.upstreams:
            known = ", ".join(sorted(config.upstreams)) or "none defined"
            problems.append((("routes", index, "upstream"), f"no upstream named {route.upstream!r} ({known})"))
        upstream_config = config.upstreams.get(route.upstream)
        if route.websocket and upstream_config is not None and upstream_config.protocol != "http1":
            problems.append(
                (
                    ("routes", index, "websocket"),
                    f"upstream {route.upstream!r} speaks {upstream_config.protocol}: WebSocket upgrades "
                    "need an http1 upstream (HTTP/2 has no Upgrade)",
                )
            )
        if upstream_config is not None and upstream_config.protocol == "http1":
            for position, entry in enumerate(route.plugins):
                if isinstance(entry, dict) and "grpc_json" in entry:
                    problems.append(
                        (
                            ("routes", index, "plugins", position, "grpc_json"),
                            f"upstream {route.upstream!r} speaks http1: grpc_json calls gRPC, which needs "
                            "protocol h2 or h2c",
                        )
                    )
        if route.grpc_web and upstream_config is not None and upstream_config.protocol == "http1":
            problems.append(
                (
                    ("routes", index, "grpc_web"),
                    f"upstream {route.upstream!r} speaks http1: gRPC-Web is translated to gRPC, which needs "
                    "protocol h2 or h2c",
                )
            )
        if not route.websocket:
            for key in ("websocket_idle_timeout", "websocket_max_duration"):
                if key in route.model_fields_set:
                    problems.append((("routes", index, key), "only used with websocket: true"))
        prefix = route.strip_prefix
        path = route.match.path
        if prefix and path and "{" not in path and not (path == prefix or path.startswith(prefix + "/")):
            problems.append((("routes", index, "strip_prefix"), f"{prefix!r} is not a prefix of path {path!r}"))
    return problems


def _l4_problems(config: Config) -> list[tuple[Loc, str]]:
    """L4 listeners name existing upstreams, and those upstreams use nothing HTTP-only."""
    problems: list[tuple[Loc, str]] = []
    known = ", ".join(sorted(config.upstreams)) or "none defined"
    used: dict[str, Loc] = {}
    for index, listener in enumerate(config.listeners):
        names: list[tuple[Loc, str]] = []
        if listener.upstream is not None:
            names.append((("listeners", index, "upstream"), listener.upstream))
        for route_index, route in enumerate(listener.sni_routes or ()):
            names.append((("listeners", index, "sni_routes", route_index, "upstream"), route.upstream))
        seen_hosts: set[str] = set()
        for route_index, route in enumerate(listener.sni_routes or ()):
            for host in route.hosts:
                if host in seen_hosts:
                    loc: Loc = ("listeners", index, "sni_routes", route_index, "hosts")
                    problems.append((loc, f"{host!r} is already in an earlier route"))
                seen_hosts.add(host)
        for loc, name in names:
            if name not in config.upstreams:
                problems.append((loc, f"no upstream named {name!r} ({known})"))
            else:
                used.setdefault(name, loc)
    for name, where in used.items():
        upstream = config.upstreams[name]
        listener_loc = ".".join(str(part) if isinstance(part, str) else f"[{part}]" for part in where)
        listener_loc = listener_loc.replace(".[", "[")
        if upstream.balance == "consistent_hash" and upstream.hash_on != "ip":
            problems.append((("upstreams", name, "hash_on"), f"an L4 upstream ({listener_loc}) can only hash on ip"))
        if any(route.upstream == name for route in config.routes):
            continue  # routes use it too: the HTTP-only keys are theirs
        for key in ("sticky", "tls"):
            if key in upstream.model_fields_set:
                problems.append((("upstreams", name, key), f"not used by an L4 upstream ({listener_loc})"))
        if upstream.protocol != "http1":
            why = (
                f"{upstream.protocol} is HTTP/2; an L4 upstream ({listener_loc}) relays the client's bytes as they are"
            )
            problems.append((("upstreams", name, "protocol"), why))
    return problems
