"""The client-side HTTP/2 protocol fed frames through a fake transport: no sockets.

The gateway behind it has routes but no reachable upstream, so what is tested is the
protocol's part: streams, gateway-made answers, stream errors, writes held while the
transport is full.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h2.config
import h2.connection
import h2.events
from h2.errors import ErrorCodes
from h2.stream import StreamState
from test_h1_server import FakeTransport as H1FakeTransport

from bastion.config.build import build_snapshot
from bastion.config.loader import load_config_text
from bastion.proto.h2_server import H2Server
from bastion.upstream.targets import TargetRegistry

CONFIG = """
version: 1
listeners: [{name: web, bind: "127.0.0.1:1", http2: prior_knowledge}]
upstreams: {app: {targets: [{address: "127.0.0.1:1"}], retries: {attempts: 0}}}
routes: [{name: get-only, match: {path: /only, methods: [GET]}, upstream: app}]
log: {access: false}
"""


class FakeTransport(H1FakeTransport):
    def get_write_buffer_size(self) -> int:
        return len(self.data)


class FakeGateway:
    def __init__(self) -> None:
        self.snapshot = build_snapshot(load_config_text(CONFIG), TargetRegistry())
        self.connections: set[Any] = set()


class Pair:
    """An h2 client wired to an H2Server through a fake transport."""

    def __init__(self) -> None:
        self.gateway = FakeGateway()
        self.server = H2Server(self.gateway, self.gateway.snapshot.config.listeners[0])  # type: ignore[arg-type]
        self.transport = FakeTransport()
        self.server.connection_made(self.transport)
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self.client = h2.connection.H2Connection(config)
        self.client.initiate_connection()
        self.events: list[Any] = []

    def request(self, path: str, method: str = "GET", extra: list[tuple[bytes, bytes]] | None = None) -> int:
        stream = self.client.get_next_available_stream_id()
        head = [(b":method", method.encode()), (b":scheme", b"http"), (b":path", path.encode()), (b":authority", b"a")]
        self.client.send_headers(stream, head + (extra or []), end_stream=True)
        return stream

    async def exchange(self) -> None:
        self.server.data_received(self.client.data_to_send())
        for _ in range(30):
            await asyncio.sleep(0)
        self.collect()

    def collect(self) -> None:
        if self.transport.data:
            self.events += self.client.receive_data(bytes(self.transport.data))
            self.transport.data.clear()

    def of(self, kind: type, stream: int) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and e.stream_id == stream]


def test_gateway_answers_travel_as_streams() -> None:
    async def run() -> None:
        pair = Pair()
        missing, wrong_method = pair.request("/missing"), pair.request("/only", "POST")
        await pair.exchange()
        (head,) = pair.of(h2.events.ResponseReceived, missing)
        headers = dict(head.headers)
        assert headers[b":status"] == b"404" and headers[b"content-type"] == b"application/json"
        body = b"".join(e.data for e in pair.of(h2.events.DataReceived, missing))
        assert json.loads(body)["request_id"] == headers[b"x-request-id"].decode()
        assert int(headers[b"content-length"]) == len(body)
        (head,) = pair.of(h2.events.ResponseReceived, wrong_method)
        assert dict(head.headers)[b":status"] == b"405" and dict(head.headers)[b"allow"] == b"GET, HEAD"
        assert pair.of(h2.events.StreamEnded, missing) and pair.of(h2.events.StreamEnded, wrong_method)
        assert pair.server.streams == {}

    asyncio.run(run())


def test_a_malformed_head_is_a_stream_error_and_the_connection_goes_on() -> None:
    async def run() -> None:
        pair = Pair()
        bad = pair.request("/missing", extra=[(b"connection", b"close")])
        good = pair.request("/missing")
        await pair.exchange()
        (reset,) = pair.of(h2.events.StreamReset, bad)
        assert reset.error_code == ErrorCodes.PROTOCOL_ERROR
        assert dict(pair.of(h2.events.ResponseReceived, good)[0].headers)[b":status"] == b"404"

    asyncio.run(run())


def test_no_data_is_written_while_the_transport_is_full() -> None:
    async def run() -> None:
        pair = Pair()
        await pair.exchange()  # the preface and settings
        pair.server.pause_writing()
        stream = pair.request("/missing")
        await pair.exchange()
        assert pair.of(h2.events.ResponseReceived, stream)  # heads are small: they go
        assert not pair.of(h2.events.DataReceived, stream)
        assert pair.server.statistics()["buffered_bytes"] > 0
        pair.server.resume_writing()
        for _ in range(5):
            await asyncio.sleep(0)
        pair.collect()
        assert pair.of(h2.events.DataReceived, stream) and pair.of(h2.events.StreamEnded, stream)

    asyncio.run(run())


def test_closed_streams_do_not_pile_up_in_h2() -> None:
    async def run() -> None:
        pair = Pair()
        for _ in range(300):
            pair.request("/missing")
            await pair.exchange()
        assert len(pair.of(h2.events.StreamEnded, 599)) == 1
        assert len(pair.server.conn.streams) <= 2 * 100 + 1  # swept when twice the limit is held

    asyncio.run(run())


def test_a_stream_h2_closed_on_its_own_is_reset_not_left_hanging() -> None:
    async def run() -> None:
        pair = Pair()
        stream = pair.request("/missing")
        pair.server.data_received(pair.client.data_to_send())  # the exchange has not run yet
        h2_stream = pair.server.conn.streams[stream]
        h2_stream.state_machine.state = StreamState.CLOSED  # as after a stream error h2 handled
        for _ in range(30):
            await asyncio.sleep(0)
        pair.collect()
        assert pair.server.streams == {}  # forgotten: it does not count against the stream limit
        assert not pair.of(h2.events.ResponseReceived, stream)
        assert pair.server.conn.state_machine.state != h2.connection.ConnectionState.CLOSED  # the connection goes on

    asyncio.run(run())
