"""HTTP/2 connections to one target, shared by many requests at once (multiplexed streams).

The same surface as `ConnectionPool` (upstream/pool.py), so the exchange, the balancers and
the gateway's sweeps use either without knowing which: `acquire()` gives what a request is
sent on (here a new `H2Stream`), `release()` gives it back, `saturated()` says a request
would have to queue, `sweep()` closes idle connections.

Rules:

- a connection is reused while it has stream room: the target's
  SETTINGS_MAX_CONCURRENT_STREAMS, capped by ours (`OWN_MAX_STREAMS`); the oldest connection
  with room is used first, so extra ones opened by a burst go idle and age out;
- a new connection is opened only when every one is full (up to `max_connections`), and a
  connection being opened is waited for (until its SETTINGS arrive) instead of opening one
  per concurrent first request;
- after GOAWAY a connection takes no new stream; it closes when its last stream ends;
- with every connection full and `max_connections` open, a request waits in the
  upstream's queue (`WaitQueue`) for a stream slot, or gets `Overloaded` at once;
- a connection without streams for the upstream's idle timeout is closed by `sweep`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import TYPE_CHECKING, Any

from bastion.config.types import HostPort
from bastion.errors import GatewayError, UpstreamConnectError, UpstreamConnectTimeout
from bastion.proto.h2_client import H2ClientConnection, H2Stream
from bastion.upstream.conn import UpstreamConnection
from bastion.upstream.pool import PoolLimits, WaitQueue

if TYPE_CHECKING:
    from bastion.net.tls import ClientTls


class H2Pool:
    def __init__(self, address: HostPort, limits: PoolLimits, queue: WaitQueue | None = None) -> None:
        self.address = address
        self.limits = limits
        self.queue = queue if queue is not None else WaitQueue()
        self.conns: list[H2ClientConnection] = []  # connected or connecting, oldest first
        self.opened_total = 0
        self.goaways = 0  # connections the target ended with GOAWAY
        self.replayed = 0  # refused streams sent again
        self.waiters: deque[asyncio.Future[H2ClientConnection | None]] = deque()
        self.tls: ClientTls | None = None
        self.epoch = 0  # bumped when the TLS settings change: older connections take no new stream
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def open(self) -> int:
        return len(self.conns)

    def set_tls(self, tls: ClientTls | None) -> None:
        """Connect with these TLS settings from now on; older connections finish their streams."""
        if (self.tls.key if self.tls else None) == (tls.key if tls else None):
            self.tls = tls
            return
        self.tls = tls
        self.epoch += 1
        for conn in list(self.conns):
            if conn.ready.done() and not conn.in_use():
                conn.close()

    def saturated(self) -> bool:
        """Would a request have to queue here now?"""
        if len(self.conns) < self.limits.max_connections:
            return False
        return not any(conn.is_available() or not conn.ready.done() for conn in self.conns)

    async def acquire(self) -> H2Stream:
        """A new stream on a connection with room, a new connection, or after a queue wait.

        Raises Overloaded (no room and the queue is full or timed out) or a connect error."""
        conn = await self.reserve()
        return H2Stream(conn, self._reserve_again)

    async def _reserve_again(self) -> H2ClientConnection:
        """A slot for a stream the target refused (sent again: counted)."""
        self.replayed += 1
        return await self.reserve()

    def release(self, stream: H2Stream | UpstreamConnection, reusable: bool) -> None:
        """The exchange is done with a stream (a failed stream does not condemn its connection:
        the connection's own errors close it)."""
        if isinstance(stream, H2Stream):
            stream.release()
        else:
            stream.close()  # not ours (the upstream changed protocol under a request)

    async def reserve(self) -> H2ClientConnection:
        """A ready connection with one stream slot reserved for the caller."""
        may_skip_queue = False
        opened = 0
        while True:
            if may_skip_queue or not self.waiters:
                conn = self._with_room()
                if conn is not None:
                    conn.reserved += 1
                    return conn
                opening = self._opening()
                if opening is None and len(self.conns) < self.limits.max_connections:
                    opened += 1
                    if opened > 3:  # each new connection went away or was full at once
                        raise UpstreamConnectError("The upstream's new HTTP/2 connections took no stream.")
                    opening = self._start_connection()
                if opening is not None:
                    await asyncio.shield(opening.ready)  # raises the connect error
                    continue
            granted = await self.queue.wait(self.waiters, self._give_back, "stream")
            if granted is not None:
                return granted
            may_skip_queue = True  # a connection closed: its slot is ours to open

    def _with_room(self) -> H2ClientConnection | None:
        epoch = self.epoch
        for conn in self.conns:
            if conn.epoch == epoch and conn.is_available():
                return conn
        return None

    def _opening(self) -> H2ClientConnection | None:
        """A connection still being opened (its room unknown until its SETTINGS)."""
        for conn in self.conns:
            if not conn.ready.done() and conn.epoch == self.epoch:
                return conn
        return None

    def _start_connection(self) -> H2ClientConnection:
        tls = self.tls
        conn = H2ClientConnection(
            self.connection_lost, self._capacity, b"https" if tls is not None else b"http", tls is not None
        )
        conn.epoch = self.epoch
        self.conns.append(conn)
        task = asyncio.get_running_loop().create_task(self._open(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return conn

    async def _open(self, conn: H2ClientConnection) -> None:
        """Connect (TLS and ALPN when set) and wait for the target's SETTINGS, within the
        connect timeout; a failure is set on `conn.ready` for everyone waiting on it."""
        loop = asyncio.get_running_loop()
        host, port = self.address
        tls = self.tls
        error: GatewayError
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                if tls is None:
                    await loop.create_connection(lambda: conn, host, port)
                else:
                    await loop.create_connection(
                        lambda: conn, host, port, ssl=tls.context, server_hostname=tls.server_hostname(host)
                    )
                await asyncio.shield(conn.ready)
        except TimeoutError:
            error = UpstreamConnectTimeout()
        except ssl.SSLCertVerificationError as exc:
            error = UpstreamConnectError(f"The upstream's TLS certificate did not verify ({exc.verify_message}).")
        except ssl.SSLError as exc:
            error = UpstreamConnectError(f"The TLS handshake with the upstream failed ({exc.reason or exc}).")
        except OSError as exc:
            error = UpstreamConnectError(f"The upstream refused the connection ({exc.strerror or exc}).")
        except GatewayError as exc:
            error = exc
        else:
            self.opened_total += 1
            conn.idle_since = loop.time()
            return
        conn.abort(error)
        self._drop(conn)

    def _drop(self, conn: H2ClientConnection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
            self._slot_freed()

    def _slot_freed(self) -> None:
        """One fewer connection: the first waiter may open one."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _capacity(self, conn: H2ClientConnection) -> None:
        """A stream slot freed on `conn` (or the target allowed more): hand it to a waiter."""
        waiters = self.waiters
        while waiters and conn.is_available() and conn.epoch == self.epoch:
            waiter = waiters.popleft()
            if not waiter.done():
                conn.reserved += 1
                waiter.set_result(conn)
        # Idle after serving (not a new connection whose first requests are still on their way).
        if conn.served and not conn.in_use() and (self._closing or conn.epoch != self.epoch or self._too_many_idle()):
            conn.close()

    def _too_many_idle(self) -> bool:
        return sum(1 for conn in self.conns if conn.ready.done() and not conn.in_use()) > self.limits.max_idle

    def _give_back(self, granted: H2ClientConnection | None) -> None:
        """What a waiter that gave up had been handed goes to the next one."""
        if granted is None:
            self._slot_freed()
        else:
            granted.reserved -= 1
            self._capacity(granted)

    def connection_lost(self, conn: H2ClientConnection) -> None:
        if conn.goaway:
            self.goaways += 1
        self._drop(conn)

    def sweep(self, now: float) -> None:
        """Close connections without streams past the idle timeout."""
        deadline = now - self.limits.idle_timeout
        for conn in list(self.conns):
            if conn.ready.done() and not conn.in_use() and conn.idle_since < deadline:
                conn.close()

    def close(self) -> None:
        """Close idle connections now; busy ones close when their last stream ends."""
        self._closing = True
        for conn in list(self.conns):
            if conn.ready.done() and not conn.in_use():
                conn.close()

    def statistics(self) -> dict[str, Any]:
        return {
            "open": len(self.conns),
            "idle": sum(1 for conn in self.conns if conn.ready.done() and not conn.in_use()),
            "waiting": len(self.waiters),
            "opened_total": self.opened_total,
            "streams": sum(len(conn.streams) for conn in self.conns),
            "goaways": self.goaways,
            "streams_replayed": self.replayed,
        }
