"""The gateway's L4 side: makes the protocol for each accepted L4 connection, counts them per
listener for `limits.max_connections`, and keeps each passthrough listener's SNI table."""

from __future__ import annotations

import asyncio

from bastion.config.schema import Listener
from bastion.l4.conn import L4Connection, L4Host
from bastion.l4.passthrough import PassthroughProxy
from bastion.l4.sni import SniTable
from bastion.l4.tcp import TcpProxy, TlsTcpProxy

PROTOCOLS: dict[str, type[L4Connection]] = {"tcp": TcpProxy, "tls_passthrough": PassthroughProxy}


class L4Hub:
    def __init__(self, host: L4Host) -> None:
        self.host = host
        self.open: dict[str, int] = {}  # listener name -> admitted connections still open
        self._tables: dict[int, tuple[Listener, SniTable]] = {}

    def protocol(self, listener: Listener) -> asyncio.Protocol:
        """The protocol for a connection accepted on `listener` (an L4 protocol)."""
        if listener.tls is not None:
            return TlsTcpProxy(self, listener)
        return PROTOCOLS[listener.protocol](self, listener)

    def admit(self, conn: L4Connection) -> bool:
        """Take a place under the listener's max_connections; False when it is full."""
        name = conn.settings.name
        count = self.open.get(name, 0)
        limit = conn.settings.limits.max_connections
        if limit and count >= limit:
            return False
        self.open[name] = count + 1
        conn.counted = True
        return True

    def release(self, conn: L4Connection) -> None:
        conn.counted = False
        self.open[conn.settings.name] -= 1

    def sni_table(self, listener: Listener) -> SniTable:
        """The listener's SNI table, built once per listener settings (a reload brings new ones)."""
        cached = self._tables.get(id(listener))
        if cached is not None and cached[0] is listener:
            return cached[1]
        if len(self._tables) > 64:
            self._tables.clear()  # settings replaced by reloads
        table = SniTable(listener.sni_routes or [])
        self._tables[id(listener)] = (listener, table)
        return table
