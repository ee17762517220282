"""The upstream connection's events for one exchange, fed bytes directly: no sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from bastion.errors import GatewayError
from bastion.http.model import Headers, Response
from bastion.upstream.conn import UpstreamConnection


class Listener:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def upstream_interim(self, response: Response) -> None:
        self.events.append(("interim", response.status))

    def upstream_head(self, response: Response, content_length: int | None) -> None:
        self.events.append(("head", response.status))

    def upstream_data(self, data: bytes) -> None:
        self.events.append(("body", data))

    def upstream_end(self, trailers: Headers | None, reusable: bool) -> None:
        self.events.append(("done", reusable) if trailers is None else ("trailers", trailers.items))

    def upstream_failed(self, error: GatewayError) -> None:
        self.events.append(("failed", error.message))

    def upstream_paused(self, paused: bool) -> None:
        pass


class Transport(asyncio.Transport):
    def write(self, data: Any) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


def _run(*steps: bytes | Exception) -> list[tuple[str, Any]]:
    async def scenario() -> list[tuple[str, Any]]:
        conn = UpstreamConnection(lambda conn: None)
        conn.connection_made(Transport())
        listener = Listener()
        conn.send_head(listener, "GET", "/", [], None, (), True, 10.0)
        for step in steps:
            if isinstance(step, Exception):
                conn.connection_lost(step)
            else:
                conn.data_received(step)
        return listener.events

    return asyncio.run(scenario())


def test_interim_responses_are_not_the_end_of_the_response() -> None:
    events = _run(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert events == [("interim", 103), ("head", 200), ("body", b"ok"), ("done", True)]


def test_a_reset_after_a_complete_response_is_not_a_failure() -> None:
    # The exchange may not have taken its response yet when the upstream goes away.
    events = _run(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", ConnectionResetError())
    assert events == [("head", 200), ("body", b"ok"), ("done", True)]


def test_a_reset_mid_response_is_a_failure() -> None:
    events = _run(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok", ConnectionResetError())
    assert events[-1] == ("failed", "The upstream closed the connection mid-response.")


def test_bytes_after_the_final_response_end_the_connection_not_the_response() -> None:
    events = _run(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
    assert events == [("head", 200), ("body", b"ok"), ("done", True)]


def test_trailers_end_the_response() -> None:
    events = _run(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\ngrpc-status: 0\r\nConnection: x\r\n\r\n"
    )
    assert events == [("head", 200), ("body", b"ok"), ("trailers", [(b"grpc-status", b"0")])]
