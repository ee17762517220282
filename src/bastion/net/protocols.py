"""Which protocol serves a client connection, chosen by name from a registry.

A plain listener knows its protocol when it accepts: HTTP/1.1, or with `http2:
prior_knowledge` whichever the first bytes say (`PrefaceSniffer`: the HTTP/2 client preface, or
anything else for HTTP/1.1). A TLS listener knows it only after the handshake, from ALPN: the
connection starts with a `Negotiator`, which reads the protocol the client and the gateway
agreed on and hands the transport over to that protocol's class. Adding a protocol is a
registry entry, not a change here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, cast

from bastion.config.schema import Listener
from bastion.proto.h1 import H1Server, Host
from bastion.proto.h2_server import PREFACE, H2Server

ProtocolClass = Callable[[Host, Listener], asyncio.BaseProtocol]

# ALPN protocol id -> the class that serves it.
PROTOCOLS: dict[str, ProtocolClass] = {"h2": H2Server, "http/1.1": H1Server}
DEFAULT = "http/1.1"  # no ALPN, or a client that offered none the gateway speaks


def alpn_offer() -> list[str]:
    """What a TLS listener offers, in preference order."""
    return list(PROTOCOLS)


class HandshakeCounter(Protocol):
    def tls_handshake(self, listener: str, completed: bool) -> None: ...


class Negotiator(asyncio.Protocol):
    """A TLS connection before it is handed over: read ALPN, swap in the protocol it chose.

    It also counts the handshake: `connection_made` comes only after a completed one, and a
    negotiator dropped without it (refused, timed out, cut) was a failed one."""

    def __init__(self, host: Host, listener: Listener, counter: HandshakeCounter | None = None) -> None:
        self.host = host
        self.listener = listener
        self.counter = counter
        self.completed = False
        self.proxied_peer: tuple[str, int] | None = None  # from a PROXY header, for the chosen protocol

    def __del__(self) -> None:
        if not self.completed and self.counter is not None:
            self.counter.tls_handshake(self.listener.name, False)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.completed = True
        if self.counter is not None:
            self.counter.tls_handshake(self.listener.name, True)
        ssl_object: Any = transport.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        protocol = PROTOCOLS.get(chosen or DEFAULT, PROTOCOLS[DEFAULT])(self.host, self.listener)
        if self.proxied_peer is not None:
            protocol.proxied_peer = self.proxied_peer  # type: ignore[attr-defined]
        cast(asyncio.Transport, transport).set_protocol(protocol)
        protocol.connection_made(transport)


class PrefaceSniffer(asyncio.Protocol):
    """A plain connection on a `prior_knowledge` listener, until its first bytes tell: the
    24-byte HTTP/2 preface (in as many reads as the client likes) hands it to HTTP/2, any byte
    that differs from it to HTTP/1.1. It counts as a client connection meanwhile (drain,
    header timeout)."""

    proxied_peer: tuple[str, int] | None = None

    def __init__(self, host: Host, listener: Listener) -> None:
        self.host = host
        self.settings = listener
        self.transport: asyncio.Transport | None = None
        self.seen = b""
        self._deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.host.connections.add(self)
        self._deadline = asyncio.get_running_loop().time() + self.settings.timeouts.header

    def data_received(self, data: bytes) -> None:
        seen = self.seen + data
        size = min(len(seen), len(PREFACE))
        if seen[:size] != PREFACE[:size]:
            self._hand_over(H1Server(self.host, self.settings), seen)
        elif size == len(PREFACE):
            self._hand_over(H2Server(self.host, self.settings), seen)
        else:
            self.seen = seen

    def _hand_over(self, protocol: H1Server | H2Server, data: bytes) -> None:
        self.host.connections.discard(self)
        self._deadline = 0.0
        transport = self.transport
        assert transport is not None
        protocol.proxied_peer = self.proxied_peer
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.host.connections.discard(self)

    def check_deadline(self, now: float) -> None:
        if self._deadline and now >= self._deadline and self.transport is not None:
            self.transport.close()

    def drain(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def new_protocol(host: Host, listener: Listener, counter: HandshakeCounter | None = None) -> asyncio.BaseProtocol:
    """The protocol object for one accepted connection (what `create_server`'s factory makes)."""
    if listener.protocol == "https":
        return Negotiator(host, listener, counter)
    if listener.http2 == "prior_knowledge":
        return PrefaceSniffer(host, listener)
    return PROTOCOLS[DEFAULT](host, listener)
