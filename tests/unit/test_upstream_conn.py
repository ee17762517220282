"""The upstream connection's events for one exchange, fed bytes directly: no sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from bastion.errors import GatewayError
from bastion.http.model import Response
from bastion.upstream.conn import UpstreamConnection


class Listener:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def upstream_interim(self, response: Response) -> None:
        self.events.append(("interim", response.status))

    def upstream_head(self, response: Response, content_length: int | None, keep_alive: bool) -> None:
        self.events.append(("head", response.status))

    def upstream_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def upstream_done(self, keep_alive: bool) -> None:
        self.events.append(("done", keep_alive))

    def upstream_failed(self, error: GatewayError) -> None:
        self.events.append(("failed", error.message))

    def upstream_paused(self, paused: bool) -> None:
        pass


class Pool:
    epoch = 0

    def connection_lost(self, conn: UpstreamConnection) -> None:
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
        conn = UpstreamConnection(Pool())  # type: ignore[arg-type]
        conn.connection_made(Transport())
        listener = Listener()
        conn.start(listener, b"GET / HTTP/1.1\r\n\r\n", False, 10.0)
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
