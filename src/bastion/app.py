"""The gateway's lifecycle: load config -> build snapshot -> listen -> swap on reload -> drain.

`Gateway` owns the listening servers, the live client connections, the target registry
(connection pools and health that outlive snapshots) and the current Snapshot, which every
new request reads once. A reload builds a complete new snapshot off the hot path and swaps
the reference; if building fails, the old snapshot keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from bastion.config.build import Snapshot, build_snapshot, close_later
from bastion.config.loader import load_config
from bastion.config.schema import Listener
from bastion.errors import ConfigError
from bastion.observability.logs import setup_logging
from bastion.proto.h1 import H1Server
from bastion.upstream.targets import TargetRegistry

log = logging.getLogger("bastion")

SWEEP_INTERVAL = 1.0


class Gateway:
    def __init__(self, config_path: str, reuse_port: bool = False) -> None:
        self.config_path = config_path
        self.reuse_port = reuse_port
        self.registry = TargetRegistry()
        self.connections: set[H1Server] = set()
        self.servers: dict[str, asyncio.Server] = {}  # by bind address
        self.listeners: dict[str, Listener] = {}  # by bind address, current settings
        self._snapshot: Snapshot | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()

    @property
    def snapshot(self) -> Snapshot:
        assert self._snapshot is not None, "the gateway has not started"
        return self._snapshot

    def build(self) -> Snapshot:
        """Load and build the config file. Raises ConfigError."""
        return build_snapshot(load_config(self.config_path), self.registry)

    async def start(self, snapshot: Snapshot | None = None) -> None:
        snapshot = snapshot or self.build()
        await snapshot.start()
        self._snapshot = snapshot
        await self._bind(snapshot)
        self._spawn(self._sweep())

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
        try:
            snapshot = self.build()
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
        old, self._snapshot = self._snapshot, snapshot
        keep = snapshot.target_keys()
        self.registry.retain_only(keep)
        if old is not None:
            self._spawn(close_later(old, snapshot.config.drain_timeout))
        log.info("config reloaded from %s", self.config_path)
        return True

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish up to `timeout`, then cut the rest."""
        if timeout is None:
            timeout = self.snapshot.config.drain_timeout if self._snapshot else 0.0
        for server in self.servers.values():
            server.close()
        self.servers.clear()
        for conn in list(self.connections):
            conn.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        for state in self.registry.targets.values():
            state.pool.close()
        if self._snapshot is not None:
            await self._snapshot.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = loop.time()
            for state in self.registry.targets.values():
                state.pool.sweep(now)


async def serve(config_path: str, snapshot: Snapshot | None = None, reuse_port: bool = False) -> int:
    """Run one gateway process until SIGTERM/SIGINT; SIGHUP reloads."""
    gateway = Gateway(config_path, reuse_port=reuse_port)
    await gateway.start(snapshot)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def stop() -> None:
        if not stopping:
            log.info("shutting down: draining in-flight requests")
            stopping.append(loop.create_task(gateway.shutdown()))

    def reload() -> None:
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


def run_gateway(config_path: str, workers: int | None = None) -> int:
    """The `bastion run` command: validate, then serve in the foreground. Returns the exit code."""
    try:
        loaded = load_config(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    setup_logging(loaded.config.log.level)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(serve(config_path))
