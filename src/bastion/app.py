"""The gateway's lifecycle: load config -> build snapshot -> listen -> swap on reload -> drain.

`Gateway` owns the listening servers, the live client connections, the target registry
(connection pools and health that outlive snapshots), the active health checkers and the
current Snapshot, which every new request reads once. A reload (SIGHUP, a change to the
config file, or `reload()`) parses the file in a thread, builds a complete new snapshot and
swaps the reference; if anything fails, the old snapshot keeps serving and the reason is
logged. Requests in flight finish on the snapshot they started with; keep-alive client
connections stay open and their next request reads the new one.

Shutdown (SIGTERM/SIGINT) stops accepting, lets in-flight requests finish up to the drain
timeout, then cuts what is left; a second signal cuts at once. With `--workers N` a
supervisor (workers.py) runs N of these processes on SO_REUSEPORT listeners.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from bastion.config.build import Snapshot, build_snapshot, close_later
from bastion.config.loader import load_config
from bastion.config.schema import Listener
from bastion.errors import ConfigError
from bastion.observability.logs import setup_logging
from bastion.proto.h1 import H1Server, ReadBuffer
from bastion.upstream.health import HealthMonitor
from bastion.upstream.targets import TargetRegistry

log = logging.getLogger("bastion")

SWEEP_INTERVAL = 1.0  # idle upstream connections past their idle timeout
TICK_INTERVAL = 0.25  # client read deadlines: timeouts are enforced to within this
WATCH_INTERVAL = 1.0


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
    ) -> None:
        """`worker`/`workers`: this process's place among the workers (spreads health checks);
        `watch`: poll the config file every so many seconds and reload when it changes."""
        self.config_path = config_path
        self.reuse_port = reuse_port
        self.worker = worker
        self.watch = watch
        self.registry = TargetRegistry()
        self.read_buffer = ReadBuffer()  # shared by this gateway's client connections
        self.health = HealthMonitor(worker, workers)
        self.connections: set[H1Server] = set()
        self.servers: dict[str, asyncio.Server] = {}  # by bind address
        self.listeners: dict[str, Listener] = {}  # by bind address, current settings
        self._snapshot: Snapshot | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retired: list[Snapshot] = []  # replaced by a reload, closed after a delay
        self._stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._fingerprint: tuple[int, int, str] | None = None
        self._drain_deadline = 0.0
        self._stopping = False

    @property
    def snapshot(self) -> Snapshot:
        assert self._snapshot is not None, "the gateway has not started"
        return self._snapshot

    def build(self) -> Snapshot:
        """Load and build the config file. Raises ConfigError."""
        return build_snapshot(load_config(self.config_path), self.registry)

    async def start(self, snapshot: Snapshot | None = None) -> None:
        self._fingerprint = file_fingerprint(self.config_path)
        snapshot = snapshot or self.build()
        await snapshot.start()
        self._go_live(snapshot)
        await self._bind(snapshot)
        self._spawn(self._sweep())
        self._spawn(self._tick())
        if self.watch:
            self._spawn(self._watch(self.watch))

    def _go_live(self, snapshot: Snapshot) -> None:
        """Make `snapshot` the one new requests use, and point the live target state at it."""
        for upstream in snapshot.upstreams.values():
            upstream.activate()
        self._snapshot = snapshot
        self.registry.running = True
        self.registry.retain_only(snapshot.target_keys())
        self.health.sync(snapshot.upstreams)

    async def _bind(self, snapshot: Snapshot) -> None:
        """Open listeners that are new, close those that are gone, update settings of the rest."""
        loop = asyncio.get_running_loop()
        wanted = {str(listener.bind): listener for listener in snapshot.config.listeners}
        for bind, server in list(self.servers.items()):
            if bind not in wanted:
                server.close()
                del self.servers[bind]
                log.info("listener %s closed", bind)
        self.listeners = wanted
        for bind, listener in wanted.items():
            if bind in self.servers:
                continue
            server = await loop.create_server(
                self._factory(bind),
                listener.bind.host,
                listener.bind.port,
                backlog=listener.backlog,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
            )
            self.servers[bind] = server
            log.info("listener %s (%s) on http://%s", listener.name, listener.protocol, bind)

    def _factory(self, bind: str) -> Callable[[], H1Server]:
        def make() -> H1Server:
            return H1Server(self, self.listeners[bind])

        return make

    async def reload(self) -> bool:
        """Build the config again and swap it in; on any error keep the running one."""
        async with self._reload_lock:
            if self._stopping:
                return False
            return await self._reload()

    async def _reload(self) -> bool:
        self._fingerprint = file_fingerprint(self.config_path)
        try:
            # Parsing and validating happen in a thread so the event loop keeps serving.
            loaded = await asyncio.to_thread(load_config, self.config_path)
            snapshot = build_snapshot(loaded, self.registry)
            await snapshot.start()
        except ConfigError as exc:
            log.error("reload rejected, the running config stays:\n%s", "\n".join(exc.problems))
            return False
        except Exception:
            log.exception("reload rejected, the running config stays")
            return False
        try:
            await self._bind(snapshot)
        except OSError as exc:
            log.error("reload rejected, cannot listen: %s", exc)
            await snapshot.close()
            return False
        old = self._snapshot
        self._go_live(snapshot)
        if old is not None:
            self._retired.append(old)
            self._spawn(close_later(old, snapshot.config.drain_timeout))
        log.info("config reloaded from %s", self.config_path)
        return True

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

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish up to `timeout`, then cut the rest."""
        self._stopping = True
        if timeout is None:
            timeout = self.snapshot.config.drain_timeout if self._snapshot else 0.0
        for server in self.servers.values():
            server.close()
        self.servers.clear()
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
        await self.health.close()
        for task in list(self._tasks):
            task.cancel()
        for state in self.registry.targets.values():
            state.pool.close()
        for retired in [*self._retired, self._snapshot]:
            if retired is not None:
                await retired.close()  # no-op for those already closed
        self._retired.clear()
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


async def serve(
    config_path: str,
    snapshot: Snapshot | None = None,
    reuse_port: bool = False,
    *,
    worker: int = 0,
    workers: int = 1,
    watch: float | None = WATCH_INTERVAL,
    ready: Callable[[], None] | None = None,
) -> int:
    """Run one gateway process until SIGTERM/SIGINT; SIGHUP (or a changed file) reloads.

    `ready` is called once the listeners are open (the worker supervisor waits for it).
    """
    gateway = Gateway(config_path, reuse_port=reuse_port, worker=worker, workers=workers, watch=watch)
    await gateway.start(snapshot)
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
        log.info("SIGHUP: reloading %s", config_path)
        gateway._spawn(gateway.reload())

    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)
    loop.add_signal_handler(signal.SIGHUP, reload)
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


def run_gateway(config_path: str, workers: int | None = None) -> int:
    """The `bastion run` command: validate, then serve in the foreground. Returns the exit code.

    One worker runs in this process; more run under a supervisor (bastion.workers).
    """
    try:
        loaded = load_config(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    setup_logging(loaded.config.log.level)
    raise_open_files_limit()
    if workers is not None and workers > 1:
        from bastion.workers import supervise

        return supervise(config_path, workers)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(serve(config_path))
