"""Redis URLs -> redis-py clients, and the names of Bastion's keys.

Plain URLs are handed to redis-py as they are (`redis://`, `rediss://` for TLS, `unix://`,
with redis-py's own query options such as `?ssl_cert_reqs=none`). redis-py has no URL form
for Sentinel or Redis Cluster, so two schemes name them, each with a comma-separated list of
seed addresses:

    redis+sentinel://[[user]:password@]host:26379,host2:26379/SERVICE[/DB][?sentinel_password=...]
    redis+cluster://[[user]:password@]host:7000,host2:7000

(`rediss+sentinel://` and `rediss+cluster://` for TLS, which also take `ssl_cert_reqs`,
`ssl_ca_certs`, `ssl_certfile` and `ssl_keyfile` as query options). Parsing is pure (no redis import),
so the config schema can check a URL without loading redis-py.

Key names. Config and consumer keys carry the prefix in braces, a Redis Cluster hash tag:
they are read and written together (in one Lua script), so they must live in one slot.
Rate-limit keys carry it without braces, so a cluster spreads them over its nodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

if TYPE_CHECKING:
    from redis.asyncio import Redis

PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SCHEMES = PLAIN_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES
TLS_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
PREFIX_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
_PREFIX = re.compile(PREFIX_PATTERN)


@dataclass(frozen=True)
class RedisURL:
    """A parsed cluster URL. `kind` says which client it needs."""

    url: str
    kind: Literal["plain", "sentinel", "cluster"]
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    options: dict[str, str] = field(default_factory=dict, repr=False)  # sentinel/cluster only

    def redacted(self) -> str:
        """The URL without its password, for logs and listings."""
        return redact(self.url)


def redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon else ("***" if user else "")
    return f"{scheme}://{shown}@{hosts}{slash}{tail}"


def _node(text: str, default_port: int) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"{text!r} is not host:port")
    if port_text and (not port_text.isdigit() or not 0 < int(port_text) < 65536):
        raise ValueError(f"{text!r} has a bad port")
    return host, int(port_text) if port_text else default_port


def parse_url(url: str) -> RedisURL:
    """Check a cluster URL and split it up. Raises ValueError with a sentence for the user."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise ValueError(
            "not a Redis URL: use redis://, rediss:// (TLS), unix://, redis+sentinel:// or redis+cluster://"
        )
    if scheme in PLAIN_SCHEMES:
        split = urlsplit(url)
        try:
            port = split.port
        except ValueError:
            raise ValueError("the URL has a bad port") from None
        if scheme != "unix" and not split.hostname:
            raise ValueError("the URL names no host")
        path = split.path.strip("/")
        if scheme != "unix" and path and not path.isdigit():
            raise ValueError("the path of a redis:// URL is a database number, like /0")
        return RedisURL(
            url,
            "plain",
            tls=scheme == "rediss",
            nodes=((split.hostname or "", port or 6379),) if scheme != "unix" else (),
            db=int(path) if path.isdigit() else 0,
            username=unquote(split.username) if split.username else None,
            password=unquote(split.password) if split.password else None,
        )
    rest, _, query = rest.partition("?")
    rest, _, _ = rest.partition("#")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinel = scheme in SENTINEL_SCHEMES
    nodes = tuple(_node(part, 26379 if sentinel else 6379) for part in hosts.split(",") if part.strip())
    if not nodes:
        raise ValueError("the URL names no host")
    parts = [p for p in path.split("/") if p]
    service, db = "", 0
    if sentinel:
        if not parts:
            raise ValueError("a redis+sentinel:// URL needs the service name as its path: .../mymaster[/DB]")
        service = unquote(parts[0])
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise ValueError("after the service name, a redis+sentinel:// URL takes only a database number")
        db = int(parts[1]) if len(parts) == 2 else 0
    elif parts:
        raise ValueError("a redis+cluster:// URL has no path (Redis Cluster has only database 0)")
    options = dict(parse_qsl(query))
    allowed = (*TLS_OPTIONS, "sentinel_password") if sentinel else TLS_OPTIONS
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown URL option {unknown[0]!r} (known: {', '.join(allowed)})")
    return RedisURL(
        url,
        "sentinel" if sentinel else "cluster",
        tls=scheme.startswith("rediss"),
        nodes=nodes,
        service=service,
        db=db,
        username=username,
        password=password,
        options=options,
    )


def check_prefix(prefix: str) -> str:
    if not _PREFIX.match(prefix):
        raise ValueError("a key prefix is 1 to 64 of A-Z a-z 0-9 _ . : -")
    return prefix


class Keys:
    """The Redis key and channel names of one cluster (one prefix)."""

    def __init__(self, prefix: str = "bastion") -> None:
        check_prefix(prefix)
        self.prefix = prefix
        tag = "{" + prefix + "}"
        self.config_seq = f"{tag}:config:seq"
        self.config_current = f"{tag}:config:current"
        self.config_history = f"{tag}:config:history"
        self.config_channel = f"{tag}:config"
        self.consumers = f"{tag}:consumers"
        self.consumers_rev = f"{tag}:consumers:rev"
        self.consumers_channel = f"{tag}:consumers"
        self.rate = f"{prefix}:rl:"

    def config_version(self, version: int) -> str:
        return "{" + self.prefix + "}" + f":config:v:{version}"


def connect(target: RedisURL | str, *, timeout: float = 2.0, pool_size: int = 8, blocking: bool = False) -> Redis:
    """A redis-py asyncio client for the URL; nothing is opened before its first command.

    `timeout` bounds connecting (commands are bounded by the caller); one retry on a fresh
    connection covers a pooled connection that a restarted server closed. `blocking`: a
    client for pub/sub, whose reads wait as long as they need.
    """
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    if isinstance(target, str):
        target = parse_url(target)
    common: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": None if blocking else max(timeout, 1.0) * 5,
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 0,
    }
    if target.kind == "plain":
        return Redis.from_url(target.url, max_connections=pool_size, **common)
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    tls: dict[str, Any] = {"ssl": True} if target.tls else {}
    tls.update((k, v) for k, v in target.options.items() if k in TLS_OPTIONS)
    if target.kind == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        password = target.options.get("sentinel_password")
        sentinel_auth = {"password": password} if password else {}
        sentinels = Sentinel(  # type: ignore[no-untyped-call]
            list(target.nodes),
            sentinel_kwargs={"socket_connect_timeout": timeout, "socket_timeout": max(timeout, 1.0), **sentinel_auth},
            **common,
        )
        client: Redis = sentinels.master_for(target.service, db=target.db, max_connections=pool_size, **auth, **tls)
        return client
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    settings: dict[str, Any] = {k: v for k, v in common.items() if k != "health_check_interval"}
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        max_connections=pool_size,
        **settings,
        **auth,
        **tls,
    )
    # RedisCluster speaks the same commands; the store and the cluster code use only those.
    return cluster  # type: ignore[return-value]
