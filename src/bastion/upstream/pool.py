"""Keep-alive connections to one target, with a cap on how many are open and a bounded queue.
Connections are seen through `PooledConnection` (http/streams.py): `is_available()` says
whether one can take a request now.

Bookkeeping is synchronous (which idle connection to reuse, whether one may be opened, who
is next in the queue); only opening a connection and waiting in the queue await. Idle
connections are reused last-in first-out, so a burst's extra connections age out instead of
being kept warm by round-robin reuse. Expired idle connections are dropped when met and by
`sweep`, which the gateway calls periodically.

When `max_connections` are open and none is idle, a request may wait in a FIFO queue whose
size and timeout are the upstream's (`WaitQueue`, shared by the upstream's pools). A freed
slot is handed to the first waiter directly: a released connection as is, a closed one as a
reserved slot (already counted in `open`) to connect with. A waiter that gives up for any
reason (timeout, cancellation) leaves the queue, and passes on whatever it was handed in the
meantime, so no slot is ever lost. Over the queue's size, or with no queue, `Overloaded` is
raised at once: a fast 503 instead of a pile-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from bastion.config.types import HostPort
from bastion.errors import Overloaded, UpstreamConnectError, UpstreamConnectTimeout
from bastion.upstream.conn import UpstreamConnection

if TYPE_CHECKING:
    from bastion.net.tls import ClientTls


T = TypeVar("T")


class PoolLimits:
    __slots__ = ("max_connections", "max_idle", "idle_timeout", "connect_timeout")

    def __init__(self, max_connections: int, max_idle: int, idle_timeout: float, connect_timeout: float) -> None:
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout


class WaitQueue:
    """An upstream's queue bound: how many requests may wait for a slot, and for how long."""

    __slots__ = ("size", "timeout", "waiting", "timeouts", "rejected")

    def __init__(self, size: int = 0, timeout: float = 1.0) -> None:
        self.size = size
        self.timeout = timeout
        self.waiting = 0
        self.timeouts = 0
        self.rejected = 0

    def statistics(self) -> dict[str, Any]:
        return {"size": self.size, "waiting": self.waiting, "timeouts": self.timeouts, "rejected": self.rejected}

    async def wait(self, waiters: deque[asyncio.Future[T]], give_back: Callable[[T], None], limit: str) -> T:
        """Wait in a pool's FIFO `waiters` for what the pool hands over (Overloaded when the
        queue is full or the wait times out). A waiter that gives up for any reason leaves the
        queue and passes whatever it was handed in the meantime to `give_back`, so no slot is
        ever lost. `limit` names what is full, for the timeout's message."""
        if self.waiting >= self.size:
            self.rejected += 1
            raise Overloaded()
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        self.waiting += 1
        try:
            async with asyncio.timeout(self.timeout):
                return await waiter
        except BaseException as exc:
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)
            if waiter.done() and not waiter.cancelled():
                give_back(waiter.result())
            elif not waiter.done():
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                self.timeouts += 1
                raise Overloaded(f"The upstream is at its {limit} limit and the queue wait timed out.") from None
            raise
        finally:
            self.waiting -= 1


# What a waiter is handed: a connection to use, or None for a reserved slot to connect with.
_Grant = UpstreamConnection | None


class ConnectionPool:
    def __init__(self, address: HostPort, limits: PoolLimits, queue: WaitQueue | None = None) -> None:
        self.address = address
        self.limits = limits
        self.queue = queue if queue is not None else WaitQueue()
        self.idle: list[UpstreamConnection] = []
        self.open = 0  # connected or connecting (reserved slots included)
        self.opened_total = 0
        self.waiters: deque[asyncio.Future[_Grant]] = deque()
        self._closing = False
        self.tls: ClientTls | None = None
        self.epoch = 0  # bumped when the TLS settings change: older connections are not reused

    def set_tls(self, tls: ClientTls | None) -> None:
        """Connect with these TLS settings from now on; connections made under others are
        closed when idle or released (a reload may turn TLS on, or change the CA)."""
        if (self.tls.key if self.tls else None) == (tls.key if tls else None):
            self.tls = tls
            return
        self.tls = tls
        self.epoch += 1
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    def saturated(self) -> bool:
        """Would a request have to queue here now?"""
        return self.open >= self.limits.max_connections and not self.idle

    def take_idle(self) -> UpstreamConnection | None:
        """A live idle connection, newest first, or None."""
        idle = self.idle
        if not idle:
            return None
        deadline = asyncio.get_running_loop().time() - self.limits.idle_timeout
        while idle:
            conn = idle.pop()
            if conn.is_available() and conn.idle_since >= deadline:
                return conn
            conn.close()
        return None

    async def acquire(self) -> UpstreamConnection:
        """An idle connection, a new one, or one after waiting in the queue.

        Raises Overloaded (no slot and the queue is full or timed out) or a connect error.
        """
        if not self.waiters:
            conn = self.take_idle()
            if conn is not None:
                return conn
            if self.open < self.limits.max_connections:
                return await self.connect()
        grant = await self.queue.wait(self.waiters, self._give_back, "connection")
        if grant is None:
            return await self.connect(reserved=True)
        return grant

    def _give_back(self, grant: _Grant) -> None:
        """What a waiter that gave up had been handed goes to the next one."""
        if grant is None:
            self.open -= 1
            self._slot_freed()
        else:
            self._reuse(grant)

    async def connect(self, reserved: bool = False) -> UpstreamConnection:
        """Open a new connection (counted against the limit while it connects)."""
        if not reserved:
            self.open += 1
        counted = True
        loop = asyncio.get_running_loop()
        host, port = self.address
        tls = self.tls
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                if tls is None:
                    _, conn = await loop.create_connection(lambda: UpstreamConnection(self.connection_lost), host, port)
                else:
                    _, conn = await loop.create_connection(
                        lambda: UpstreamConnection(self.connection_lost),
                        host,
                        port,
                        ssl=tls.context,
                        server_hostname=tls.server_hostname(host),
                    )
        except TimeoutError:
            raise UpstreamConnectTimeout() from None
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamConnectError(
                f"The upstream's TLS certificate did not verify ({exc.verify_message})."
            ) from None
        except ssl.SSLError as exc:
            raise UpstreamConnectError(f"The TLS handshake with the upstream failed ({exc.reason or exc}).") from None
        except OSError as exc:
            raise UpstreamConnectError(f"The upstream refused the connection ({exc.strerror or exc}).") from None
        else:
            counted = False
            self.opened_total += 1
            conn.epoch = self.epoch
            return conn
        finally:
            if counted:
                self.open -= 1
                self._slot_freed()

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Give a connection back after an exchange; close it unless it can serve again."""
        conn.detach()
        if not reusable or not conn.is_available() or self._closing or conn.epoch != self.epoch:
            conn.close()  # connection_lost frees the slot for a waiter
            return
        self._reuse(conn)

    def _reuse(self, conn: UpstreamConnection) -> None:
        """A connection that can serve again: to the first waiter, else to the idle list."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if conn.closed:
            return
        if len(self.idle) >= self.limits.max_idle:
            conn.close()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self.idle.append(conn)

    def _slot_freed(self) -> None:
        """One fewer connection is open: let the first waiter open one in its place."""
        waiters = self.waiters
        while waiters and self.open < self.limits.max_connections:
            waiter = waiters.popleft()
            if not waiter.done():
                self.open += 1  # reserved for the waiter, which connects with reserved=True
                waiter.set_result(None)
                return

    def connection_lost(self, conn: UpstreamConnection) -> None:
        self.open -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        if self.waiters:
            self._slot_freed()

    def sweep(self, now: float) -> None:
        """Close idle connections past their idle timeout."""
        deadline = now - self.limits.idle_timeout
        if self.idle and self.idle[0].idle_since < deadline:
            keep = [c for c in self.idle if c.idle_since >= deadline and not c.closed]
            for conn in self.idle:
                if conn.idle_since < deadline:
                    conn.close()
            self.idle = keep

    def close(self) -> None:
        """Close idle connections now; busy ones close when their exchange releases them."""
        self._closing = True
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    def statistics(self) -> dict[str, Any]:
        return {
            "open": self.open,
            "idle": len(self.idle),
            "waiting": len(self.waiters),
            "opened_total": self.opened_total,
        }
