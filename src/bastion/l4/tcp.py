"""`protocol: tcp` listeners: every client connection is relayed to a target of `upstream`.

The connect starts as soon as the connection is accepted (after the TLS handshake when the
listener terminates TLS); what the client sends meanwhile waits in its socket.
"""

from __future__ import annotations

from bastion.l4.conn import L4Connection


class TcpProxy(L4Connection):
    kind = "tcp"

    def begin(self) -> None:
        assert self.settings.upstream is not None  # the config requires it on tcp listeners
        self.connect(self.settings.upstream)
