"""One client connection of an L4 listener: admitted, connected to a target, relayed, logged.

`L4Connection` is the client transport's protocol until the relay (net/relay.py) takes both
transports over; subclasses say when to connect and to which upstream (`TcpProxy` at once,
`PassthroughProxy` once the ClientHello is read). Bytes read before that are kept and go to
the target first; the target's first bytes, read before the relay starts, are kept by
`_UpstreamHold` and go to the client first. Reading is paused while connecting, so a
client cannot make the gateway hold more than one read.

The connection keeps the snapshot it was accepted under: a reload changes nothing for it
(its upstream runtime, idle timeout and access log stay), only for connections accepted
afterwards. It sits in the gateway's `connections` while open, so a shutdown waits for it
up to the drain timeout and then aborts it (`close_reason` shutdown).

When it ends, exactly once (`_finish`): the target's `in_flight` and the listener's count
are given back, the metrics counted and one access log line written with the bytes each
way, the duration, the target and why it closed.

With `send_proxy_protocol` on the upstream, a PROXY protocol header naming the client goes
to the target before any of the client's bytes (not counted in `bytes_in`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol, cast

from bastion.errors import GatewayError, NoHealthyTarget, Overloaded
from bastion.l4.connect import connect_target
from bastion.net.proxy_protocol import encode_v1, encode_v2, encode_v2_local
from bastion.net.relay import Relay, RelayStats

if TYPE_CHECKING:
    from bastion.config.build import Snapshot
    from bastion.config.schema import Listener
    from bastion.l4.sni import SniTable
    from bastion.observability.metrics import Metrics
    from bastion.upstream.targets import TargetState

log = logging.getLogger("bastion.l4")

HOLD_LIMIT = 64 * 1024  # bytes a target may send before the relay starts; then its reading pauses


class L4Host(Protocol):
    """What L4 connections need from the gateway (app.Gateway)."""

    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def connections(self) -> set[Any]: ...

    @property
    def metrics(self) -> Metrics: ...


class Hub(Protocol):
    """The listener side a connection reports to (l4/listener.py `L4Hub`)."""

    @property
    def host(self) -> L4Host: ...

    def admit(self, conn: L4Connection) -> bool: ...

    def release(self, conn: L4Connection) -> None: ...

    def sni_table(self, listener: Listener) -> SniTable: ...


class _UpstreamHold(asyncio.Protocol):
    """The target's protocol between connect and relay: keeps what it says meanwhile."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending = bytearray()
        self.eof = False
        self.write_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.pending += data
        if len(self.pending) > HOLD_LIMIT and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False


class L4Connection(asyncio.Protocol):
    """Base of the L4 client protocols; see the module docstring."""

    proxied_peer: tuple[str, int] | None = None
    """Set by a PROXY protocol reader before `connection_made`: the client behind the balancer."""

    kind = "tcp"

    def __init__(self, hub: Hub, listener: Listener) -> None:
        self.hub = hub
        self.settings = listener  # the gateway's connection count reads `settings.name`
        self.snapshot: Snapshot = hub.host.snapshot
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.client_port = 0
        self.pending = bytearray()  # read from the client before the relay
        self.client_eof = False
        self.write_paused = False
        self.relay: Relay | None = None
        self.task: asyncio.Task[None] | None = None
        self.target: TargetState | None = None
        self.upstream_name: str | None = None
        self.sni: str | None = None
        self.deadline = 0.0  # a read deadline before the relay (the hello); 0: none
        self.started = 0.0
        self.counted = False  # holds a place in the listener's max_connections
        self.done = False

    # --- asyncio.Protocol, until the relay takes the transport ----------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.started = self.loop.time()
        peer = self.proxied_peer or transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client_ip, self.client_port = str(peer[0]), int(peer[1])
        if not self.hub.admit(self):
            self.transport.close()
            self._finish(
                "over_limit", 0, 0, f"listener at limits.max_connections {self.settings.limits.max_connections}"
            )
            return
        self.hub.host.connections.add(self)
        self.begin()

    def begin(self) -> None:
        """The connection is admitted: start reading or connecting."""
        raise NotImplementedError

    def data_received(self, data: bytes) -> None:
        self.pending += data
        if len(self.pending) > HOLD_LIMIT and self.transport is not None:
            self.transport.pause_reading()  # the relay resumes it

    def eof_received(self) -> bool:
        self.client_eof = True
        return True  # half-closed: the relay passes the EOF on once it runs

    def connection_lost(self, exc: Exception | None) -> None:
        if self.relay is None and not self.done:
            if self.task is not None:
                self.task.cancel()
            self._finish("client_closed" if exc is None else "error", len(self.pending), 0, repr(exc) if exc else None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False

    # --- connecting and relaying ----------------------------------------------------------------

    def connect(self, upstream_name: str) -> None:
        """Pick a target of `upstream_name` and relay to it. What the client sends meanwhile is
        kept, up to HOLD_LIMIT; then its reading pauses until the relay starts. (Not pausing
        at once saves two system calls per connection, for the usual few bytes.)"""
        self.upstream_name = upstream_name
        self.deadline = 0.0
        self.task = self.loop.create_task(self._connect(upstream_name))

    async def _connect(self, upstream_name: str) -> None:
        upstream = self.snapshot.upstreams[upstream_name]
        try:
            target, transport, protocol = await connect_target(self.loop, upstream, self.client_ip, _UpstreamHold)
        except NoHealthyTarget as exc:
            self.refuse("no_target", exc.message)
            return
        except Overloaded as exc:
            self.refuse("targets_full", exc.message)
            return
        except GatewayError as exc:
            self.refuse("connect_failed", exc.message)
            return
        self.target = target
        client = self.transport
        assert client is not None and isinstance(protocol, _UpstreamHold)
        if self.done:  # the client left while the connect completed
            transport.abort()
            target.in_flight -= 1
            return
        version = upstream.config.send_proxy_protocol
        if version is not None:
            transport.write(self.proxy_header(version, client))  # before any byte of the client's
        relay = self.relay = Relay(
            self.loop, client, transport, idle_timeout=self.settings.timeouts.idle, on_close=self._relay_closed
        )
        relay.start(
            bytes(self.pending),
            bytes(protocol.pending),
            client_write_paused=self.write_paused,
            upstream_write_paused=protocol.write_paused,
        )
        self.pending = bytearray()
        # An EOF read before the relay: uvloop reads it again when the relay resumes reading,
        # asyncio's transports do not; say it here once (a second EOF changes nothing).
        if self.client_eof and not relay.ending:
            relay.side_eof(relay.client)
        if protocol.eof and not relay.ending:
            relay.side_eof(relay.upstream)

    def proxy_header(self, version: str, client: asyncio.Transport) -> bytes:
        """The PROXY protocol header naming the client (the one a front balancer named, if
        any) and the address it connected to, for an upstream with send_proxy_protocol."""
        local = client.get_extra_info("sockname")
        if self.client_ip and isinstance(local, tuple):
            source, destination = (self.client_ip, self.client_port), (str(local[0]), int(local[1]))
            try:
                return encode_v1(source, destination) if version == "v1" else encode_v2(source, destination)
            except ValueError:
                pass  # not an IP address (a unix socket): say nothing about the client
        return b"PROXY UNKNOWN\r\n" if version == "v1" else encode_v2_local()

    def refuse(self, reason: str, error: str | None) -> None:
        """End before any relay: close the client (what it sent is dropped)."""
        if self.done:
            return
        if self.transport is not None:
            self.transport.close()
        self._finish(reason, len(self.pending), 0, error)

    def _relay_closed(self, stats: RelayStats) -> None:
        self._finish(stats.reason, stats.bytes_in, stats.bytes_out, stats.error)

    # --- the gateway's drain and deadline ticker ------------------------------------------------

    def drain(self) -> None:
        """Shutdown begins: a relayed connection runs on until it ends or the drain is over."""

    def abort(self) -> None:
        """The drain is over: cut the connection now."""
        if self.relay is not None:
            self.relay.abort("shutdown")
            return
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.abort()
        if not self.done:
            self._finish("shutdown", len(self.pending), 0, None)

    def check_deadline(self, now: float) -> None:
        if self.deadline and now >= self.deadline and self.relay is None and not self.done:
            self.deadline = 0.0
            self.refuse("hello_timeout", f"no complete ClientHello within {self.settings.timeouts.header:g}s")

    # --- the end ----------------------------------------------------------------------------------

    def _finish(self, reason: str, bytes_in: int, bytes_out: int, error: str | None) -> None:
        if self.done:
            return
        self.done = True
        if self.target is not None:
            self.target.in_flight -= 1
        if self.counted:
            self.hub.release(self)
        self.hub.host.connections.discard(self)
        name = self.settings.name
        self.hub.host.metrics.l4_closed(name, reason, bytes_in, bytes_out)
        access_log = self.hub.host.snapshot.access_log
        if access_log is not None:
            record: dict[str, Any] = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "listener": name,
                "protocol": self.kind,
                "client": self.client_ip,
                "client_port": self.client_port,
                "upstream": self.upstream_name,
                "target": self.target.name if self.target is not None else None,
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
                "duration_ms": round((self.loop.time() - self.started) * 1000, 3),
                "close_reason": reason,
            }
            if self.kind == "tls_passthrough":
                record["sni"] = self.sni
            if error:
                record["error"] = error
            access_log.write(record)
