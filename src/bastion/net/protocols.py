"""Which protocol serves a client connection, chosen by name from a registry.

A plain listener knows its protocol when it accepts (HTTP/1.1 today; HTTP/2 with prior
knowledge later). A TLS listener knows it only after the handshake, from ALPN: the
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

ProtocolClass = Callable[[Host, Listener], asyncio.BaseProtocol]

# ALPN protocol id -> the class that serves it.
PROTOCOLS: dict[str, ProtocolClass] = {"http/1.1": H1Server}
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


def new_protocol(host: Host, listener: Listener, counter: HandshakeCounter | None = None) -> asyncio.BaseProtocol:
    """The protocol object for one accepted connection (what `create_server`'s factory makes)."""
    if listener.protocol == "https":
        return Negotiator(host, listener, counter)
    return PROTOCOLS[DEFAULT](host, listener)
