"""Active health probes over HTTP/2, for upstreams with `protocol: h2` or `h2c`.

A probe opens its own connection (TLS and ALPN as the upstream's pool would, never a pooled
one: a probe must see what a new connection sees), sends one request and collects the whole
answer through a small `UpstreamListener`. `type: http` uses it as a GET (HTTP/1.1 text would
not reach a target that only speaks HTTP/2); `type: grpc` (upstream/grpc_health.py) as a
unary call.
"""

from __future__ import annotations

import asyncio

from bastion.config.schema import ActiveHealthCheck
from bastion.errors import GatewayError
from bastion.http.model import HeaderList, Headers, Response
from bastion.proto.h2_client import H2ClientConnection, H2Stream
from bastion.upstream.targets import TargetState

_MAX_BODY = 65536


class Call:
    """The `UpstreamListener` of one probe request: the response, its body (bounded) and
    trailers, or the error."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self.response: Response | None = None
        self.body = bytearray()
        self.trailers: Headers | None = None
        self.error: GatewayError | None = None

    def upstream_interim(self, response: Response) -> None:
        pass

    def upstream_head(self, response: Response, content_length: int | None) -> None:
        self.response = response

    def upstream_data(self, data: bytes) -> None:
        if len(self.body) < _MAX_BODY:
            self.body += data

    def upstream_end(self, trailers: Headers | None, reusable: bool) -> None:
        self.trailers = trailers
        if not self.done.done():
            self.done.set_result(None)

    def upstream_failed(self, error: GatewayError) -> None:
        self.error = error
        if not self.done.done():
            self.done.set_result(None)

    def upstream_paused(self, paused: bool) -> None:
        pass


async def h2_request(
    target: TargetState, method: str, path: str, headers: HeaderList, body: bytes, timeout: float
) -> Call:
    """One request on a new HTTP/2 connection to `target`, closed afterwards. Raises
    GatewayError (or OSError) when the connection cannot be made."""
    loop = asyncio.get_running_loop()
    host, port = target.address
    tls = target.pool.tls
    conn = H2ClientConnection(_ignore, _ignore, b"https" if tls is not None else b"http", tls is not None)
    try:
        if tls is None:
            await loop.create_connection(lambda: conn, host, port)
        else:
            await loop.create_connection(
                lambda: conn, host, port, ssl=tls.context, server_hostname=tls.server_hostname(host)
            )
        await conn.ready
        conn.reserved += 1
        call = Call(loop)
        H2Stream(conn).send_head(call, method, path, headers, len(body), [body] if body else [], True, timeout)
        await call.done
        return call
    finally:
        conn.close()


async def probe_http2(target: TargetState, check: ActiveHealthCheck) -> tuple[bool, str]:
    """GET the check path over HTTP/2; healthy when the status is expected."""
    headers = [(b"host", (check.host or str(target.address)).encode()), (b"user-agent", b"bastion-health-check")]
    try:
        call = await h2_request(target, "GET", check.path, headers, b"", check.timeout)
    except GatewayError as exc:
        return False, exc.message
    if call.error is not None:
        return False, call.error.message
    status = call.response.status if call.response is not None else 0
    return status in check.statuses, f"status {status}"


def _ignore(conn: H2ClientConnection) -> None:
    """A probe's connection belongs to no pool."""
