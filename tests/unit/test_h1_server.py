"""The client-side HTTP/1.1 protocol fed bytes through a fake transport: no sockets.

The gateway behind it has routes but no reachable upstream, so every routed request ends in
a gateway-made response; what is tested is framing, ordering, limits and connection state.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest

from bastion.config.build import build_snapshot
from bastion.config.loader import load_config_text
from bastion.config.schema import Listener
from bastion.proto.h1 import H1Server
from bastion.upstream.targets import TargetRegistry
from support import split_responses

CONFIG = """
version: 1
listeners: [{name: web, bind: "127.0.0.1:1", limits: {max_header_bytes: 2KB, max_uri_bytes: 512}}]
upstreams: {app: {targets: [{address: "127.0.0.1:1"}], retries: {attempts: 0}}}
routes: [{name: get-only, match: {path: /only, methods: [GET]}, upstream: app}]
log: {access: false}
"""


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.closed = False
        self.paused = False

    def write(self, data: Any) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name == "peername" else default


class FakeGateway:
    def __init__(self) -> None:
        self.snapshot = build_snapshot(load_config_text(CONFIG), TargetRegistry())
        self.connections: set[Any] = set()


async def _serve(chunks: list[bytes]) -> FakeTransport:
    gateway = FakeGateway()
    listener: Listener = gateway.snapshot.config.listeners[0]
    server = H1Server(gateway, listener)  # type: ignore[arg-type]
    transport = FakeTransport()
    server.connection_made(transport)
    for chunk in chunks:
        server.data_received(chunk)
        await asyncio.sleep(0)
    for _ in range(20):
        await asyncio.sleep(0)
    server.connection_lost(None)
    return transport


def serve(*chunks: bytes) -> FakeTransport:
    return asyncio.run(_serve(list(chunks)))


def test_pipelined_requests_fed_byte_by_byte_are_answered_in_order() -> None:
    data = (
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nDELETE /only HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    transport = serve(*[data[i : i + 1] for i in range(len(data))])
    statuses = [status for status, _, _ in split_responses(bytes(transport.data))]
    assert statuses == [404, 405, 404]
    assert not transport.closed


def test_connection_close_request_closes_after_its_response() -> None:
    transport = serve(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    responses = split_responses(bytes(transport.data))
    assert [r[0] for r in responses] == [404]
    assert responses[0][1]["connection"] == "close"
    assert transport.closed


def test_http10_without_keep_alive_closes() -> None:
    transport = serve(b"GET /a HTTP/1.0\r\n\r\n")
    assert bytes(transport.data).startswith(b"HTTP/1.1 404")
    assert transport.closed


def test_upstream_unreachable_is_502_and_keeps_the_connection() -> None:
    transport = serve(b"GET /only HTTP/1.1\r\nHost: x\r\n\r\n")
    ((status, headers, body),) = split_responses(bytes(transport.data))
    assert status == 502
    assert headers["content-type"] == "application/json"
    assert b'"upstream_connect_failed"' in body
    assert not transport.closed


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /" + b"a" * 600 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 3000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n", 400),
        (b"GET /%2f HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # TLS to a plain listener
    ],
)
def test_bad_requests_are_answered_once_and_closed(data: bytes, status: int) -> None:
    transport = serve(data, b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
    responses = split_responses(bytes(transport.data))
    assert [r[0] for r in responses] == [status]
    assert responses[0][1]["connection"] == "close"
    assert transport.closed


def test_header_that_never_ends_is_cut_at_the_limit() -> None:
    transport = serve(b"GET / HTTP/1.1\r\nHost: x\r\nX: ", *[b"z" * 512] * 10)
    assert bytes(transport.data).startswith(b"HTTP/1.1 431")
    assert transport.closed


SEEDS = [
    b"GET /a?x=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /only HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET /only HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif op == 1:
            out[pos:pos] = rng.choice([b"\r\n", b":", b" ", b"\x00", b"%2f", b"chunked", b"999999999999", b"\n"])
        elif op == 2:
            del out[pos : pos + rng.randint(1, 8)]
        else:
            out[pos:pos] = rng.choice(SEEDS)
    return bytes(out)


@pytest.mark.parametrize("seed", range(300))
def test_mutated_input_never_breaks_the_connection_state(seed: int) -> None:
    """Whatever arrives, the server answers with well-formed responses or closes; it never
    raises, never answers twice for one request, and never leaves a response half-written
    on a connection it keeps open."""
    rng = random.Random(seed)
    data = b"".join(_mutate(rng, rng.choice(SEEDS)) for _ in range(rng.randint(1, 3)))
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 5))))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    transport = serve(*chunks)
    output = bytes(transport.data)
    responses = split_responses(output) if output else []
    for status, headers, body in responses:
        assert status in (400, 404, 405, 413, 414, 417, 431, 502), (status, data)
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["request_id"] == headers["x-request-id"]
    if responses and responses[-1][0] in (400, 413, 414, 417, 431):
        assert transport.closed, data


def test_no_new_exchange_starts_while_the_client_is_not_reading() -> None:
    async def scenario() -> tuple[bytes, bytes]:
        gateway = FakeGateway()
        server = H1Server(gateway, gateway.snapshot.config.listeners[0])  # type: ignore[arg-type]
        transport = FakeTransport()
        server.connection_made(transport)
        server.pause_writing()  # the client stopped reading
        server.data_received(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(20):
            await asyncio.sleep(0)
        while_paused = bytes(transport.data)
        server.resume_writing()
        for _ in range(20):
            await asyncio.sleep(0)
        server.connection_lost(None)
        return while_paused, bytes(transport.data)

    while_paused, after = asyncio.run(scenario())
    assert while_paused == b""
    assert [status for status, _, _ in split_responses(after)] == [404]
