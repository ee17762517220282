"""The gateway's lifecycle: load config -> build snapshot -> listen -> swap on reload -> drain.

`Gateway` owns the listening servers, the live client connections, the target registry
(connection pools and health that outlive snapshots), the active health checkers and the
current Snapshot, which every new request reads once. A reload (SIGHUP, a change to the
config file, or `reload()`) parses the file in a thread, builds a complete new snapshot and
swaps the reference; if anything fails, the old snapshot keeps serving and the reason is
logged. Requests in flight finish on the snapshot they started with; keep-alive client
connections stay open and their next request reads the new one.

Shutdown (SIGTERM/SIGINT) stops accepting, lets in-flight requests finish up to the drain
timeout, then cuts what is left; a second signal cuts at once. SIGUSR1 reopens the access
log file (log rotation). With `--workers N` a supervisor (workers.py) runs N of these
processes on SO_REUSEPORT listeners.

Clusters. With `--from-redis` (`follow`) the config comes from the versions pushed to Redis
instead of a file: the gateway reloads when a new version is pushed, and keeps a local copy
of the last version it applied, which it boots from when Redis is down. With `cluster` in
the config, consumers kept in Redis are merged into the config's and a change to them
reloads too (from the config already loaded, without reading the source again). Both use
one `ClusterLink` per Redis and prefix, which pokes `_cluster_poked` on pub/sub messages and
on a poll; the poke reads two numbers and reloads only when one moved. Everything reloads
through the same path: build a whole snapshot, swap it, keep the old one on any failure.
`config_info` says what runs (source, version, digest) for logs and the admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bastion.admin.listener import AdminListener
from bastion.config.build import Snapshot, build_snapshot, close_later
from bastion.config.loader import LoadedConfig, load_config, load_config_text
from bastion.config.schema import L4_PROTOCOLS, Cluster, Config, Consumer, Listener
from bastion.errors import ConfigError
from bastion.l4.listener import L4Hub
from bastion.l4.udp import UdpListener
from bastion.net.protocols import new_protocol
from bastion.net.proxy_accept import ProxyReader, Trusted, late_tls
from bastion.net.tls import TlsFront, file_digest
from bastion.observability.logs import reopen_access_logs
from bastion.observability.metrics import Metrics
from bastion.proto.h1 import ReadBuffer
from bastion.upstream.health import HealthMonitor
from bastion.upstream.targets import TargetRegistry

if TYPE_CHECKING:
    from bastion.cluster.follow import ClusterLink, FollowSettings
    from bastion.cluster.versions import StoredVersion
    from bastion.observability.logs import AccessLog

log = logging.getLogger("bastion")

SWEEP_INTERVAL = 1.0  # idle upstream connections past their idle timeout
TICK_INTERVAL = 0.25  # client read deadlines: timeouts are enforced to within this
WATCH_INTERVAL = 1.0


class VersionProblems(ConfigError):
    """A version pulled from Redis that does not load here (e.g. a variable this host lacks)."""

    def __init__(self, problems: list[str], stored: StoredVersion) -> None:
        super().__init__(problems)
        self.stored = stored


def file_fingerprint(path: str) -> tuple[int, int, str] | None:
    """What tells a changed config file apart: size, mtime and a hash of the content."""
    try:
        stat = os.stat(path)
        with open(path, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns, digest


class Gateway:
    def __init__(
        self,
        config_path: str,
        reuse_port: bool = False,
        *,
        worker: int = 0,
        workers: int = 1,
        watch: float | None = None,
        follow: FollowSettings | None = None,
        peers_dir: str | None = None,
        restarts: int = 0,
        launched_at: float | None = None,
        tls_watch: float | None = None,
    ) -> None:
        """`worker`/`workers`: this process's place among the workers (spreads health checks);
        `watch`: poll the config file every so many seconds and reload when it changes;
        `follow`: take the config from Redis instead of `config_path` (`--from-redis`);
        `tls_watch`: poll the certificate, key and CA files the config names, and reload
        when one changes; `peers_dir`: where the workers' admin sockets live (workers only); `restarts`: how
        often this worker's slot was refilled; `launched_at`: when the supervisor started."""
        self.config_path = config_path
        self.follow = follow
        self.reuse_port = reuse_port
        self.worker = worker
        self.workers = workers
        self.restarts = restarts
        self.watch = watch
        self.metrics = Metrics()  # every request's counters, for the life of the process
        self.tls_watch = tls_watch
        self.tls_fronts: dict[str, TlsFront] = {}  # https listeners by bind address
        self._tls_seen: dict[str, str] = {}  # TLS file -> digest last seen
        self.registry = TargetRegistry(self.metrics)
        self.read_buffer = ReadBuffer()  # shared by this gateway's client connections
        self.health = HealthMonitor(worker, workers)
        self.connections: set[Any] = set()  # H1Server, H2Server, PrefaceSniffer, L4Connection
        self.l4 = L4Hub(self)
        self.servers: dict[str, asyncio.Server] = {}  # by bind address
        self.listeners: dict[str, Listener] = {}  # by bind address, current settings
        self.udp: dict[str, UdpListener] = {}  # udp listeners by bind address
        self._late_tls: set[str] = set()  # https binds listening in the clear: TLS after a PROXY header
        self._trusted: dict[tuple[str, ...], Trusted] = {}  # proxy_protocol.trusted, parsed once
        self._snapshot: Snapshot | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retired: list[Snapshot] = []  # replaced by a reload, closed after a delay
        self._stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._fingerprint: tuple[int, int, str] | None = None
        self._drain_deadline = 0.0
        self._stopping = False
        # What runs, for logs and the admin API: see statistics().
        self.config_info: dict[str, Any] = {}
        self.reloads = {"applied": 0, "rejected": 0}
        self.last_reload: dict[str, Any] | None = None  # result, problems, when
        self.started_at = time.time()
        self.launched_at = launched_at if launched_at is not None else self.started_at
        self.admin = AdminListener(self, peers_dir)
        self._loaded: LoadedConfig | None = None
        self._stored: StoredVersion | None = None  # the Redis version running (follow only)
        self._rejected: tuple[int, str] | None = None  # a version (and digest) that failed here: not retried
        self._links: dict[tuple[str, str], ClusterLink] = {}
        self._consumers: list[Consumer] = []  # from Redis, last known
        self._consumers_rev: int | None = None
        self._syncing = False
        self._poked = False
        self._from_copy = False  # booted from the local copy; cleared once Redis answers

    @property
    def running_snapshot(self) -> Snapshot | None:
        """The live snapshot, or None before the first one (the admin API's view)."""
        return self._snapshot

    @property
    def snapshot(self) -> Snapshot:
        assert self._snapshot is not None, "the gateway has not started"
        return self._snapshot

    async def start(self, snapshot: Snapshot | None = None) -> None:
        self._fingerprint = file_fingerprint(self.config_path) if self.follow is None else None
        if snapshot is None:
            loaded, stored = await self._load_source(boot=True)
            snapshot = build_snapshot(loaded, self.registry, await self._cluster_consumers(loaded.config))
        else:
            loaded, stored = LoadedConfig(snapshot.config, self.config_path, ""), None
        await snapshot.start()
        await self.admin.start_peers()  # (workers) targets drained before this worker started
        self._go_live(snapshot)
        await self._bind(snapshot)
        self._applied(loaded, stored)
        log.info("config %s", self.describe_config())
        self._spawn(self._sweep())
        self._spawn(self._tick())
        if self.watch and self.follow is None:
            self._spawn(self._watch(self.watch))
        if self.tls_watch:
            self._spawn(self._watch_tls(self.tls_watch))
        for link in self._links.values():
            link.watch(self._cluster_poked)

    def _go_live(self, snapshot: Snapshot) -> None:
        """Make `snapshot` the one new requests use, and point the live target state at it."""
        for upstream in snapshot.upstreams.values():
            upstream.activate()
        self._snapshot = snapshot
        self.registry.running = True
        self.registry.retain_only(snapshot.target_keys())
        self.health.sync(snapshot.upstreams)
        self._tls_seen.update(snapshot.tls_files)
        for bind, certs in snapshot.tls.items():
            for cert in certs.expired():
                log.warning("listener %s: certificate %s is outside its validity period", bind, cert.cert_path)

    async def _bind(self, snapshot: Snapshot) -> None:
        """Open listeners that are new, close those that are gone, update settings of the rest.

        A socket's TLS context is fixed when it opens: a listener that turns TLS on or off is
        closed and opened again; one that stays https gets the snapshot's certificates."""
        loop = asyncio.get_running_loop()
        wanted = {str(listener.bind): listener for listener in snapshot.config.listeners}
        for bind, server in list(self.servers.items()):
            if (
                bind not in wanted
                or wanted[bind].protocol == "udp"
                or (bind in self.tls_fronts) != (bind in snapshot.tls)
                or (bind in self._late_tls) != late_tls(wanted[bind])
            ):
                server.close()
                del self.servers[bind]
                self.tls_fronts.pop(bind, None)
                self._late_tls.discard(bind)
                for conn in list(self.connections):  # HTTP/2: GOAWAY; HTTP/1.1: close when idle
                    if str(conn.settings.bind) == bind:
                        conn.drain()
                log.info("listener %s closed", bind)
        for conn in list(self.connections):
            # A kept socket whose listener turned from HTTP to tcp/tls_passthrough: its HTTP
            # connections would serve HTTP there for as long as their clients keep them.
            settings = conn.settings
            bind = str(settings.bind)
            if bind in wanted and wanted[bind].protocol in L4_PROTOCOLS and settings.protocol not in L4_PROTOCOLS:
                conn.drain()
        self.listeners = wanted
        fronts = dict(self.tls_fronts)
        for bind, listener in wanted.items():
            if bind in self.servers or listener.protocol == "udp":
                continue
            certs = snapshot.tls.get(bind)
            front = TlsFront(certs) if certs is not None else None
            late = late_tls(listener)  # TLS starts after a PROXY header: the socket listens in the clear
            server = await loop.create_server(
                self._factory(bind),
                listener.bind.host,
                listener.bind.port,
                backlog=listener.backlog,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
                ssl=front.context if front is not None and not late else None,
                ssl_handshake_timeout=listener.timeouts.header if front is not None and not late else None,
            )
            self.servers[bind] = server
            if late:
                self._late_tls.add(bind)
            if front is not None:
                self.tls_fronts[bind] = front
            scheme = "https" if front is not None else "http"
            log.info("listener %s (%s) on %s://%s", listener.name, listener.protocol, scheme, bind)
        for bind, front in fronts.items():  # every new socket is open: only now swap certificates
            front.install(snapshot.tls[bind])
        await self._bind_udp(wanted)
        await self.admin.sync(snapshot.config.admin, self.reuse_port)

    async def _bind_udp(self, wanted: dict[str, Listener]) -> None:
        """udp listeners: open new ones, close those gone, give the rest their new settings
        (their sessions go on: see l4/udp.py)."""
        for bind, udp in list(self.udp.items()):
            if bind not in wanted or wanted[bind].protocol != "udp":
                udp.close("listener_closed")
                del self.udp[bind]
                log.info("listener %s closed", bind)
        for bind, listener in wanted.items():
            if listener.protocol != "udp":
                continue
            if bind in self.udp:
                self.udp[bind].update(listener)
                continue
            udp = UdpListener(self, listener, self.metrics.udp_stats(listener.name))
            await udp.start(self.reuse_port)
            self.udp[bind] = udp
            log.info("listener %s (udp) on udp://%s to upstream %s", listener.name, bind, listener.upstream)

    def _factory(self, bind: str) -> Callable[[], asyncio.BaseProtocol]:
        # The listener's settings are looked up at each accept: a reload changes them.
        def accept() -> asyncio.BaseProtocol:
            listener = self.listeners[bind]
            if listener.proxy_protocol is not None and listener.proxy_protocol.accept:
                return self._proxy_reader(bind, listener)
            return self._protocol(listener)

        return accept

    def _protocol(self, listener: Listener) -> asyncio.BaseProtocol:
        if listener.protocol in L4_PROTOCOLS:
            return self.l4.protocol(listener)
        return new_protocol(self, listener, self.metrics)

    def _proxy_reader(self, bind: str, listener: Listener) -> ProxyReader:
        """The PROXY header first, then the listener's protocol (TLS first on https)."""
        assert listener.proxy_protocol is not None
        key = tuple(listener.proxy_protocol.trusted)
        trusted = self._trusted.get(key)
        if trusted is None:
            trusted = self._trusted[key] = Trusted(key)
        front = self.tls_fronts.get(bind) if bind in self._late_tls else None
        return ProxyReader(
            listener.name,
            trusted,
            listener.timeouts.header,
            lambda: self._protocol(listener),
            self.metrics.proxy_stats(listener.name),
            front.context if front is not None else None,
        )

    async def reload(self, same_config: bool = False, why: str = "config reloaded") -> bool:
        """Build the config again and swap it in; on any error keep the running one.

        `same_config`: the consumers in Redis changed, or TLS files did; rebuild from the
        config already loaded (`why` says which in the log)."""
        async with self._reload_lock:
            if self._stopping:
                return False
            return await self._reload(same_config, why)

    async def _reload(self, same_config: bool = False, why: str = "config reloaded") -> bool:
        stored: StoredVersion | None = None
        try:
            if same_config and self._loaded is not None:
                loaded, stored = self._loaded, self._stored
            else:
                loaded, stored = await self._load_source()
            snapshot = build_snapshot(loaded, self.registry, await self._cluster_consumers(loaded.config))
            await snapshot.start()
        except ConfigError as exc:
            self._refused(exc.stored if isinstance(exc, VersionProblems) else stored, exc.problems)
            return False
        except Exception as exc:
            self._refused(stored, [f"{type(exc).__name__}: {exc}"])
            return False
        try:
            await self._bind(snapshot)
        except OSError as exc:
            await snapshot.close()
            self._refused(stored, [f"cannot listen: {exc}"])
            return False
        old = self._snapshot
        self._go_live(snapshot)
        if old is not None:
            self._retired.append(old)
            self._spawn(close_later(old, snapshot.config.drain_timeout))
        self._applied(loaded, stored)
        self.reloads["applied"] += 1
        self.last_reload = {"result": "applied", "problems": [], "at": time.time()}
        log.info("%s: config %s", why, self.describe_config())
        for link in self._links.values():
            link.watch(self._cluster_poked)  # a link the new config brought (no-op for the others)
        return True

    def _refused(self, stored: StoredVersion | None, problems: list[str]) -> None:
        self.reloads["rejected"] += 1
        self.last_reload = {"result": "rejected", "problems": list(problems), "at": time.time()}
        why = "\n".join(problems)
        if stored is not None and (self._stored is None or stored.sha256 != self._stored.sha256):
            self._rejected = (stored.version, stored.sha256)
            log.error("config version %d rejected, the running config stays:\n%s", stored.version, why)
        else:
            log.error("reload rejected, the running config stays:\n%s", why)

    # --- where the config comes from ------------------------------------------------------------

    async def _load_source(self, boot: bool = False) -> tuple[LoadedConfig, StoredVersion | None]:
        """The config file, or the current version in Redis (at boot, the local copy when
        Redis cannot be reached). Raises ConfigError, or ClusterUnavailable after boot."""
        follow = self.follow
        if follow is None:
            self._fingerprint = file_fingerprint(self.config_path)
            # Parsing and validating happen in a thread so the event loop keeps serving.
            return await asyncio.to_thread(load_config, self.config_path), None
        from bastion.cluster.follow import ClusterUnavailable
        from bastion.cluster.versions import LocalCopy

        link = self._link(follow.url, follow.prefix)
        try:
            stored = await link.fetch_config()
        except ClusterUnavailable as exc:
            if not boot:
                raise
            copy = LocalCopy(follow.copy_path()).load()
            if copy is None:
                raise ConfigError(
                    [f"cannot reach Redis ({exc}) and there is no local copy at {follow.copy_path()}"]
                ) from None
            stored, consumers, rev = copy
            self._from_copy = True
            self._consumers = [Consumer.model_validate(c) for c in consumers]
            self._consumers_rev = rev
            log.warning(
                "cannot reach Redis (%s): starting from the local copy %s (version %d)",
                exc,
                follow.copy_path(),
                stored.version,
            )
        if stored is None:
            raise ConfigError([f"no config has been pushed to {link.describe()} (bastion push CONFIG --redis URL)"])
        try:
            return self._loaded_version(stored), stored
        except ConfigError as exc:
            raise VersionProblems(exc.problems, stored) from None

    def _loaded_version(self, stored: StoredVersion) -> LoadedConfig:
        """Parse a stored version with this host's environment; without its own `cluster`,
        it uses the Redis it came from for rate limits and consumers."""
        assert self.follow is not None
        loaded = load_config_text(stored.config, f"redis:v{stored.version}")
        if loaded.config.cluster is None:
            cluster = Cluster(redis=self.follow.url, prefix=self.follow.prefix)
            loaded = dataclasses.replace(loaded, config=loaded.config.model_copy(update={"cluster": cluster}))
        return loaded

    def _link(self, url: str, prefix: str) -> ClusterLink:
        from bastion.cluster.follow import ClusterLink

        link = self._links.get((url, prefix))
        if link is None:
            link = self._links[(url, prefix)] = ClusterLink(url, prefix)
        return link

    async def _cluster_consumers(self, config: Config) -> list[Consumer]:
        """The consumers in the cluster's Redis (the last known ones when it cannot answer)."""
        cluster = config.cluster
        if cluster is None:
            return []
        from bastion.cluster.follow import ClusterUnavailable

        try:
            rev, consumers = await self._link(cluster.redis, cluster.prefix).fetch_consumers()
        except ClusterUnavailable as exc:
            log.warning("cannot read consumers from Redis (%s): using the %d last known", exc, len(self._consumers))
            return self._consumers
        self._consumers, self._consumers_rev = consumers, rev
        return consumers

    def _applied(self, loaded: LoadedConfig, stored: StoredVersion | None) -> None:
        """Record what runs now; with `follow`, save it as the local copy."""
        self._loaded, self._stored = loaded, stored
        if stored is not None and self.follow is not None:
            source = f"redis {self._link(self.follow.url, self.follow.prefix).describe()}"
            if self._from_copy:
                source = f"local copy {self.follow.copy_path()} of {source}"
            self.config_info = {
                "source": source,
                "version": stored.version,
                "sha256": stored.sha256,
                "pushed_at": stored.pushed_at,
                "pushed_by": stored.pushed_by,
            }
            if not self._from_copy:
                self._save_local_copy(stored)
        else:
            digest = hashlib.sha256(loaded.source_text.encode()).hexdigest() if loaded.source_text else ""
            self.config_info = {"source": f"file {self.config_path}", "version": None, "sha256": digest}
        self.config_info["applied_at"] = time.time()
        self.config_info["consumers_from_redis"] = len(self._consumers)
        self.config_info["consumers_rev"] = self._consumers_rev

    def _save_local_copy(self, stored: StoredVersion) -> None:
        from bastion.cluster.consumers import to_json
        from bastion.cluster.versions import LocalCopy

        assert self.follow is not None
        try:
            consumers = [json.loads(to_json(c)) for c in self._consumers]
            LocalCopy(self.follow.copy_path()).save(stored, consumers, self._consumers_rev)
        except OSError as exc:
            log.warning("cannot write the local copy %s: %s", self.follow.copy_path(), exc)

    def describe_config(self) -> str:
        info = self.config_info
        version = f"version {info['version']} " if info.get("version") is not None else ""
        return f"{version}from {info.get('source', '?')} (sha256 {str(info.get('sha256', ''))[:12]})"

    def _cluster_poked(self) -> None:
        """Something in Redis may have changed: check, one check at a time."""
        if self._syncing:
            self._poked = True
            return
        self._syncing = True
        self._spawn(self._sync())

    async def _sync(self) -> None:
        from bastion.cluster.follow import ClusterUnavailable

        try:
            while True:
                self._poked = False
                if self._stopping:
                    return
                with contextlib.suppress(ClusterUnavailable):  # the running config stays; poked again later
                    await self._sync_once()
                if not self._poked:
                    return
        finally:
            self._syncing = False

    async def _sync_once(self) -> None:
        follow = self.follow
        if follow is not None:
            head, _ = await self._link(follow.url, follow.prefix).heads()
            running = (self._stored.version, self._stored.sha256) if self._stored is not None else None
            if self._from_copy:
                self._from_copy = False
                log.info("Redis answers again: following it (running the local copy's version)")
                if head == running and self._loaded is not None:
                    self._applied(self._loaded, self._stored)
            if head is not None and head != running and head != self._rejected:
                log.info("config version %d pushed (sha256 %s): reloading", head[0], head[1][:12])
                await self.reload()
                return
        cluster = self._loaded.config.cluster if self._loaded is not None else None
        if cluster is not None:
            _, rev = await self._link(cluster.redis, cluster.prefix).heads()
            if rev != self._consumers_rev:
                await self.reload(same_config=True, why="consumers from Redis updated")

    def statistics(self) -> dict[str, Any]:
        """What the admin API and metrics read: the config running and its source, reloads, the store."""
        return {
            "config": dict(self.config_info),
            "reloads": dict(self.reloads),
            "uptime": time.time() - self.started_at,
            "last_reload": self.last_reload,
            "store": self._snapshot.store.statistics() if self._snapshot is not None else None,
            "following": {link.describe(): link.subscribed for link in self._links.values()},
            "tls": {bind: front.certs.statistics() for bind, front in self.tls_fronts.items()},
            "access_log": access_log.statistics() if (access_log := self._access_log()) is not None else None,
        }

    def is_ready(self) -> bool:
        """Serving: a config is live and every listener is bound (false while draining)."""
        bound = set(self.servers) | set(self.udp)
        return self._snapshot is not None and not self._stopping and bound == set(self.listeners)

    def _access_log(self) -> AccessLog | None:
        return self._snapshot.access_log if self._snapshot is not None else None

    def reopen_logs(self) -> list[str]:
        """SIGUSR1: reopen the access log files (logrotate renamed them); the paths reopened."""
        return reopen_access_logs()

    async def _watch(self, interval: float) -> None:
        """Reload when the config file's content changes (polling: no extra dependency)."""
        while True:
            await asyncio.sleep(interval)
            seen = file_fingerprint(self.config_path)
            if seen is None or seen == self._fingerprint:
                continue
            if self._fingerprint is not None and seen[2] == self._fingerprint[2]:
                self._fingerprint = seen  # touched, not changed
                continue
            log.info("config file %s changed, reloading", self.config_path)
            await self.reload()

    async def _watch_tls(self, interval: float) -> None:
        """Reload when a certificate, key or CA file the config names changes content.

        A change is acted on once: if the new files are refused (a certificate and a key that
        do not match yet, half-way through a renewal), the old ones keep serving and the next
        change of either file tries again."""
        while True:
            await asyncio.sleep(interval)
            snapshot = self._snapshot
            if snapshot is None or not snapshot.tls_files:
                continue
            seen = await asyncio.to_thread(_digests, list(snapshot.tls_files))
            changed = [path for path, digest in seen.items() if digest != self._tls_seen.get(path)]
            if not changed:
                continue
            self._tls_seen.update(seen)
            log.info("TLS files changed (%s): reloading", ", ".join(changed))
            await self.reload(same_config=True, why="TLS files reloaded")

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish up to `timeout`, then cut the rest."""
        self._stopping = True
        if timeout is None:
            timeout = self.snapshot.config.drain_timeout if self._snapshot else 0.0
        for server in self.servers.values():
            server.close()
        self.servers.clear()
        for udp in self.udp.values():
            udp.close()
        self.udp.clear()
        for conn in list(self.connections):
            conn.drain()
        loop = asyncio.get_running_loop()
        self._drain_deadline = loop.time() + timeout
        while self.connections and loop.time() < self._drain_deadline:
            await asyncio.sleep(0.02)
        if self.connections:
            log.warning("drain timeout: closing %d connections still busy", len(self.connections))
        for conn in list(self.connections):
            conn.abort()
        # Cut connections end within a loop turn or two; a relayed one (WebSocket) when its
        # relay has closed both sides, which is when its access log line is written.
        cut_deadline = loop.time() + 1.0
        while self.connections and loop.time() < cut_deadline:
            await asyncio.sleep(0.01)
        await self.health.close()
        for task in list(self._tasks):
            task.cancel()
        for state in self.registry.targets.values():
            state.pool.close()
        for retired in [*self._retired, self._snapshot]:
            if retired is not None:
                await retired.close()  # no-op for those already closed
        self._retired.clear()
        for link in self._links.values():
            await link.close()
        await self.admin.close()  # last: /readyz says "not ready" while the drain runs
        self._stopped.set()

    def hurry(self) -> None:
        """End a running drain now (a second SIGTERM)."""
        self._drain_deadline = 0.0

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tick(self) -> None:
        """Enforce client read deadlines: one pass over the connections, a few times a second."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_INTERVAL)
            now = loop.time()
            for conn in list(self.connections):
                conn.check_deadline(now)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = loop.time()
            for state in self.registry.targets.values():
                state.pool.sweep(now)
            for udp in self.udp.values():
                udp.sweep(now)


def _digests(paths: list[str]) -> dict[str, str]:
    return {path: file_digest(path) for path in paths}


async def serve(
    config_path: str,
    snapshot: Snapshot | None = None,
    reuse_port: bool = False,
    *,
    worker: int = 0,
    workers: int = 1,
    watch: float | None = WATCH_INTERVAL,
    ready: Callable[[], None] | None = None,
    follow: FollowSettings | None = None,
    peers_dir: str | None = None,
    restarts: int = 0,
    launched_at: float | None = None,
    tls_watch: float | None = WATCH_INTERVAL,
) -> int:
    """Run one gateway process until SIGTERM/SIGINT; SIGHUP (or a changed file, or a pushed
    version with `follow`) reloads; SIGUSR1 reopens the access log file.

    `ready` is called once the listeners are open (the worker supervisor waits for it).
    """
    gateway = Gateway(
        config_path,
        reuse_port=reuse_port,
        worker=worker,
        workers=workers,
        watch=watch,
        follow=follow,
        peers_dir=peers_dir,
        restarts=restarts,
        launched_at=launched_at,
        tls_watch=tls_watch,
    )
    try:
        await gateway.start(snapshot)
    except BaseException:
        for link in gateway._links.values():
            await link.close()
        await gateway.admin.close()
        raise
    if ready is not None:
        ready()
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def stop() -> None:
        if stopping:
            log.warning("second stop signal: closing every connection now")
            gateway.hurry()
            return
        log.info("shutting down: draining in-flight requests")
        stopping.append(loop.create_task(gateway.shutdown()))

    def reload() -> None:
        log.info("SIGHUP: reloading %s", config_path if follow is None else "the current version from Redis")
        gateway._spawn(gateway.reload())

    def reopen() -> None:
        if not gateway.reopen_logs():
            log.info("SIGUSR1: no access log file to reopen")

    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)
    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGUSR1, reopen)
    await gateway.wait_stopped()
    log.info("stopped")
    return 0


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def raise_open_files_limit() -> None:
    """Every client and upstream connection is a file descriptor: take all the OS allows
    (the soft limit is often 1024; nginx's worker_rlimit_nofile does the same)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = max(soft, 1 << 20)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError) as exc:
        log.warning("could not raise the open files limit: %s", exc)
