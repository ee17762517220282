"""A `Downstream` that passes everything to the one it wraps: the base of response rewrites
(gRPC-Web framing, grpc_json's JSON), which override only the sending methods they change."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from bastion.errors import GatewayError
from bastion.http.model import Headers, Response
from bastion.http.streams import Downstream


class DownstreamWrapper:
    """Delegates every `Downstream` call to `inner`."""

    def __init__(self, inner: Downstream) -> None:
        self.inner = inner
        self.loop: asyncio.AbstractEventLoop = inner.loop

    def render_error(self, error: GatewayError, request_id: str) -> tuple[Response, bytes]:
        return self.inner.render_error(error, request_id)

    def send_continue(self) -> None:
        self.inner.send_continue()

    def send_interim(self, response: Response) -> None:
        self.inner.send_interim(response)

    def send_head(
        self, response: Response, length: int | None, body: Sequence[bytes], end_stream: bool, close: bool
    ) -> None:
        self.inner.send_head(response, length, body, end_stream, close)

    def send_data(self, data: bytes) -> None:
        self.inner.send_data(data)

    def send_end(self, trailers: Headers | None) -> None:
        self.inner.send_end(trailers)

    def pause_reading(self) -> None:
        self.inner.pause_reading()

    def resume_reading(self) -> None:
        self.inner.resume_reading()

    def take_over(self, on_abort: Callable[[], None]) -> tuple[asyncio.Transport, bytes, bool]:
        return self.inner.take_over(on_abort)

    def discard_body(self) -> None:
        self.inner.discard_body()

    def reset(self, error: GatewayError) -> None:
        self.inner.reset(error)

    def finished(self, close: bool) -> None:
        self.inner.finished(close)
