"""Single-machine stores: a table in shared memory (for workers) and a process-local dict.

A gateway of one process uses `LocalStore`: no file, no locks. Under the workers supervisor
(`BASTION_WORKERS` > 1, see `default_store`) every worker uses the shared table below.

With `--workers N`, N processes serve the same listeners; a rate limit must hold for the
machine, not N times over. So the default store keeps its GCRA numbers in a file-backed
table that every process running the same config maps into memory (`/dev/shm`, a RAM
file system, so nothing touches a disk):

    hashes[slots + PROBE]  uint64   64-bit hash of the key, 0 = never used
    tats[slots + PROBE]    int64    the key's TAT in ns since the epoch

A key lives in the first slots of its probe window, `hash % slots` plus PROBE slots (the
extra PROBE slots at the end mean a window never wraps). A slot whose TAT is in the past
holds no information (GCRA treats an idle key like an unknown one), so it is free to reuse:
the table only has to hold the keys that were active within their own period. If a whole
window is busy, the slot closest to expiry is taken over, which forgets that key's debt;
`statistics()` counts these evictions.

Every update runs under an exclusive `lockf` lock on the file (and a thread lock, because
POSIX record locks do not exclude threads of one process): a few microseconds, two system
calls, no waiting in practice. A process that dies releases its locks with it. Each process
also holds a shared `flock` on the file while it uses it; the last one out takes it
exclusively and deletes the file. A process that opened the file just before it was deleted
notices (the path no longer names its inode) and opens again.

The file name comes from the config file's real path, so every worker of one gateway, and
any other Bastion process started with the same config on this machine, share the counters.
`BASTION_STATE_DIR` picks another directory. Where shared memory cannot be used, the store
falls back to a process-local table and says so in the log (limits are then per process).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from bastion.store.base import NS, RateResult, Store, gcra

log = logging.getLogger("bastion.store")

WORKERS_ENV = "BASTION_WORKERS"  # set by the workers supervisor
SLOTS = 1 << 16
PROBE = 32
_VERSION = 1

Clock = Callable[[], int]


def key_hash(key: str) -> int:
    """A stable, non-zero 64-bit hash (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


def state_dir() -> str:
    """Where shared tables live: $BASTION_STATE_DIR, else /dev/shm, else the temp directory."""
    configured = os.environ.get("BASTION_STATE_DIR")
    if configured:
        return configured
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def table_path(config_path: str, slots: int = SLOTS) -> str:
    """The shared table of the gateways that run `config_path` on this machine."""
    real = os.path.realpath(config_path) if config_path else "<no config file>"
    digest = hashlib.sha256(real.encode()).hexdigest()[:16]
    return os.path.join(state_dir(), f"bastion-{os.getuid()}-{digest}-v{_VERSION}-{slots}.gcra")


class SharedTable:
    """The mapped table of one file; one object per path per process (see `attach`)."""

    def __init__(self, path: str, slots: int = SLOTS, clock: Clock = time.time_ns) -> None:
        self.path = path
        self.slots = slots
        self.clock = clock
        self.users = 0
        self.evictions = 0
        self._lock = threading.Lock()
        size = 16 * (slots + PROBE)
        self._fd = self._open(size)
        try:
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        view = memoryview(self._map)
        half = 8 * (slots + PROBE)
        self._hashes = view[:half].cast("Q")
        self._tats = view[half:].cast("q")

    def _open(self, size: int) -> int:
        """Open (or create) the file and hold a shared flock on the inode the path names."""
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                try:
                    current = os.stat(self.path)
                except FileNotFoundError:
                    current = None
                mine = os.fstat(fd)
                if current is None or current.st_ino != mine.st_ino or current.st_dev != mine.st_dev:
                    os.close(fd)  # deleted by the last user while we opened it: again
                    continue
                fcntl.lockf(fd, fcntl.LOCK_EX)
                try:
                    actual = os.fstat(fd).st_size
                    if actual == 0:
                        os.ftruncate(fd, size)  # zero-filled: every slot unused
                    elif actual != size:
                        raise OSError(errno.EINVAL, f"{self.path} has {actual} bytes, expected {size}")
                finally:
                    fcntl.lockf(fd, fcntl.LOCK_UN)
                return fd
            except BaseException:
                os.close(fd)
                raise
        raise OSError(errno.EAGAIN, f"could not open {self.path}")

    def rate(self, key: str, limit: int, period: int, burst: int, cost: int) -> RateResult:
        wanted = key_hash(key)
        start = wanted % self.slots
        end = start + PROBE
        hashes = self._hashes
        tats = self._tats
        with self._lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                now = self.clock()
                window = hashes[start:end].tolist()
                try:
                    slot = start + window.index(wanted)
                    tat: int | None = tats[slot]
                except ValueError:
                    slot = self._free_slot(window, tats[start:end].tolist(), start, now)
                    tat = None
                new_tat, result = gcra(tat, now, limit, period, burst, cost)
                if new_tat is not None:
                    hashes[slot] = wanted
                    tats[slot] = new_tat
                return result
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _free_slot(self, window: list[int], window_tats: list[int], start: int, now: int) -> int:
        """An unused or idle slot of the window; failing that, the one closest to expiry."""
        for offset, (hashed, tat) in enumerate(zip(window, window_tats, strict=True)):
            if hashed == 0 or tat <= now:
                return start + offset
        self.evictions += 1
        return start + window_tats.index(min(window_tats))

    def used(self) -> int:
        """Slots holding an active key right now (a full scan: for statistics, not the hot path)."""
        now = self.clock()
        return sum(1 for h, t in zip(self._hashes, self._tats, strict=True) if h and t > now)

    def close(self) -> None:
        """Unmap and close; the last process using the file deletes it."""
        self._hashes.release()
        self._tats.release()
        self._map.close()
        fd = self._fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # someone else still uses it
        else:
            try:
                current = os.stat(self.path)
                mine = os.fstat(fd)
                if current.st_ino == mine.st_ino and current.st_dev == mine.st_dev:
                    os.unlink(self.path)
            except OSError:
                pass
        os.close(fd)


_tables: dict[str, SharedTable] = {}
_tables_lock = threading.Lock()


def attach(path: str, slots: int = SLOTS) -> SharedTable:
    """The process's table for `path`, opened on first use; pair with `detach`."""
    with _tables_lock:
        table = _tables.get(path)
        if table is None:
            table = _tables[path] = SharedTable(path, slots)
        table.users += 1
        return table


def detach(table: SharedTable) -> None:
    with _tables_lock:
        table.users -= 1
        if table.users == 0:
            _tables.pop(table.path, None)
            table.close()


@atexit.register
def _detach_all() -> None:
    """At exit, close what is still attached (a snapshot retired without close) so the last
    process out still deletes the file."""
    with _tables_lock:
        tables = list(_tables.values())
        _tables.clear()
    for table in tables:
        with contextlib.suppress(OSError, BufferError, ValueError):
            table.close()


class LocalStore(Store):
    """GCRA state in a dict of this process: exact for one process, per process with workers.

    Idle keys are swept when the dict grows past `sweep_at`, so memory follows the number of
    keys active within their period.
    """

    name = "local"

    def __init__(self, clock: Clock = time.time_ns, sweep_at: int = 100_000) -> None:
        self.clock = clock
        self.sweep_at = sweep_at
        self._tats: dict[str, int] = {}

    async def rate(self, key: str, limit: int, period: float, burst: int, cost: int = 1) -> RateResult:
        return self.rate_now(key, limit, int(period * NS), burst, cost)

    def rate_now(self, key: str, limit: int, period: int, burst: int, cost: int = 1) -> RateResult:
        tats = self._tats
        now = self.clock()
        new_tat, result = gcra(tats.get(key), now, limit, period, burst, cost)
        if new_tat is not None:
            if len(tats) >= self.sweep_at and key not in tats:
                tats = self._sweep(now)
            tats[key] = new_tat
        return result

    def _sweep(self, now: int) -> dict[str, int]:
        self._tats = {k: t for k, t in self._tats.items() if t > now}
        return self._tats

    def statistics(self) -> dict[str, Any]:
        return {"name": self.name, "keys": len(self._tats)}


_local_stores: dict[str, LocalStore] = {}


def default_store(config_path: str) -> Store:
    """The store a gateway uses without `cluster`: shared only when workers need sharing.

    The process-local store is one per config file for the life of the process, so counters
    survive a reload just as they do in the shared table."""
    if int(os.environ.get(WORKERS_ENV, "1") or "1") > 1:
        return MemoryStore(table_path(config_path))
    return _local_stores.setdefault(os.path.realpath(config_path) if config_path else "", LocalStore())


class MemoryStore(Store):
    """The default store: the shared table of this config, attached on first use.

    Falls back to a LocalStore (with a warning) when the table cannot be opened.
    """

    name = "memory"

    def __init__(self, path: str, slots: int = SLOTS) -> None:
        self.path = path
        self.slots = slots
        self._table: SharedTable | None = None
        self._fallback: LocalStore | None = None
        self._closed = False

    async def rate(self, key: str, limit: int, period: float, burst: int, cost: int = 1) -> RateResult:
        table = self._table
        if table is None:
            if self._fallback is not None:
                return self._fallback.rate_now(key, limit, int(period * NS), burst, cost)
            table = self._attach()
            if table is None:
                return await self.rate(key, limit, period, burst, cost)
        return table.rate(key, limit, int(period * NS), burst, cost)

    def _attach(self) -> SharedTable | None:
        if self._closed:
            raise RuntimeError("the store is closed")
        try:
            self._table = attach(self.path, self.slots)
        except OSError as exc:
            log.warning("rate limits are per process: cannot use shared memory at %s (%s)", self.path, exc)
            self._fallback = LocalStore()
        return self._table

    async def close(self) -> None:
        self._closed = True
        table, self._table = self._table, None
        if table is not None:
            detach(table)

    def statistics(self) -> dict[str, Any]:
        if self._fallback is not None:
            return {**self._fallback.statistics(), "name": self.name, "shared": False}
        table = self._table
        return {
            "name": self.name,
            "shared": True,
            "path": self.path,
            "slots": self.slots,
            "evictions": table.evictions if table is not None else 0,
        }
