"""Validated config -> Snapshot: everything the hot path needs, built once, never mutated.

A snapshot holds the compiled router, one RouteRuntime per route (its upstream and its
plugin chains already ordered and split by hook) and the upstreams. Building has no side
effects beyond claiming TargetStates from the registry, so a snapshot that fails to build is
simply dropped and the running one keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from bastion import __version__
from bastion.config.loader import format_loc, model_problems, suggest
from bastion.config.schema import Config, Consumer, Loc, PluginEntry, Route, Tracing, UpstreamTls
from bastion.errors import ConfigError
from bastion.http.header_policy import request_drop_set
from bastion.http.router import Router
from bastion.net.tls import ALPN_H2, ALPN_HTTP1, CertSet, ClientTls, FileReader, TlsProblems, client_tls
from bastion.observability.logs import AccessLog
from bastion.observability.metrics import Metrics, RouteStats
from bastion.pipeline import BuildEnv, Plugin, PluginConfigError, PluginProblems
from bastion.plugins import plugin_class, plugin_names
from bastion.plugins.consumers import ConsumerIndex
from bastion.store.base import Store
from bastion.store.memory import LocalStore, default_store
from bastion.upstream.runtime import UpstreamRuntime
from bastion.upstream.targets import TargetRegistry

if TYPE_CHECKING:
    from bastion.config.loader import LoadedConfig
    from bastion.observability.tracing import Tracer

log = logging.getLogger("bastion.config")


def _overrides(plugin: Plugin, hook: str) -> bool:
    return getattr(type(plugin), hook) is not getattr(Plugin, hook)


class RouteRuntime:
    __slots__ = (
        "name",
        "config",
        "upstream",
        "strip_prefix",
        "preserve_host",
        "plugins",
        "request_plugins",
        "response_plugins",
        "log_plugins",
        "stats",
        "websocket",
        "websocket_idle_timeout",
        "websocket_max_duration",
        "grpc_web",
    )

    def __init__(
        self, route: Route, upstream: UpstreamRuntime, plugins: Sequence[Plugin], stats: RouteStats | None = None
    ) -> None:
        """`stats`: the process's counters for this route name (they outlive the snapshot)."""
        self.name = route.name
        self.stats = stats if stats is not None else RouteStats()
        self.config = route
        self.upstream = upstream
        self.strip_prefix = route.strip_prefix
        self.preserve_host = route.preserve_host
        self.plugins = tuple(plugins)
        self.request_plugins = tuple(p for p in plugins if _overrides(p, "on_request"))
        self.response_plugins = tuple(p for p in reversed(plugins) if _overrides(p, "on_response"))
        self.log_plugins = tuple(p for p in plugins if _overrides(p, "on_log"))
        self.websocket = route.websocket
        self.websocket_idle_timeout = route.websocket_idle_timeout or None  # None: off
        self.websocket_max_duration = route.websocket_max_duration or None
        # gRPC-Web: 0 off, 1 on with the gateway's CORS answers, 2 on with the route's cors plugin
        self.grpc_web = (2 if any(p.name == "cors" for p in plugins) else 1) if route.grpc_web else 0


class Snapshot:
    def __init__(
        self,
        config: Config,
        router: Router,
        routes: list[RouteRuntime],
        upstreams: dict[str, UpstreamRuntime],
        plugins: list[Plugin],
        consumers: ConsumerIndex | None = None,
        store: Store | None = None,
        metrics: Metrics | None = None,
        tls: dict[str, CertSet] | None = None,
        tls_files: dict[str, str] | None = None,
        where: Callable[[Loc, str], str] | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        """`where` formats a problem with the config's file and line (LoadedConfig.where)."""
        self.config = config
        self.router = router
        self.routes = routes
        self.upstreams = upstreams
        self.plugins = plugins  # every distinct instance, for start/close
        self.consumers = consumers if consumers is not None else ConsumerIndex()
        self.store = store if store is not None else LocalStore()
        self.access_log: AccessLog | None = AccessLog(config.log) if config.log.access else None
        self._where = where or (lambda loc, message: f"{format_loc(loc)}: {message}")
        # The process's counters (the gateway's, shared by every snapshot): each request ends
        # with one `metrics.observe(exchange)`.
        self.metrics = metrics if metrics is not None else Metrics()
        # Request fields removed from every client request before routing (header_policy).
        self.request_drop = request_drop_set(name for plugin in plugins for name in plugin.identity_headers)
        self.tls = tls or {}  # https listener bind -> its certificates
        self.tls_files = tls_files or {}  # every TLS file read -> sha256 of its content, for the watch
        self.tracer = tracer  # None without `tracing:`: the exchange then skips every tracing hook
        self.closed = False

    async def start(self) -> None:
        """Open the access log's destination, then start the plugins. Raises ConfigError when
        the access log file cannot be opened."""
        access_log = self.access_log
        if access_log is not None:
            try:
                access_log.open()
            except OSError as exc:
                key = "access_file" if access_log.file else "access"
                what = access_log.file or "standard output"
                problem = self._where(("log", key), f"cannot open {what}: {exc.strerror or exc}")
                raise ConfigError([problem]) from None
        if self.tracer is not None:
            self.tracer.start()
        try:
            for plugin in self.plugins:
                await plugin.start()
        except BaseException:
            if access_log is not None:
                await access_log.close()
            raise

    async def close(self) -> None:
        """Close plugins and the store; a second call does nothing."""
        if self.closed:
            return
        self.closed = True
        for plugin in self.plugins:
            try:
                await plugin.close()
            except Exception:
                log.exception("plugin %s failed to close", plugin.name)
        try:
            await self.store.close()
        except Exception:
            log.exception("the store failed to close")
        if self.access_log is not None:
            await self.access_log.close()
        if self.tracer is not None:
            await self.tracer.close()

    def target_keys(self) -> set[str]:
        return {t.key for u in self.upstreams.values() for t in u.targets}


_BASE_CREATE = getattr(Plugin.create, "__func__", None)


class PluginBuilder:
    """Instantiates plugin entries, collecting every error with its location.

    Each plugin gets a `BuildEnv`: the consumers index and the store are shared by the
    whole snapshot, the scope says whether the entry is global or belongs to a route.

    An entry with problems still takes its place in the chain, as an uninitialised instance
    of its class (a placeholder), so that the chain checks (`acl` needs authentication) are
    reported in the same round as the entries' own problems, and not wrongly: an `acl` after
    a `key_auth` with a typo still has its authentication plugin. A `python` entry that fails
    has no known class; the chains it is in are not checked.
    """

    def __init__(self, loaded: LoadedConfig, consumers: ConsumerIndex, store: Store) -> None:
        self.loaded = loaded
        self.consumers = consumers
        self.store = store
        self.problems: list[tuple[Loc, str]] = []
        self.instances: list[Plugin] = []
        self.locations: dict[int, Loc] = {}  # id(plugin) -> its entry's key path
        self.placeholders: set[int] = set()  # ids of entries that failed, standing in for chain checks
        self.incomplete: set[Loc] = set()  # entry lists holding an entry of unknown kind

    def build(self, entries: Sequence[PluginEntry], loc: Loc, scope: str = "") -> list[Plugin]:
        env = BuildEnv(self.consumers, self.store, scope, self.loaded.path)
        plugins: list[Plugin] = []
        for index, entry in enumerate(entries):
            here = (*loc, index)
            if not isinstance(entry, dict) or len(entry) != 1:
                self.problems.append((here, "a plugin entry is {NAME: {...config}}"))
                self.incomplete.add(loc)
                continue
            ((name, raw),) = entry.items()
            cls = plugin_class(name)
            if cls is None:
                self.problems.append(((*here, name), suggest("plugin", name, plugin_names())))
                self.incomplete.add(loc)
                continue
            plugin = self._create(cls, raw, env, (*here, name))
            if plugin is None:
                if getattr(cls.create, "__func__", None) is not _BASE_CREATE:
                    self.incomplete.add(loc)  # python: the class it would have built is unknown
                    continue
                plugin = cls.__new__(cls)
                self.placeholders.add(id(plugin))
            else:
                self.instances.append(plugin)
            plugins.append(plugin)
            self.locations[id(plugin)] = (*here, name)
        return plugins

    def _create(self, cls: type[Plugin], raw: Any, env: BuildEnv, at: Loc) -> Plugin | None:
        """The plugin, or None with its problems recorded."""
        loaded = self.loaded
        try:
            return cls.create(raw, env)
        except ValidationError as exc:
            found = [((*at, *sub), message) for sub, message in model_problems(exc, cls.Config, _secret(loaded, at))]
        except PluginConfigError as exc:
            inner = (*at, *exc.prefix)
            found = [
                ((*inner, *sub), message)
                for sub, message in model_problems(exc.error, exc.model, _secret(loaded, inner))
            ]
        except PluginProblems as exc:
            found = [((*at, *sub), message) for sub, message in exc.problems]
        except (ValueError, TypeError) as exc:
            found = [(at, str(exc))]
        self.problems.extend(found)
        return None

    def check_chain(self, chain: Sequence[Plugin], route: str, complete: bool) -> None:
        """Let each plugin object to the chain it ended up in (reported once per plugin and route).

        `complete` is False when an entry of unknown kind failed: then there is nothing to check."""
        if not complete:
            return
        for plugin in chain:
            if id(plugin) in self.placeholders:
                continue
            problem = plugin.check_chain(chain)
            if problem is not None:
                where = self.locations.get(id(plugin), ())
                self.problems.append((where, f"{problem} (route {route!r})"))

    def error(self) -> ConfigError:
        """Every problem as `FILE:LINE: key.path: message`, sorted by line like the loader's."""
        lines = {loc: self.loaded.line_of(loc) or 0 for loc, _ in self.problems}
        ordered = sorted(self.problems, key=lambda problem: lines[problem[0]])
        return ConfigError(list(dict.fromkeys(self.loaded.where(loc, message) for loc, message in ordered)))


def _secret(loaded: LoadedConfig, at: Loc) -> Callable[[Loc], bool]:
    return lambda sub: loaded.from_environment((*at, *sub))


def order_plugins(global_plugins: Sequence[Plugin], route_plugins: Sequence[Plugin]) -> list[Plugin]:
    """Global then route, in list order, but every authentication before authorization, etc."""
    return sorted([*global_plugins, *route_plugins], key=lambda p: p.stage)


def make_store(config: Config, config_path: str) -> Store:
    """The Redis store with `cluster`, else this machine's store. Opens nothing yet."""
    if config.cluster is not None:
        from bastion.store.redis import RedisStore  # only clusters load redis-py

        return RedisStore(config.cluster)
    return default_store(config_path)


def merge_consumers(config: Config, extra: Sequence[Consumer]) -> list[Consumer]:
    """The config's consumers, then those kept in Redis whose names the config does not use."""
    names = {consumer.name for consumer in config.consumers}
    merged = list(config.consumers)
    for consumer in extra:
        if consumer.name in names:
            log.warning("consumer %r from Redis ignored: the config file defines one of that name", consumer.name)
            continue
        names.add(consumer.name)
        merged.append(consumer)
    return merged


class _Built:
    """The config-dependent parts of a snapshot that need no sockets: consumers and plugin chains.

    `extra_consumers` come from Redis: a problem with one of them (a key another consumer
    already has) is logged and that credential skipped, never a reason to refuse the config.
    """

    def __init__(self, loaded: LoadedConfig, extra_consumers: Sequence[Consumer] = ()) -> None:
        config = loaded.config
        consumers = merge_consumers(config, extra_consumers) if extra_consumers else config.consumers
        self.consumers, all_problems = ConsumerIndex.build(consumers)
        own = len(config.consumers)
        consumer_problems = []
        for loc, message in all_problems:
            if isinstance(loc[1], int) and loc[1] >= own:
                name = consumers[loc[1]].name
                log.warning("consumer %r from Redis: %s: %s (skipped)", name, ".".join(map(str, loc[2:])), message)
            else:
                consumer_problems.append((loc, message))
        self.store = make_store(config, loaded.path)
        builder = PluginBuilder(loaded, self.consumers, self.store)
        builder.problems.extend(consumer_problems)
        global_plugins = builder.build(config.plugins, ("plugins",))
        route_plugins = [
            builder.build(route.plugins, ("routes", i, "plugins"), route.name) for i, route in enumerate(config.routes)
        ]
        self.chains = [order_plugins(global_plugins, route_plugins[i]) for i in range(len(config.routes))]
        global_complete = ("plugins",) not in builder.incomplete
        for i, (route, chain) in enumerate(zip(config.routes, self.chains, strict=True)):
            complete = global_complete and ("routes", i, "plugins") not in builder.incomplete
            builder.check_chain(chain, route.name, complete)
        self.tls, self.upstream_tls, self.tls_files = build_tls(loaded, builder.problems)
        self.tracer = make_tracer(config.tracing, builder.problems) if config.tracing is not None else None
        if builder.problems:
            raise builder.error()
        for route, chain in zip(config.routes, self.chains, strict=True):
            for plugin in chain:
                plugin.prepare_route(route.name, chain)
        self.instances = builder.instances


def make_tracer(settings: Tracing, problems: list[tuple[Loc, str]]) -> Tracer | None:
    """The snapshot's tracer (nothing started yet), or None with a problem when the OpenTelemetry
    SDK is not installed: only a config with `tracing` imports it."""
    try:
        from bastion.observability.tracing import Tracer
    except ImportError as exc:
        problems.append(
            (("tracing",), f"needs OpenTelemetry ({exc.name} is missing): pip install 'bastion-gateway[otel]'")
        )
        return None
    return Tracer(
        endpoint=settings.otlp_endpoint,
        sample_ratio=settings.sample_ratio,
        parent_based=settings.parent_based,
        service_name=settings.service_name,
        service_version=__version__,
        headers=settings.headers,
        timeout=settings.timeout,
        compression=settings.compression,
        batch_delay=settings.batch_delay,
        batch_size=settings.batch_size,
        queue_size=settings.queue_size,
        resource_attributes=settings.resource_attributes,
    )


def config_dir(path: str) -> Path:
    """Where relative file names in a config start: the config file's directory (the working
    directory for a config that is not a file, such as a version pulled from Redis)."""
    file = Path(path)
    return file.resolve().parent if file.is_file() else Path.cwd()


def build_tls(
    loaded: LoadedConfig, problems: list[tuple[Loc, str]]
) -> tuple[dict[str, CertSet], dict[str, ClientTls], dict[str, str]]:
    """Listener certificates (by bind), upstream client contexts (by name) and the digests of
    every file read; a bad file adds a problem line and leaves its entry out."""
    reader = FileReader(config_dir(loaded.path))
    listeners: dict[str, CertSet] = {}
    upstreams: dict[str, ClientTls] = {}
    for index, listener in enumerate(loaded.config.listeners):
        if listener.tls is not None:
            try:
                if listener.protocol == "tcp":
                    alpn: list[str] = []  # relayed to a target the gateway doesn't speak for: agree to nothing
                else:
                    alpn = ALPN_HTTP1 if listener.http2 is False else ALPN_H2
                listeners[str(listener.bind)] = CertSet(listener.tls, reader, alpn)
            except TlsProblems as exc:
                problems.extend((("listeners", index, "tls", *loc), text) for loc, text in exc.problems)
    for name, upstream in loaded.config.upstreams.items():
        settings = upstream.tls
        if settings is None and upstream.protocol == "h2":
            settings = UpstreamTls()  # HTTP/2 over TLS: TLS with the defaults unless told otherwise
        if settings is not None:
            try:
                upstreams[name] = client_tls(settings, reader, ["h2"] if upstream.protocol == "h2" else None)
            except TlsProblems as exc:
                problems.extend((("upstreams", name, "tls", *loc), text) for loc, text in exc.problems)
    return listeners, upstreams, reader.digests


def check_config(loaded: LoadedConfig) -> dict[str, CertSet]:
    """Validate what only building can: plugin configs, consumers, chains, TLS files. Raises
    ConfigError; returns the https listeners' certificates (by bind) for the summary.

    No side effects (no sockets, no shared memory): this is what `bastion check` runs.
    """
    return _Built(loaded).tls


def build_snapshot(
    loaded: LoadedConfig, registry: TargetRegistry, extra_consumers: Sequence[Consumer] = ()
) -> Snapshot:
    """Build a Snapshot or raise ConfigError with every problem found."""
    config = loaded.config
    built = _Built(loaded, extra_consumers)
    upstreams = {
        name: UpstreamRuntime(
            name,
            upstream,
            [registry.claim(name, upstream, t) for t in upstream.targets],
            tls=built.upstream_tls.get(name),
            stats=registry.metrics.upstream(name),
        )
        for name, upstream in config.upstreams.items()
    }
    metrics = registry.metrics
    routes = [
        RouteRuntime(route, upstreams[route.upstream], built.chains[i], metrics.route(route.name))
        for i, route in enumerate(config.routes)
    ]
    return Snapshot(
        config,
        Router(config.routes),
        routes,
        upstreams,
        built.instances,
        built.consumers,
        built.store,
        metrics,
        tls=built.tls,
        tls_files=built.tls_files,
        where=loaded.where,
        tracer=built.tracer,
    )


async def close_later(snapshot: Snapshot, delay: float) -> None:
    """Retire a replaced snapshot once the requests still using it are likely done.

    If this task is cancelled (the gateway stops first), the gateway closes it instead."""
    await asyncio.sleep(delay)
    await snapshot.close()
