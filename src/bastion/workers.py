"""`bastion run --workers N`: a supervisor process and N worker processes.

The supervisor has no event loop and serves no traffic. It forks N workers; each runs the
whole gateway (`app.serve`) on its own uvloop with its own listening sockets bound with
SO_REUSEPORT, so the kernel spreads new connections over the workers and one worker's crash
never closes another's sockets.

The supervisor blocks the signals it handles and takes them with `sigtimedwait`, so there is
no handler racing with the main loop:

- SIGHUP, or a change to the config file (polled every second): the file is validated once
  here; a valid file is announced to every worker with SIGHUP (each builds and swaps its own
  snapshot), an invalid one is logged and the running config stays.
- SIGUSR1: forwarded to every worker, which reopens its access log file (log rotation).
- SIGTERM / SIGINT: forwarded to every worker, which drains and exits; after the drain timeout
  (plus a grace period) a worker still alive is killed. A second signal is forwarded too
  (workers then cut their connections at once). The supervisor exits 0.
- A worker that exits while the supervisor is not stopping is replaced, at once the first
  time, then with a doubling delay (up to 10 s) while replacements keep dying young.

State that is per process: connection pools, passive health, latency scores, retry budgets.
Rate-limit counters are shared: the memory store keeps them in one shared-memory table that
every worker maps (see docs/plugins.md). Active health checks are spread: each worker probes
every `interval x N`, offset by its index, so a target sees one probe per `interval` in total
(see docs/load-balancing.md). The sticky-session key is created here and inherited, so every
worker (and every replacement) sets and understands the same cookie values.

The admin API: every worker listens on `admin.bind` (SO_REUSEPORT) and on a unix socket in a
private directory made here (`peers_dir`); the worker that takes an admin request asks the
others over their sockets and answers for the whole gateway (see admin/node.py). The
supervisor itself serves nothing and holds no counters, so it stays free of threads and of an
event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import TYPE_CHECKING

from bastion.collector import tune_collector
from bastion.config.loader import load_config
from bastion.errors import ConfigError
from bastion.store.memory import WORKERS_ENV
from bastion.upstream.runtime import STICKY_SECRET_ENV

if TYPE_CHECKING:
    from bastion.cluster.follow import FollowSettings

log = logging.getLogger("bastion.workers")

HANDLED = frozenset((signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR1))
TICK = 0.2
WATCH_INTERVAL = 1.0
STOP_GRACE = 5.0
YOUNG = 5.0  # a worker that dies sooner than this counts toward the respawn backoff
MAX_BACKOFF = 10.0


class Slot:
    """One worker position: the current process and its crash history."""

    __slots__ = ("index", "pid", "started", "ready", "quick_deaths", "respawn_at", "spawns")

    def __init__(self, index: int) -> None:
        self.index = index
        self.spawns = 0
        self.pid = 0
        self.started = 0.0
        self.ready = False
        self.quick_deaths = 0
        self.respawn_at = 0.0


def _die_with_parent() -> None:
    """Linux: get SIGTERM if the supervisor dies, so no orphan keeps serving an old config."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_worker(
    config_path: str,
    index: int,
    count: int,
    ready_fd: int,
    follow: FollowSettings | None = None,
    *,
    peers_dir: str | None = None,
    restarts: int = 0,
    launched_at: float | None = None,
) -> int:
    """A worker's life: the gateway on SO_REUSEPORT listeners, until SIGTERM."""
    from bastion.app import new_event_loop, serve

    def ready() -> None:
        os.write(ready_fd, bytes((index,)))

    class Tag(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.msg = f"worker {index}: {record.msg}"
            return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(Tag())

    tune_collector()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(
            serve(
                config_path,
                reuse_port=True,
                worker=index,
                workers=count,
                watch=None,
                ready=ready,
                follow=follow,
                peers_dir=peers_dir,
                restarts=restarts,
                launched_at=launched_at,
            )
        )


class Supervisor:
    def __init__(self, config_path: str, count: int, follow: FollowSettings | None = None) -> None:
        self.config_path = config_path
        self.follow = follow  # --from-redis: each worker follows Redis itself
        self.count = count
        self.slots = [Slot(i) for i in range(count)]
        self.stopping = False
        self.stop_deadline = 0.0
        self.killed = False
        self.ever_ready = False
        self.exit_code = 0
        self.launched_at = time.time()
        # The workers' admin sockets and shared drain list: private to this user (mode 0700).
        self.peers_dir = tempfile.mkdtemp(prefix="bastion-workers-")
        # Workers report "listening" by writing their index here.
        self.ready_read, self.ready_write = os.pipe()
        os.set_blocking(self.ready_read, False)

    # --- workers ---------------------------------------------------------------------------

    def spawn(self, slot: Slot) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        slot.spawns += 1
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for signum in HANDLED:
                    signal.signal(signum, signal.SIG_DFL)
                # Ignored until serve() handles it: a log rotation must not end a starting worker.
                signal.signal(signal.SIGUSR1, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
                _die_with_parent()
                os.close(self.ready_read)
                code = run_worker(
                    self.config_path,
                    slot.index,
                    self.count,
                    self.ready_write,
                    self.follow,
                    peers_dir=self.peers_dir,
                    restarts=slot.spawns - 1,
                    launched_at=self.launched_at,
                )
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        slot.pid = pid
        slot.started = time.monotonic()
        slot.ready = False
        log.info("worker %d started (pid %d)", slot.index, pid)

    def collect_ready(self) -> None:
        try:
            data = os.read(self.ready_read, 256)
        except BlockingIOError:
            return
        for index in data:
            if index < len(self.slots) and self.slots[index].pid:
                self.slots[index].ready = True
                self.ever_ready = True

    def signal_all(self, signum: int) -> None:
        for slot in self.slots:
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signum)

    def reap(self) -> None:
        """Collect exited workers; schedule replacements unless stopping."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            slot.pid = 0
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                log.info("worker %d (pid %d) exited (%d)", slot.index, pid, code)
                continue
            if not slot.ready and not self.ever_ready:
                # Not one worker ever came up (a port in use, a config that cannot be built):
                # respawning would only loop. Give up like a single process would.
                log.error("worker %d (pid %d) failed to start (%d); stopping", slot.index, pid, code)
                self.exit_code = 1
                self.stop()
                continue
            now = time.monotonic()
            slot.quick_deaths = slot.quick_deaths + 1 if now - slot.started < YOUNG else 0
            delay = 0.0 if slot.quick_deaths <= 1 else min(0.25 * 2 ** (slot.quick_deaths - 1), MAX_BACKOFF)
            slot.respawn_at = now + delay
            log.error("worker %d (pid %d) died (%d); replacing it in %.2gs", slot.index, pid, code, delay)

    # --- signals ---------------------------------------------------------------------------

    def reload(self, why: str) -> None:
        """Validate once here; announce a valid config to every worker."""
        if self.follow is not None:
            log.info("reloading (%s): signalling %d workers", why, self.count)
            self.signal_all(signal.SIGHUP)
            return
        try:
            load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload (%s) rejected, the running config stays:\n%s", why, "\n".join(exc.problems))
            return
        log.info("reloading (%s): signalling %d workers", why, self.count)
        self.signal_all(signal.SIGHUP)

    def stop(self) -> None:
        if self.stopping:
            log.warning("second stop signal: workers close their connections now")
            self.signal_all(signal.SIGTERM)
            return
        self.stopping = True
        drain = 30.0
        if self.follow is None:
            with contextlib.suppress(ConfigError):
                drain = load_config(self.config_path).config.drain_timeout
        self.stop_deadline = time.monotonic() + drain + STOP_GRACE
        log.info("shutting down: %d workers drain", sum(1 for s in self.slots if s.pid))
        self.signal_all(signal.SIGTERM)

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        from bastion.app import file_fingerprint

        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        for slot in self.slots:
            self.spawn(slot)
        fingerprint = file_fingerprint(self.config_path)
        next_watch = time.monotonic() + WATCH_INTERVAL
        while True:
            info = signal.sigtimedwait(HANDLED, TICK)
            if info is not None:
                if info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    self.stop()
                elif info.si_signo == signal.SIGHUP and not self.stopping:
                    fingerprint = file_fingerprint(self.config_path)
                    self.reload("SIGHUP")
                elif info.si_signo == signal.SIGUSR1:
                    log.info("SIGUSR1: workers reopen their access log files")
                    self.signal_all(signal.SIGUSR1)
            self.collect_ready()
            self.reap()
            now = time.monotonic()
            if self.stopping:
                if not any(s.pid for s in self.slots):
                    log.info("stopped")
                    return self.exit_code
                if now >= self.stop_deadline and not self.killed:
                    log.error("workers still running after the drain timeout: killing them")
                    self.killed = True
                    self.signal_all(signal.SIGKILL)
                continue
            for slot in self.slots:
                if not slot.pid and now >= slot.respawn_at:
                    self.spawn(slot)
            if now >= next_watch and self.follow is None:
                next_watch = now + WATCH_INTERVAL
                seen = file_fingerprint(self.config_path)
                if seen is not None and fingerprint is not None and seen[2] != fingerprint[2]:
                    self.reload("config file changed")
                if seen is not None:
                    fingerprint = seen


def supervise(config_path: str, count: int, follow: FollowSettings | None = None) -> int:
    """Run `count` workers under a supervisor until SIGTERM/SIGINT; returns the exit code."""
    os.environ.setdefault(STICKY_SECRET_ENV, os.urandom(32).hex())
    os.environ[WORKERS_ENV] = str(count)  # the memory store shares rate-limit counters
    log.info("supervisor (pid %d): %d workers on SO_REUSEPORT listeners", os.getpid(), count)
    supervisor = Supervisor(config_path, count, follow)
    try:
        return supervisor.run()
    finally:
        shutil.rmtree(supervisor.peers_dir, ignore_errors=True)


def run_gateway(config_path: str, workers: int | None = None, follow: FollowSettings | None = None) -> int:
    """The `bastion run` command: validate, then serve in the foreground. Returns the exit code.

    One worker runs in this process; more run under a supervisor (`supervise`). With
    `follow` the config comes from Redis (`config_path` is then empty).
    """
    from bastion.app import new_event_loop, raise_open_files_limit, serve
    from bastion.observability.logs import setup_logging

    if follow is None:
        try:
            loaded = load_config(config_path)
        except ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return 1
        setup_logging(loaded.config.log.level)
    else:
        setup_logging("info")
    raise_open_files_limit()
    if workers is not None and workers > 1:
        return supervise(config_path, workers, follow)
    # A log rotation's SIGUSR1 that comes before serve() handles it must not end the process.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    tune_collector()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        try:
            return runner.run(serve(config_path, follow=follow))
        except ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return 1
