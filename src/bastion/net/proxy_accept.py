"""Accepting the PROXY protocol: a reader in front of a listener's real protocol.

With `proxy_protocol.accept`, every accepted connection starts with a `ProxyReader`. A peer
outside `trusted` is closed at once, before a byte is read. A trusted one must send a valid
v1 or v2 header within the listener's `timeouts.header`; then the reader makes the
listener's protocol, sets its `proxied_peer` to the header's client address (LOCAL and
UNKNOWN headers keep the socket peer), hands the transport over (`set_protocol` and
`connection_made`, as the TLS `Negotiator` does) and feeds it the bytes that came behind the
header. On https listeners the header comes before TLS: the socket listens in the clear and
the reader starts TLS after the header, with the listener's context (SNI, ALPN) and its
handshake timeout; the `Negotiator` then counts the handshake and picks the protocol.

Listeners without `proxy_protocol` never see this module: their sockets are set up as before.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

from bastion.config.schema import Listener
from bastion.net.proxy_protocol import HeaderParser, ProxyProtocolError
from bastion.observability.metrics import ProxyProtocolStats

log = logging.getLogger("bastion.proxy_protocol")

LOG_EVERY = 10.0  # seconds between two log lines about refused connections, per listener

Peer = tuple[str, int]


def log_refusal(counts: ProxyProtocolStats, listener: str, why: str, peer: object) -> None:
    """Log a refusal at most once every LOG_EVERY seconds: a scanner must not flood the log."""
    now = time.monotonic()
    if now - counts.logged_at >= LOG_EVERY:
        counts.logged_at = now
        log.info(
            "listener %s: closed a connection from %s: %s (untrusted %d, invalid %d, timed out %d so far)",
            listener,
            peer,
            why,
            counts.untrusted,
            counts.invalid,
            counts.timeout,
        )


class Trusted:
    """The CIDR ranges allowed to send a PROXY header; IPv4-mapped IPv6 peers count as IPv4."""

    __slots__ = ("networks",)

    def __init__(self, specs: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(spec.strip(), strict=False) for spec in specs)

    def __contains__(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


def late_tls(listener: Listener) -> bool:
    """A TLS listener (https, tcp with tls) that reads a PROXY header before its handshake."""
    accept = listener.proxy_protocol
    return listener.tls is not None and accept is not None and accept.accept


def feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Give `data` to a protocol as if the transport had read it (buffered or not)."""
    if not data:
        return
    get_buffer = getattr(protocol, "get_buffer", None)  # uvloop's TLS protocol is buffered, not a subclass
    if get_buffer is None:
        cast(asyncio.Protocol, protocol).data_received(data)
        return
    updated = cast(asyncio.BufferedProtocol, protocol).buffer_updated
    view = memoryview(data)
    while view:
        buffer = memoryview(get_buffer(len(view))).cast("B")
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        updated(size)
        view = view[size:]


def hand_over(transport: asyncio.BaseTransport, protocol: asyncio.BaseProtocol, peer: Peer | None, rest: bytes) -> None:
    """Make `protocol` the transport's, telling it the proxied client address first."""
    if peer is not None:
        protocol.proxied_peer = peer  # type: ignore[attr-defined]
    cast(asyncio.Transport, transport).set_protocol(protocol)
    protocol.connection_made(transport)
    if not transport.is_closing():
        feed(protocol, rest)


class _EarlyData(asyncio.Protocol):
    """The TLS connection's protocol until start_tls returns: the request may arrive with the
    client's last handshake bytes, before the real protocol is in place."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class ProxyReader(asyncio.Protocol):
    """One connection until its PROXY header is read (or refused)."""

    def __init__(
        self,
        listener: str,
        trusted: Trusted,
        timeout: float,
        make_next: Callable[[], asyncio.BaseProtocol],
        counts: ProxyProtocolStats,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.listener = listener
        self.trusted = trusted
        self.timeout = timeout
        self.make_next = make_next
        self.counts = counts
        self.tls = tls
        self.parser = HeaderParser()
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self.timer: asyncio.TimerHandle | None = None
        self.done = False
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")
        if not isinstance(self.peer, tuple):  # reset before the accept was handled: nothing to read
            self.done = True
            self.transport.abort()
            return
        if self.peer[0] not in self.trusted:
            self.counts.untrusted += 1
            self._refuse("not in proxy_protocol.trusted")
            return
        self.timer = asyncio.get_running_loop().call_later(self.timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        try:
            header = self.parser.feed(data)
        except ProxyProtocolError as exc:
            self.counts.invalid += 1
            self._refuse(str(exc))
            return
        if header is None:
            return
        self.done = True
        self._cancel_timer()
        self.counts.accepted += 1
        rest = self.parser.rest(header)
        self.parser = HeaderParser()  # drop the buffer
        assert self.transport is not None
        if self.tls is None:
            hand_over(self.transport, self.make_next(), header.source, rest)
            return
        self.transport.pause_reading()
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self._start_tls(header.source, rest))  # held: a task needs a reference

    async def _start_tls(self, peer: Peer | None, rest: bytes) -> None:
        """TLS after the header; the bytes read behind the header are the start of the
        handshake, given to the TLS protocol right after start_tls installs it."""
        transport = self.transport
        assert transport is not None and self.tls is not None
        loop = asyncio.get_running_loop()
        protocol = self.make_next()  # a Negotiator: counts the handshake, picks by ALPN
        early = _EarlyData()
        if rest:
            loop.call_soon(self._feed_tls, transport, rest)
        try:
            tls_transport = await loop.start_tls(
                transport, early, self.tls, server_side=True, ssl_handshake_timeout=self.timeout
            )
        except Exception:  # refused, timed out, cut, or the transport closed meanwhile: count and drop
            transport.abort()
            return
        if tls_transport is None or early.lost:  # closed as the handshake finished
            return
        hand_over(tls_transport, protocol, peer, b"")  # the Negotiator swaps in the protocol ALPN chose
        if not tls_transport.is_closing():
            feed(tls_transport.get_protocol(), b"".join(early.data))

    def _feed_tls(self, transport: asyncio.Transport, rest: bytes) -> None:
        tls_protocol = transport.get_protocol()
        if tls_protocol is self:  # start_tls has not swapped it in: the loop differs from ours
            transport.abort()
            return
        feed(tls_protocol, rest)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.done = True

    def _timed_out(self) -> None:
        self.timer = None
        if not self.done:
            self.counts.timeout += 1
            self._refuse(f"no complete PROXY header within {self.timeout:g}s")

    def _refuse(self, why: str) -> None:
        self.done = True
        self._cancel_timer()
        log_refusal(self.counts, self.listener, why, self.peer)
        if self.transport is not None:
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
