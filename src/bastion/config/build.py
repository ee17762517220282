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
from typing import TYPE_CHECKING

from pydantic import ValidationError

from bastion.config.loader import format_loc
from bastion.config.schema import Config, Consumer, Loc, PluginEntry, Route
from bastion.errors import ConfigError
from bastion.http.header_policy import request_drop_set
from bastion.http.router import Router
from bastion.observability.logs import AccessLog
from bastion.pipeline import BuildEnv, Plugin, PluginProblems
from bastion.plugins import plugin_class, plugin_names
from bastion.plugins.consumers import ConsumerIndex
from bastion.store.base import Store
from bastion.store.memory import LocalStore, default_store
from bastion.upstream.runtime import UpstreamRuntime
from bastion.upstream.targets import TargetRegistry

if TYPE_CHECKING:
    from bastion.config.loader import LoadedConfig

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
    )

    def __init__(self, route: Route, upstream: UpstreamRuntime, plugins: Sequence[Plugin]) -> None:
        self.name = route.name
        self.config = route
        self.upstream = upstream
        self.strip_prefix = route.strip_prefix
        self.preserve_host = route.preserve_host
        self.plugins = tuple(plugins)
        self.request_plugins = tuple(p for p in plugins if _overrides(p, "on_request"))
        self.response_plugins = tuple(p for p in reversed(plugins) if _overrides(p, "on_response"))
        self.log_plugins = tuple(p for p in plugins if _overrides(p, "on_log"))


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
        where: Callable[[Loc, str], str] | None = None,
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
        # Request fields removed from every client request before routing (header_policy).
        self.request_drop = request_drop_set(name for plugin in plugins for name in plugin.identity_headers)
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

    def target_keys(self) -> set[str]:
        return {t.key for u in self.upstreams.values() for t in u.targets}


class PluginBuilder:
    """Instantiates plugin entries, collecting every error with its location.

    Each plugin gets a `BuildEnv`: the consumers index and the store are shared by the
    whole snapshot, the scope says whether the entry is global or belongs to a route.
    """

    def __init__(self, loaded: LoadedConfig, consumers: ConsumerIndex, store: Store) -> None:
        self.loaded = loaded
        self.consumers = consumers
        self.store = store
        self.problems: list[str] = []
        self.instances: list[Plugin] = []
        self.locations: dict[int, Loc] = {}  # id(plugin) -> its entry's key path

    def build(self, entries: Sequence[PluginEntry], loc: Loc, scope: str = "") -> list[Plugin]:
        env = BuildEnv(self.consumers, self.store, scope, self.loaded.path)
        plugins: list[Plugin] = []
        for index, entry in enumerate(entries):
            here = (*loc, index)
            if not isinstance(entry, dict) or len(entry) != 1:
                self.problems.append(self.loaded.where(here, "a plugin entry is {NAME: {...config}}"))
                continue
            ((name, raw),) = entry.items()
            cls = plugin_class(name)
            if cls is None:
                known = ", ".join(plugin_names())
                self.problems.append(self.loaded.where((*here, name), f"unknown plugin (known: {known})"))
                continue
            try:
                plugin = cls.create(raw, env)
            except ValidationError as exc:
                for error in exc.errors():
                    message = str(error["msg"]).removeprefix("Value error, ")
                    self.problems.append(self.loaded.where((*here, name, *error["loc"]), message))
                continue
            except PluginProblems as exc:
                for sub, message in exc.problems:
                    self.problems.append(self.loaded.where((*here, name, *sub), message))
                continue
            except (ValueError, TypeError) as exc:
                self.problems.append(self.loaded.where((*here, name), str(exc)))
                continue
            plugins.append(plugin)
            self.instances.append(plugin)
            self.locations[id(plugin)] = (*here, name)
        return plugins

    def check_chain(self, chain: Sequence[Plugin], route: str) -> None:
        """Let each plugin object to the chain it ended up in (reported once per plugin and route)."""
        for plugin in chain:
            problem = plugin.check_chain(chain)
            if problem is not None:
                where = self.locations.get(id(plugin), ())
                self.problems.append(self.loaded.where(where, f"{problem} (route {route!r})"))


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
        builder.problems.extend(loaded.where(loc, message) for loc, message in consumer_problems)
        global_plugins = builder.build(config.plugins, ("plugins",))
        route_plugins = [
            builder.build(route.plugins, ("routes", i, "plugins"), route.name) for i, route in enumerate(config.routes)
        ]
        self.chains = [order_plugins(global_plugins, route_plugins[i]) for i in range(len(config.routes))]
        if not builder.problems:
            for route, chain in zip(config.routes, self.chains, strict=True):
                builder.check_chain(chain, route.name)
        if builder.problems:
            raise ConfigError(list(dict.fromkeys(builder.problems)))
        self.instances = builder.instances


def check_config(loaded: LoadedConfig) -> None:
    """Validate what only building can: plugin configs, consumers, chains. Raises ConfigError.

    No side effects (no sockets, no shared memory): this is what `bastion check` runs.
    """
    _Built(loaded)


def build_snapshot(
    loaded: LoadedConfig, registry: TargetRegistry, extra_consumers: Sequence[Consumer] = ()
) -> Snapshot:
    """Build a Snapshot or raise ConfigError with every problem found."""
    config = loaded.config
    built = _Built(loaded, extra_consumers)
    upstreams = {
        name: UpstreamRuntime(name, upstream, [registry.claim(name, upstream, t) for t in upstream.targets])
        for name, upstream in config.upstreams.items()
    }
    routes = [RouteRuntime(route, upstreams[route.upstream], built.chains[i]) for i, route in enumerate(config.routes)]
    return Snapshot(
        config,
        Router(config.routes),
        routes,
        upstreams,
        built.instances,
        built.consumers,
        built.store,
        where=loaded.where,
    )


async def close_later(snapshot: Snapshot, delay: float) -> None:
    """Retire a replaced snapshot once the requests still using it are likely done.

    If this task is cancelled (the gateway stops first), the gateway closes it instead."""
    await asyncio.sleep(delay)
    await snapshot.close()
