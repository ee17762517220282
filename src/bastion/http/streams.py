"""The interfaces between the exchange and the protocols on either side of it.

The exchange (http/exchange.py) handles one request whatever the protocols: it talks to the
client through a `Downstream` and to a target through an `UpstreamStream`, and each of them
reports back through the matching listener. Only these names cross the layers, so a new
protocol (HTTP/2 streams, a gRPC renderer) is a new implementation of them, not a change to
the exchange. In the spirit of uvicorn's request cycle and flow-control split, and of
httpcore's pooled-connection interface:

- a body is data with `end_stream`; trailers may end a stream instead; a 1xx is never an end;
- `pause_reading` / `resume_reading` are counted by the implementation: every pause is
  matched by one resume;
- heads are protocol-neutral (`Request`, `Response` in http/model.py): method, scheme,
  authority, path, query, headers; no HTTP/1.1 framing fields.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from bastion.errors import GatewayError
from bastion.http.model import HeaderList, Headers, Response


class Downstream(Protocol):
    """One client stream, as the exchange drives it (HTTP/1.1: the connection's active one)."""

    loop: asyncio.AbstractEventLoop

    def render_error(self, error: GatewayError, request_id: str) -> tuple[Response, bytes]:
        """The response this protocol gives for a gateway error (JSON for HTTP)."""
        ...

    def send_continue(self) -> None:
        """Tell a client waiting on `Expect: 100-continue` to send its body."""
        ...

    def send_interim(self, response: Response) -> None:
        """A 1xx from the upstream, before the final head (dropped where it cannot go)."""
        ...

    def send_head(
        self, response: Response, length: int | None, body: Sequence[bytes], end_stream: bool, close: bool
    ) -> None:
        """The final head, with `body` written together; `close`: no further requests here."""
        ...

    def send_data(self, data: bytes) -> None: ...

    def send_end(self, trailers: Headers | None) -> None:
        """The end of the response body, with trailers when the protocol can carry them."""
        ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def take_over(self, on_abort: Callable[[], None]) -> tuple[asyncio.Transport, bytes, bool]:
        """After a 101: hand the connection to a relay. (transport, bytes the client sent
        behind its request, whether writing is paused); `on_abort` ends the relay if the
        gateway has to cut the connection (the end of a drain)."""
        ...

    def discard_body(self) -> None:
        """The rest of the request body is refused: read and drop it, then close."""
        ...

    def reset(self, error: GatewayError) -> None:
        """Cut the stream: a response already started cannot be finished."""
        ...

    def finished(self, close: bool) -> None:
        """The exchange is over (its log record written); the next request may start."""
        ...


class DownstreamListener(Protocol):
    """What a client-side protocol reports to the exchange it feeds."""

    def on_body(self, data: bytes) -> None: ...

    def on_end(self, trailers: Headers | None) -> None: ...

    def on_client_paused(self, paused: bool) -> None:
        """The client is not reading (or reads again): hold (or resume) the upstream."""
        ...

    def on_client_lost(self) -> None: ...

    def on_client_error(self, error: GatewayError) -> None:
        """The client broke its request (too slow, malformed body): fail the exchange."""
        ...


class UpstreamListener(Protocol):
    """What an upstream stream reports to the exchange using it."""

    def upstream_interim(self, response: Response) -> None: ...

    def upstream_head(self, response: Response, content_length: int | None) -> None: ...

    def upstream_data(self, data: bytes) -> None: ...

    def upstream_end(self, trailers: Headers | None, reusable: bool) -> None: ...

    def upstream_failed(self, error: GatewayError) -> None: ...

    def upstream_paused(self, paused: bool) -> None:
        """The upstream is not taking the request body (or takes it again)."""
        ...


class UpstreamStream(Protocol):
    """One request toward a target, over a pooled connection."""

    def send_head(
        self,
        listener: UpstreamListener,
        method: str,
        target: str,
        headers: HeaderList,
        length: int | None,
        body: Sequence[bytes],
        end_stream: bool,
        timeout: float,
    ) -> None:
        """Send the request head (`length` None with a body: the protocol frames it)."""
        ...

    def send_data(self, data: bytes) -> None: ...

    def send_end(self, trailers: Headers | None) -> None:
        """The request body is complete; the response clock starts."""
        ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def abort(self) -> None: ...

    def expect_upgrade(self) -> None:
        """The request asks to switch protocols: a 101 is its answer, not an error."""
        ...

    def take_over(self) -> tuple[asyncio.Transport, bytes]:
        """After a 101: the transport and the bytes behind the head, for a relay."""
        ...

    def relay_ended(self) -> None:
        """The relay that took the connection over is done."""
        ...


class PooledConnection(Protocol):
    """What a pool needs to know of a connection; HTTP/2 stays available while it has streams."""

    served: int
    idle_since: float

    def is_available(self) -> bool: ...

    def is_closed(self) -> bool: ...

    def close(self) -> None: ...


class BodyFilter(Protocol):
    """Rewrites a request body on its way to the upstream, as it streams (gRPC-Web text's
    base64, grpc_json's JSON -> one protobuf frame). Either may raise a GatewayError."""

    def feed(self, data: bytes) -> bytes:
        """The bytes to forward for `data` (may be empty: held until more arrives)."""
        ...

    def end(self) -> bytes:
        """The request body is complete: what is left to forward."""
        ...


class Transcoder(Protocol):
    """A rewrite of one exchange's bodies, installed after routing (a route's gRPC-Web, a
    plugin's grpc_json): request bytes through `request_filter`, the response through a
    `Downstream` that wraps the client's."""

    def request_filter(self) -> BodyFilter | None: ...

    def wrap(self, downstream: Downstream, listener: DownstreamListener) -> Downstream:
        """The Downstream the exchange talks to from now on; `listener` is the exchange, for a
        rewrite that has to stop it (`on_client_error`: a response over a limit)."""
        ...
