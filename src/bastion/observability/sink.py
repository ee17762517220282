"""Line output that never blocks the event loop: a slow or absent reader costs dropped lines,
counted and reported, never a stalled proxy.

How it works. Lines added during a loop iteration are joined and written once, on the next
iteration (`call_soon`), on a non-blocking descriptor that belongs to the sink alone:

- standard output that is a pipe or a terminal is opened again through /proc/self/fd/1, which
  makes a new open file description of the same pipe or terminal. O_NONBLOCK is set on that
  one only: fd 1 itself stays blocking, and with it the user's shell, the worker supervisor
  and standard error when it shares fd 1's description (`2>&1`).
- standard output that is a socket (the systemd journal) is written with send(MSG_DONTWAIT),
  a per-call flag, since a socket cannot be opened again.
- a regular file (standard output redirected to one, or `log.access_file`) is written with
  plain os.write: the kernel never makes such a write wait for a reader.

What the descriptor does not take stays pending in one buffer; the loop reports when the
descriptor can take more (`add_writer`; a regular file, which cannot be polled, is retried on
the next batch or after RETRY seconds). Lines are dropped, and counted, when:

- adding a line would take the buffered bytes over `limit`;
- nothing could be written for `stall` seconds: the pending lines are dropped, and new lines
  are dropped without being encoded until the descriptor takes bytes again;
- the reader closed its end (EPIPE): output stops until a reopen.

A warning on the `bastion.access` logger reports dropped lines, at most once per
WARN_INTERVAL, and once more when the sink closes.

Pipes: each write is at most PIPE_BUF bytes and ends at a line end, so the lines of workers
sharing one pipe never interleave (POSIX makes such writes atomic); only a line longer than
PIPE_BUF can be split. Writes to a file opened with O_APPEND are placed whole at its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import stat
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("bastion.access")

STDOUT = "standard output"
RETRY = 1.0  # a descriptor that cannot be polled (a regular file) is retried this often
WARN_INTERVAL = 10.0  # at most one warning about dropped lines per this many seconds
CLOSE_WAIT = 2.0  # how long closing waits for a slow reader to take the pending lines
PIPE_BUF = getattr(select, "PIPE_BUF", 4096)
COMPACT = 1 << 20  # written bytes kept at the buffer's head before it is compacted


class Output:
    """One open destination: how to write to it without waiting, and whether it can be polled."""

    def __init__(
        self,
        fd: int,
        write: Callable[[memoryview], int],
        *,
        pollable: bool,
        atomic_lines: bool,
        close: Callable[[], None] | None,
    ) -> None:
        self.fd = fd
        self.write = write
        self.pollable = pollable  # add_writer works (not a regular file)
        self.atomic_lines = atomic_lines  # a pipe: write at most PIPE_BUF, cut at line ends
        self.close = close or (lambda: None)  # releases what was opened for the sink only


def _fd_output(fd: int, own: bool) -> Output:
    mode = os.fstat(fd).st_mode

    def write(view: memoryview) -> int:
        return os.write(fd, view)

    return Output(
        fd,
        write,
        pollable=not stat.S_ISREG(mode),
        atomic_lines=stat.S_ISFIFO(mode),
        close=(lambda: os.close(fd)) if own else None,
    )


def open_stdout() -> Output:
    """A non-blocking way to write fd 1 that leaves fd 1's own file description alone.

    Raises OSError when there is no standard output: fd 1 closed when the process started
    (Python then has no sys.stdout, and fd 1 may since have been reused for anything)."""
    if sys.__stdout__ is None:
        raise OSError(errno.EBADF, "standard output is closed")
    mode = os.fstat(1).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)):
        raise OSError(errno.EINVAL, "standard output is not a file, pipe, terminal or socket")
    if stat.S_ISREG(mode):
        return _fd_output(1, own=False)
    if stat.S_ISSOCK(mode):
        sock = socket.socket(fileno=os.dup(1))  # a copy of the descriptor, still blocking

        def send(view: memoryview) -> int:
            return sock.send(view, socket.MSG_DONTWAIT)

        return Output(sock.fileno(), send, pollable=True, atomic_lines=False, close=sock.close)
    try:
        fd = os.open("/proc/self/fd/1", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        # No /proc (not Linux): the copy shares fd 1's description, so fd 1 turns non-blocking too.
        log.warning("standard output cannot be opened again (%s): making it non-blocking", exc.strerror)
        fd = os.dup(1)
        os.set_blocking(fd, False)
    return _fd_output(fd, own=True)


def open_file(path: str) -> Output:
    """`path` opened for appending (created 0644 less the umask). O_NONBLOCK matters only for a
    FIFO: its open fails with ENXIO rather than waiting for a reader."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    try:
        return _fd_output(fd, own=True)
    except OSError:
        os.close(fd)
        raise


class LineSink:
    """Newline-terminated lines to one destination, without ever waiting on it.

    `add()` takes lines during a loop iteration; they are written on the next. `accepting` is
    False while lines would only be dropped (stalled, reader gone, closed): callers check it
    to skip encoding. One sink per destination and event loop (see `Sinks`)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        destination: str | None,
        output: Output,
        limit: int,
        stall: float,
        *,
        opener: Callable[[str], Output] = open_file,
    ) -> None:
        self.loop = loop
        self.path = destination  # None: standard output
        self.name = destination or STDOUT
        self.output = output
        self.limit = limit
        self.stall = stall
        self.accepting = True
        self.refs = 0
        self._opener = opener
        self._batch: list[bytes] = []
        self._scheduled = False
        self._pending = bytearray()
        self._offset = 0  # bytes of `_pending` already written
        self._size = 0  # bytes buffered: unwritten pending bytes plus the batch
        self._mid_line = False  # the last write ended inside a line
        self._blocked_since: float | None = None  # pending bytes have waited since then
        self._stalled = False
        self._broken = False
        self._closed = False
        self._watching = False  # add_writer is registered
        self._retry: asyncio.TimerHandle | None = None
        self._report: asyncio.TimerHandle | None = None
        self._reported_at = -WARN_INTERVAL
        self._unreported = 0
        self._why = ""
        self._error_logged_at = -WARN_INTERVAL
        self.lines = 0  # taken into the buffer
        self.dropped_lines = 0
        self.write_errors = 0
        self.reopens = 0

    # --- taking lines (per request) ---------------------------------------------------------

    def add(self, line: bytes) -> None:
        """Buffer one line (ending in a newline); written on the next loop iteration."""
        size = self._size + len(line)
        if size > self.limit or not self.accepting:
            self.drop(1, f"more than {self.limit} bytes waiting for {self.name}" if self.accepting else self._why)
            return
        self._size = size
        self.lines += 1
        self._batch.append(line)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush)

    def drop(self, count: int, why: str | None = None) -> None:
        """Count lines that will never be written, and schedule the warning about them."""
        self.dropped_lines += count
        self._unreported += count
        if why:
            self._why = why
        if self._report is None and not self._closed:
            at = max(self.loop.time(), self._reported_at + WARN_INTERVAL)
            self._report = self.loop.call_at(at, self._warn)

    # --- writing ------------------------------------------------------------------------------

    def flush(self) -> None:
        """Move the batch into the pending buffer and write what the destination takes."""
        self._scheduled = False
        if self._batch:
            if self._offset == len(self._pending):
                self._blocked_since = None
            self._pending += b"".join(self._batch)
            self._batch.clear()
        if not self._closed:
            self._write()

    def _write(self) -> None:
        pending = self._pending
        output = self.output
        blocked = True  # EAGAIN (worth polling for) rather than another error (worth a timer)
        while self._offset < len(pending):
            start = self._offset
            end = len(pending)
            if output.atomic_lines and end - start > PIPE_BUF:
                cut = pending.rfind(b"\n", start, start + PIPE_BUF)
                if cut < 0:
                    cut = pending.find(b"\n", start)
                end = cut + 1 if cut >= 0 else end
            try:
                with memoryview(pending) as whole, whole[start:end] as view:
                    written = output.write(view)
            except BlockingIOError:
                break
            except BrokenPipeError:
                self._gone()
                return
            except OSError as exc:
                self.write_errors += 1
                now = self.loop.time()
                if now - self._error_logged_at >= WARN_INTERVAL:
                    self._error_logged_at = now
                    log.error("access log: cannot write to %s: %s", self.name, exc.strerror or exc)
                blocked = False
                break
            if written <= 0:
                break
            self._offset += written
            self._size -= written
            self._mid_line = pending[self._offset - 1] != 0x0A
            self._blocked_since = None
        if self._offset == len(pending):
            pending.clear()
            self._offset = 0
            if self._stalled:
                self._stalled = False
                self.accepting = not self._broken
                log.warning("access log: %s takes lines again", self.name)
            if not self._stalled:
                self._unwatch()
            return
        if self._offset > COMPACT and self._offset * 2 > len(pending):
            del pending[: self._offset]
            self._offset = 0
        now = self.loop.time()
        if self._blocked_since is None:
            self._blocked_since = now
        elif now - self._blocked_since >= self.stall and not self._stalled:
            self._stall()
        self._watch(blocked)

    def _watch(self, blocked: bool) -> None:
        """Get called back when the destination may take bytes again: by the loop when it is
        full (EAGAIN), by a timer after another error (a writable descriptor that fails would
        call back at once, forever) or when it cannot be polled."""
        if blocked and self.output.pollable:
            if self._watching:
                return
            try:
                self.loop.add_writer(self.output.fd, self._writable)
                self._watching = True
                return
            except (OSError, ValueError, NotImplementedError):
                self.output.pollable = False
        elif self._watching:
            self._watching = False
            with contextlib.suppress(OSError, ValueError):
                self.loop.remove_writer(self.output.fd)
        if self._retry is None:
            self._retry = self.loop.call_later(min(RETRY, self.stall), self._retry_now)

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            with contextlib.suppress(OSError, ValueError):
                self.loop.remove_writer(self.output.fd)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _writable(self) -> None:
        if not self._closed:
            self._write()

    def _retry_now(self) -> None:
        self._retry = None
        if self._closed:
            return
        if self._stalled and self._offset == len(self._pending):
            # Nothing left to try the destination with: take lines again and see.
            self._stalled = False
            self.accepting = not self._broken
            return
        self._write()

    # --- dropping -----------------------------------------------------------------------------

    def _discard_pending(self) -> None:
        """Drop the unwritten complete lines; the rest of a line cut by a partial write stays,
        so that the destination keeps receiving whole lines."""
        pending = self._pending
        start = self._offset
        if self._mid_line:
            end = pending.find(b"\n", start)
            start = end + 1 if end >= 0 else len(pending)
        dropped = pending.count(b"\n", start)
        self._size -= len(pending) - start
        del pending[start:]
        if dropped:
            self.drop(dropped)

    def _stall(self) -> None:
        self._stalled = True
        self.accepting = False
        self._why = f"{self.name} took nothing for {self.stall:g}s"
        log.warning("access log: %s took nothing for %gs: dropping lines until it takes some", self.name, self.stall)
        self._discard_pending()

    def _gone(self) -> None:
        """The reader closed its end: nothing written here can ever be read."""
        self._broken = True
        self.accepting = False
        self._why = f"the reader of {self.name} is gone"
        log.warning("access log: the reader of %s is gone (broken pipe): dropping lines", self.name)
        self._unwatch()
        self._mid_line = False
        self._discard_pending()

    def _warn(self) -> None:
        self._report = None
        if self._unreported:
            log.warning(
                "access log: %d lines dropped (%s); %d dropped since start",
                self._unreported,
                self._why,
                self.dropped_lines,
            )
            self._unreported = 0
            self._reported_at = self.loop.time()

    # --- lifecycle ----------------------------------------------------------------------------

    def reopen(self) -> bool:
        """Open the file again by its path (after a rotation renamed it). False for standard
        output, or when the path cannot be opened (the old file is kept, and the reason logged)."""
        if self.path is None or self._closed:
            return False
        try:
            output = self._opener(self.path)
        except OSError as exc:
            log.error("access log: cannot reopen %s: %s (still writing to the old file)", self.path, exc.strerror)
            return False
        self.flush()  # what the old file takes now goes to the old file
        self._unwatch()
        pending = self._pending
        if self._mid_line and self._offset < len(pending):
            # The rest of a line cut by a partial write would start the new file with garbage.
            end = pending.find(b"\n", self._offset)
            cut = end + 1 if end >= 0 else len(pending)
            self._size -= cut - self._offset
            self._offset = cut
            self.drop(1, f"a line cut by a failed write to the old {self.path}")
        self._mid_line = False
        old, self.output = self.output, output
        with contextlib.suppress(OSError):
            old.close()
        self.reopens += 1
        self._broken = self._stalled = False
        self._blocked_since = None
        self.accepting = True
        log.info("access log: reopened %s", self.path)
        self._write()
        return True

    async def close(self, wait: float = CLOSE_WAIT) -> None:
        """Write what is pending, waiting up to `wait` seconds for a slow reader; drop the rest."""
        if self._closed:
            return
        self.flush()
        deadline = self.loop.time() + wait
        while self._offset < len(self._pending) and not self._broken and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
            self.flush()
        self.flush()
        self._closed = True
        self.accepting = False
        self._unwatch()
        self._mid_line = False
        if self._offset < len(self._pending):
            self._why = f"{self.name} did not take them before the gateway stopped"
            self._discard_pending()
        if self._report is not None:
            self._report.cancel()
        self._report = None
        self._warn()
        with contextlib.suppress(OSError):
            self.output.close()

    def statistics(self) -> dict[str, Any]:
        return {
            "destination": self.name,
            "lines": self.lines,
            "dropped_lines": self.dropped_lines,
            "pending_bytes": self._size,
            "limit_bytes": self.limit,
            "stalled": self._stalled,
            "reader_gone": self._broken,
            "write_errors": self.write_errors,
            "reopens": self.reopens,
        }


class Sinks:
    """The open sinks of a process: one per (event loop, destination), shared by the snapshots
    that name it, so a reload keeps the same descriptor and buffer. Counted: the last snapshot
    to let go closes it."""

    def __init__(self, stdout: Callable[[], Output] = open_stdout, opener: Callable[[str], Output] = open_file) -> None:
        self._sinks: dict[tuple[asyncio.AbstractEventLoop, str | None], LineSink] = {}
        self._stdout = stdout
        self._opener = opener

    def acquire(self, destination: str | None, limit: int, stall: float) -> LineSink:
        """The sink for `destination` (None: standard output), opened if needed. Raises OSError."""
        loop = asyncio.get_running_loop()
        if destination is not None:
            destination = os.path.abspath(destination)
        key = (loop, destination)
        sink = self._sinks.get(key)
        if sink is None:
            output = self._stdout() if destination is None else self._opener(destination)
            sink = self._sinks[key] = LineSink(loop, destination, output, limit, stall, opener=self._opener)
        sink.limit, sink.stall = limit, stall  # the config applied last decides
        sink.refs += 1
        return sink

    async def release(self, sink: LineSink) -> None:
        sink.refs -= 1
        if sink.refs > 0:
            return
        key = (sink.loop, sink.path)
        if self._sinks.get(key) is sink:
            del self._sinks[key]
        await sink.close()

    def reopen(self, loop: asyncio.AbstractEventLoop) -> list[str]:
        """Reopen every file sink of `loop` (SIGUSR1); the paths that were reopened."""
        return [sink.name for (owner, _), sink in list(self._sinks.items()) if owner is loop and sink.reopen()]

    def open_sinks(self) -> list[LineSink]:
        return list(self._sinks.values())


SINKS = Sinks()
