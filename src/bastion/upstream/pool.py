"""Keep-alive connections to one target, with a cap on how many are open.

Bookkeeping is synchronous (which idle connection to reuse, whether one may be opened);
only opening a connection awaits. Idle connections are reused last-in first-out, so a
burst's extra connections age out instead of being kept warm by round-robin reuse. Expired
idle connections are dropped when met and by `sweep`, which the gateway calls periodically.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bastion.config.types import HostPort
from bastion.errors import Overloaded, UpstreamConnectError, UpstreamConnectTimeout
from bastion.upstream.conn import UpstreamConnection


class PoolLimits:
    __slots__ = ("max_connections", "max_idle", "idle_timeout", "connect_timeout")

    def __init__(self, max_connections: int, max_idle: int, idle_timeout: float, connect_timeout: float) -> None:
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout


class ConnectionPool:
    def __init__(self, address: HostPort, limits: PoolLimits) -> None:
        self.address = address
        self.limits = limits
        self.idle: list[UpstreamConnection] = []
        self.open = 0  # connected or connecting
        self.opened_total = 0
        self._closing = False

    def take_idle(self) -> UpstreamConnection | None:
        """A live idle connection, newest first, or None."""
        idle = self.idle
        if not idle:
            return None
        deadline = asyncio.get_running_loop().time() - self.limits.idle_timeout
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since >= deadline:
                return conn
            conn.close()
        return None

    async def acquire(self) -> UpstreamConnection:
        """An idle connection or a new one. Raises Overloaded or an upstream connect error."""
        conn = self.take_idle()
        if conn is not None:
            return conn
        if self.open >= self.limits.max_connections:
            raise Overloaded()
        return await self.connect()

    async def connect(self) -> UpstreamConnection:
        """Open a new connection (counted against the limit while it connects)."""
        self.open += 1
        counted = True
        loop = asyncio.get_running_loop()
        host, port = self.address
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                _, conn = await loop.create_connection(lambda: UpstreamConnection(self), host, port)
        except TimeoutError:
            raise UpstreamConnectTimeout() from None
        except OSError as exc:
            raise UpstreamConnectError(f"The upstream refused the connection ({exc.strerror or exc}).") from None
        except BaseException:
            raise
        else:
            counted = False
            self.opened_total += 1
            return conn
        finally:
            if counted:
                self.open -= 1

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Give a connection back after an exchange; close it unless it can serve again."""
        conn.detach()
        if not reusable or conn.closed or self._closing or len(self.idle) >= self.limits.max_idle:
            conn.close()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self.idle.append(conn)

    def connection_lost(self, conn: UpstreamConnection) -> None:
        self.open -= 1
        if conn in self.idle:
            self.idle.remove(conn)

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
        return {"open": self.open, "idle": len(self.idle), "opened_total": self.opened_total}
