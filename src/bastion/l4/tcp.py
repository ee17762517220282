"""`protocol: tcp` listeners: every client connection is relayed to a target of `upstream`.

The connect starts as soon as the connection is accepted (after the TLS handshake when the
listener terminates TLS); what the client sends meanwhile is kept for the target.
"""

from __future__ import annotations

import asyncio

from bastion.l4.conn import L4Connection


class TcpProxy(L4Connection):
    kind = "tcp"

    def begin(self) -> None:
        assert self.settings.upstream is not None  # the config requires it on tcp listeners
        self.connect(self.settings.upstream)


class TlsTcpProxy(TcpProxy):
    """A tcp listener with `tls`: made at accept, connected once the handshake completed.
    Counts handshakes as https listeners do (`bastion_tls_handshakes_total`): completed when
    `connection_made` comes, failed when the object goes without it (refused, timed out, cut)."""

    handshake_done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.handshake_done = True
        self.hub.host.metrics.tls_handshake(self.settings.name, True)
        super().connection_made(transport)

    def __del__(self) -> None:
        if not self.handshake_done:
            self.hub.host.metrics.tls_handshake(self.settings.name, False)
