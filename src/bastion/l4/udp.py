"""`protocol: udp` listeners: datagrams relayed to a target of `upstream`, one session per client.

The listener owns one datagram socket on its bind address. The first datagram from a client
address (IP and port) opens a session: the upstream's balancer picks a target (the key is
the client IP, so `consistent_hash` on ip keeps a client on its target) and the session
opens a connected UDP socket to it. Datagrams from the client go out on that socket; what
the target sends back on it goes to the client from the listener's own socket, so replies
come from the address the client sent to. The kernel filters the connected socket: only
the target can answer the session.

Sessions live in an LRU table (an OrderedDict moved on every datagram, either way):
- `udp.session_idle` without a datagram either way ends a session (the gateway's sweep, once
  a second); the client's next datagram opens a new one, which may pick another target;
- at `udp.max_sessions` a new client evicts the least recently active session, as a
  connection-tracking table does (new clients are never refused; counted as evicted);
- a session keeps its target while it is available. The sweep moves sessions off a target
  that active checks marked down, that passive health ejected, that an admin drained, or
  that a reload removed from the upstream; a reload otherwise leaves sessions on their
  targets until they go idle;
- ICMP port unreachable from the target (ConnectionRefusedError on the connected socket)
  counts as a failed try for passive health and moves the session to another target at once.

With `send_proxy_protocol: v2` on the upstream each datagram to a target starts with a PROXY
v2 header (DGRAM) naming the client and the listener's address, as HAProxy sends it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any, Protocol

from bastion.config.build import Snapshot
from bastion.config.schema import Listener, ListenerUdp
from bastion.errors import NoHealthyTarget, UpstreamConnectError
from bastion.l4.connect import pick_key
from bastion.net.proxy_protocol import encode_v2
from bastion.observability.metrics import Metrics, UdpStats
from bastion.upstream.runtime import UpstreamRuntime
from bastion.upstream.targets import TargetState

log = logging.getLogger("bastion.udp")

PENDING_MAX = 64  # datagrams a session holds while its socket to the target opens
DEFAULTS = ListenerUdp()

Address = tuple[Any, ...]  # (host, port) or, for IPv6, (host, port, flowinfo, scope)


class UdpHost(Protocol):
    """What a udp listener needs from the gateway (app.Gateway)."""

    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def metrics(self) -> Metrics: ...


class Session:
    """One client address and the target its datagrams go to."""

    __slots__ = (
        "client",
        "upstream",
        "target",
        "transport",
        "pending",
        "last",
        "header",
        "closed",
        "task",
        "started",
        "counts",
    )

    def __init__(self, client: Address, upstream: UpstreamRuntime, target: TargetState, now: float) -> None:
        self.client = client
        self.upstream = upstream
        self.target = target
        self.transport: asyncio.DatagramTransport | None = None  # None while the socket opens
        self.pending: list[bytes] = []
        self.last = now
        self.header = b""  # the PROXY v2 header that starts every datagram to the target, if any
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.started = now
        self.counts = [0, 0, 0, 0]  # datagrams in, datagrams out, bytes in, bytes out (for its log line)


class _TargetSide(asyncio.DatagramProtocol):
    """The session's connected socket toward its target."""

    def __init__(self, listener: UdpListener, session: Session) -> None:
        self.listener = listener
        self.session = session

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.listener.reply(self.session, data)

    def error_received(self, exc: Exception) -> None:
        self.listener.target_error(self.session, exc)


class UdpListener(asyncio.DatagramProtocol):
    def __init__(self, host: UdpHost, listener: Listener, stats: UdpStats) -> None:
        self.host = host
        self.stats = stats
        self.sessions: OrderedDict[Address, Session] = OrderedDict()
        self.transport: asyncio.DatagramTransport | None = None
        self.local: tuple[str, int] = ("0.0.0.0", 0)
        self.loop = asyncio.get_running_loop()
        self._checked: UpstreamRuntime | None = None  # the upstream the last full sweep saw
        self.update(listener)

    def update(self, listener: Listener) -> None:
        """Settings of the running config (a reload calls it again)."""
        assert listener.upstream is not None  # the config requires it on udp listeners
        self.settings = listener
        self.upstream_name = listener.upstream
        udp = listener.udp or DEFAULTS
        self.idle = udp.session_idle
        self.max_sessions = udp.max_sessions
        self.max_datagram = udp.max_datagram

    async def start(self, reuse_port: bool = False) -> None:
        bind = self.settings.bind
        await self.loop.create_datagram_endpoint(
            lambda: self, local_addr=(bind.host, bind.port), reuse_port=reuse_port or None
        )

    # --- the listener's socket -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sockname = transport.get_extra_info("sockname")
        self.local = (str(sockname[0]), int(sockname[1]))

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if len(data) > self.max_datagram:
            self.stats.drop("too_big")
            return
        now = self.loop.time()
        session = self.sessions.get(addr)
        if session is None:
            session = self._open(addr, now)
            if session is None:
                return
        else:
            self.sessions.move_to_end(addr)
            session.last = now
        transport = session.transport
        if transport is None:
            if len(session.pending) < PENDING_MAX:
                session.pending.append(data)
            else:
                self.stats.drop("pending_full")
            return
        self._send(session, transport, data)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp listener %s: %s", self.settings.name, exc)

    def _send(self, session: Session, transport: asyncio.DatagramTransport, data: bytes) -> None:
        stats = self.stats
        stats.datagrams[0] += 1
        stats.bytes[0] += len(data)
        counts = session.counts
        counts[0] += 1
        counts[2] += len(data)
        transport.sendto(session.header + data if session.header else data)

    # --- the target's side -----------------------------------------------------------------

    def reply(self, session: Session, data: bytes) -> None:
        """A datagram from the session's target: to the client, from the listener's address."""
        if session.closed or self.transport is None:
            return
        if len(data) > self.max_datagram:
            self.stats.drop("too_big")
            return
        session.last = self.loop.time()
        if self.sessions.get(session.client) is session:
            self.sessions.move_to_end(session.client)
        stats = self.stats
        stats.datagrams[1] += 1
        stats.bytes[1] += len(data)
        counts = session.counts
        counts[1] += 1
        counts[3] += len(data)
        self.transport.sendto(data, session.client)

    def target_error(self, session: Session, exc: Exception) -> None:
        if session.closed:
            return
        if not isinstance(exc, ConnectionRefusedError):
            log.debug("udp listener %s: target %s: %s", self.settings.name, session.target.name, exc)
            return
        failed = session.target
        session.upstream.report_failure(failed, UpstreamConnectError(f"{failed.name}: port unreachable"))
        self._repick(session, [failed])

    # --- sessions --------------------------------------------------------------------------

    def _open(self, client: Address, now: float) -> Session | None:
        upstream = self.host.snapshot.upstreams.get(self.upstream_name)
        if upstream is None:  # pragma: no cover - the config check makes sure it exists
            self.stats.drop("no_target")
            return None
        target = self._pick(upstream, client, [])
        if target is None:
            self.stats.drop("no_target")
            return None
        if len(self.sessions) >= self.max_sessions:
            _, oldest = self.sessions.popitem(last=False)
            self._close(oldest, "evicted")
            self.stats.evicted += 1
        session = Session(client, upstream, target, now)
        self.sessions[client] = session
        self.stats.sessions += 1
        self.stats.sessions_active += 1
        self._connect(session)
        return session

    def _pick(self, upstream: UpstreamRuntime, client: Address, exclude: list[TargetState]) -> TargetState | None:
        """A target for a session, taking its place (`in_flight`); None when none is available.
        Targets at the upstream's max_connections (sessions) are skipped."""
        cap = upstream.config.max_connections
        full = [t for t in upstream.targets if t.in_flight >= cap and t not in exclude]
        try:
            target = upstream.pick(pick_key(str(client[0]), upstream), [*exclude, *full])
        except NoHealthyTarget:
            return None
        target.in_flight += 1
        target.requests += 1
        return target

    def _connect(self, session: Session) -> None:
        session.task = self.loop.create_task(self._open_socket(session))

    async def _open_socket(self, session: Session) -> None:
        target = session.target
        address = target.address
        try:
            transport, _ = await self.loop.create_datagram_endpoint(
                lambda: _TargetSide(self, session), remote_addr=(address.host, address.port)
            )
        except OSError as exc:
            if not session.closed and session.target is target:
                session.upstream.report_failure(target, UpstreamConnectError(f"{target.name}: {exc}"))
                self._repick(session, [target])
            return
        if session.closed or session.target is not target:
            transport.close()
            return
        session.transport = transport
        if session.upstream.config.send_proxy_protocol == "v2":
            session.header = encode_v2((str(session.client[0]), int(session.client[1])), self.local, datagram=True)
        pending, session.pending = session.pending, []
        for data in pending:
            self._send(session, transport, data)

    def _repick(self, session: Session, exclude: list[TargetState], upstream: UpstreamRuntime | None = None) -> None:
        """Move a session to another target (its datagrams in flight are lost, as UDP may)."""
        self._release(session)
        upstream = upstream or session.upstream
        target = self._pick(upstream, session.client, exclude)
        if target is None:
            self._close(session, "no_target", released=True)
            if self.sessions.get(session.client) is session:
                del self.sessions[session.client]
            return
        session.upstream = upstream
        session.target = target
        session.header = b""
        self._connect(session)

    def _release(self, session: Session) -> None:
        if session.transport is not None:
            session.transport.close()
            session.transport = None
        session.target.in_flight -= 1

    def _close(self, session: Session, reason: str, released: bool = False) -> None:
        if session.closed:
            return
        session.closed = True
        if not released:
            self._release(session)
        session.pending.clear()
        self.stats.sessions_active -= 1
        access_log = self.host.snapshot.access_log
        if access_log is not None:
            counts = session.counts
            access_log.write(
                {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "listener": self.settings.name,
                    "protocol": "udp",
                    "client": str(session.client[0]),
                    "client_port": int(session.client[1]),
                    "upstream": session.upstream.name,
                    "target": session.target.name,
                    "datagrams_in": counts[0],
                    "datagrams_out": counts[1],
                    "bytes_in": counts[2],
                    "bytes_out": counts[3],
                    "duration_ms": round((self.loop.time() - session.started) * 1000, 3),
                    "close_reason": reason,
                }
            )

    def sweep(self, now: float) -> None:
        """End idle sessions; move those whose target is no longer available or no longer
        in the upstream (a reload) to another. Called about once a second.

        The table is in order of last activity, so expiry stops at the first live session;
        the other checks walk the table only after a reload or while a target is down."""
        expired = []
        for client, session in self.sessions.items():
            if now - session.last < self.idle:
                break
            expired.append(client)
        for client in expired:
            self._close(self.sessions.pop(client), "idle_timeout")
        upstream = self.host.snapshot.upstreams.get(self.upstream_name)
        if upstream is None:  # pragma: no cover - the config check makes sure it exists
            return
        health_now = upstream.clock()  # the clock ejections use
        if upstream is self._checked and all(target.available(health_now) for target in upstream.targets):
            return
        self._checked = upstream
        keys = {target.key for target in upstream.targets}
        for session in list(self.sessions.values()):
            target = session.target
            if target.key not in keys:
                self._repick(session, [], upstream)
            elif not target.available(health_now):
                self._repick(session, [target], upstream)
            elif session.upstream is not upstream:
                session.upstream = upstream  # same target in the new config: keep it

    def close(self, reason: str = "shutdown") -> None:
        """Stop receiving and end every session (drain, or the listener left the config)."""
        if self.transport is not None:
            self.transport.close()
        for session in self.sessions.values():
            self._close(session, reason)
        self.sessions.clear()

    def statistics(self) -> dict[str, Any]:
        return {"listener": self.settings.name, "sessions": len(self.sessions), **self.stats.export()}
