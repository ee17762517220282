"""`protocol: tls_passthrough` listeners: route by the ClientHello's server name, relay untouched.

The client's first bytes are kept until they hold a complete ClientHello (l4/clienthello.py),
within the listener's `timeouts.header` and `clienthello.MAX_BYTES`. The server name picks
the upstream (l4/sni.py); the kept bytes are then sent to the target first, exactly as
read, and the relay carries the rest: the TLS session is between the client and the target,
the gateway never holds a key. A hello that is not one (garbage, malformed, too large, too
slow) closes the connection; one without a server name goes to the `*` route, or is closed
when there is none.
"""

from __future__ import annotations

from bastion.l4.clienthello import BadHello, HelloReader
from bastion.l4.conn import L4Connection


class PassthroughProxy(L4Connection):
    kind = "tls_passthrough"
    _need = 5  # bytes needed before parsing again helps (a record header first)
    _reader: HelloReader | None = None

    def begin(self) -> None:
        self.deadline = self.loop.time() + self.settings.timeouts.header

    def data_received(self, data: bytes) -> None:
        if self.upstream_name is not None or self.done:
            super().data_received(data)  # behind the hello, while connecting: relayed after it
            return
        self.pending += data
        if len(self.pending) < self._need:
            return
        reader = self._reader
        if reader is None:
            reader = self._reader = HelloReader()
        try:
            found = reader.feed(self.pending)
        except BadHello as exc:
            self.refuse("bad_hello", str(exc))
            return
        if isinstance(found, int):
            self._need = found
            return
        self.sni = found.sni
        upstream = self.hub.sni_table(self.settings).upstream_for(found.sni)
        if upstream is None:
            self.refuse("no_route", f"no sni_routes entry for {found.sni!r}" if found.sni else "no SNI and no * route")
            return
        self.connect(upstream)

    def eof_received(self) -> bool:
        if self.upstream_name is None and not self.done:
            self.refuse("client_closed", "the client closed before its hello was complete")
            return False
        return super().eof_received()
