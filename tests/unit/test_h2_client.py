"""The HTTP/2 client connection and its streams, wired to an in-memory h2 server: no sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, RequestReceived, StreamEnded, StreamReset

from bastion.errors import GatewayError
from bastion.http.model import Headers, Response
from bastion.proto.h2_client import CONNECTION_WINDOW, STREAM_WINDOW, H2ClientConnection, H2Stream


class Listener:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.body = bytearray()
        self.paused: list[bool] = []

    def upstream_interim(self, response: Response) -> None:
        self.events.append(("interim", response.status))

    def upstream_head(self, response: Response, content_length: int | None) -> None:
        self.events.append(("head", response.status))

    def upstream_data(self, data: bytes) -> None:
        self.body += data

    def upstream_end(self, trailers: Headers | None, reusable: bool) -> None:
        self.events.append(("end", trailers.items if trailers else None))

    def upstream_failed(self, error: GatewayError) -> None:
        self.events.append(("failed", error.message))

    def upstream_paused(self, paused: bool) -> None:
        self.paused.append(paused)


class Wire(asyncio.Transport):
    """The client's transport: what it writes goes to the server side on `pump()`."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Pair:
    """A client connection and an h2 server talking through `pump()`."""

    def __init__(self, server_settings: dict[int, int] | None = None) -> None:
        self.capacity: list[H2ClientConnection] = []
        self.client = H2ClientConnection(lambda c: None, self.capacity.append, b"http", False)
        self.wire = Wire()
        self.server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.server.initiate_connection()
        if server_settings:
            self.server.update_settings(server_settings)
        self.events: list[Any] = []
        self.client.connection_made(self.wire)
        self.pump()

    def pump(self) -> None:
        """Move bytes both ways until both sides are quiet."""
        for _ in range(50):
            self.client.write_now()  # what the client would write at the end of the loop turn
            to_server, to_client = bytes(self.wire.out), self.server.data_to_send()
            self.wire.out.clear()
            if not to_server and not to_client:
                return
            if to_server:
                self.events += self.server.receive_data(to_server)
            if to_client:
                self.client.data_received(to_client)

    def stream(self) -> H2Stream:
        self.client.reserved += 1
        return H2Stream(self.client)

    def requests(self) -> list[int]:
        return [e.stream_id for e in self.events if isinstance(e, RequestReceived)]


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    def wrapper() -> None:
        asyncio.run(test())

    wrapper.__name__ = test.__name__
    return wrapper


GET = [(b"host", b"api.example"), (b"accept", b"*/*")]


@run
async def test_paused_streams_give_their_credit_back_when_they_end() -> None:
    """Credit held back for slow clients returns to the connection window when their streams
    are cancelled: else 16 MiB of abandoned downloads would stall the connection for good."""
    pair = Pair()
    assert pair.client.ready.done()
    for _ in range(110):
        stream, listener = pair.stream(), Listener()
        stream.send_head(listener, "GET", "/big", GET, None, (), True, 10.0)
        pair.pump()
        sid = pair.requests()[-1]
        pair.server.send_headers(sid, [(b":status", b"200")])
        stream.pause_reading()
        for _ in range(10):
            pair.server.send_data(sid, b"x" * 16000)
        pair.pump()
        assert len(listener.body) == 160000
        stream.abort()
        pair.pump()
    assert pair.server.outbound_flow_control_window > CONNECTION_WINDOW // 4
    resets = [e for e in pair.events if isinstance(e, StreamReset)]
    assert {e.error_code for e in resets} == {ErrorCodes.CANCEL}


@run
async def test_resume_reading_gives_the_held_credit_back() -> None:
    pair = Pair()
    stream, listener = pair.stream(), Listener()
    stream.send_head(listener, "GET", "/big", GET, None, (), True, 10.0)
    pair.pump()
    (sid,) = pair.requests()
    pair.server.send_headers(sid, [(b":status", b"200")])
    stream.pause_reading()
    for _ in range(10):
        pair.server.send_data(sid, b"x" * 16000)
    pair.pump()
    stalled = pair.server.local_flow_control_window(sid)
    assert stalled == STREAM_WINDOW - 160000
    stream.resume_reading()
    pair.pump()
    assert pair.server.local_flow_control_window(sid) == STREAM_WINDOW


@run
async def test_request_body_waits_for_window_and_pauses_the_client() -> None:
    pair = Pair()
    stream, listener = pair.stream(), Listener()
    stream.send_head(listener, "POST", "/up", GET, 200_000, (), False, 10.0)
    stream.send_data(b"a" * 100_000)  # the default stream window is 65535
    pair.pump()
    assert listener.paused == [True]
    received = sum(len(e.data) for e in pair.events if isinstance(e, DataReceived))
    assert received == 65535
    sid = pair.requests()[0]
    pair.server.acknowledge_received_data(received, sid)
    pair.pump()
    assert listener.paused == [True, False]
    stream.send_data(b"b" * 100_000)
    stream.send_end(None)
    for _ in range(10):
        got = sum(len(e.data) for e in pair.events if isinstance(e, DataReceived))
        pair.server.acknowledge_received_data(got - received, sid)
        received = got
        pair.pump()
    assert received == 200_000
    assert any(isinstance(e, StreamEnded) for e in pair.events)


@run
async def test_request_head_becomes_pseudo_headers_without_connection_fields() -> None:
    pair = Pair()
    stream = pair.stream()
    headers = [(b"host", b"api.example"), (b"te", b"gzip"), (b"keep-alive", b"5"), (b"x-a", b"1")]
    stream.send_head(Listener(), "PUT", "/p?q=1", headers, 0, (), True, 10.0)
    pair.pump()
    (request,) = [e for e in pair.events if isinstance(e, RequestReceived)]
    assert list(request.headers) == [
        (b":method", b"PUT"),
        (b":scheme", b"http"),
        (b":authority", b"api.example"),
        (b":path", b"/p?q=1"),
        (b"x-a", b"1"),
        (b"te", b"trailers"),
        (b"content-length", b"0"),
    ]


@run
async def test_streams_beyond_the_peer_limit_make_the_connection_unavailable() -> None:
    pair = Pair({3: 2})  # SETTINGS_MAX_CONCURRENT_STREAMS
    pair.pump()
    assert pair.client.max_streams == 2
    first, second = pair.stream(), pair.stream()
    assert not pair.client.is_available()
    first.send_head(Listener(), "GET", "/", GET, None, (), True, 10.0)
    second.send_head(Listener(), "GET", "/", GET, None, (), True, 10.0)
    pair.pump()
    first.abort()
    assert pair.client.is_available()
    assert pair.capacity  # the pool heard of the freed slot


@run
async def test_a_goaway_fails_streams_above_it_without_a_pool_and_keeps_the_rest() -> None:
    pair = Pair()
    first, second = pair.stream(), pair.stream()
    one, two = Listener(), Listener()
    first.send_head(one, "POST", "/", GET, 1, (b"x",), True, 10.0)
    second.send_head(two, "POST", "/", GET, 1, (b"y",), True, 10.0)
    pair.pump()
    sid1, _ = pair.requests()
    pair.server.close_connection(last_stream_id=sid1)
    pair.pump()
    assert two.events == [("failed", "The upstream refused the stream (HTTP/2 GOAWAY or REFUSED_STREAM).")]
    assert not pair.client.is_available()
    # h2 would have closed its state machine: the stream at or below last_stream_id finishes.
    pair.server.state_machine.state = pair.server.state_machine.state.__class__.SERVER_OPEN
    pair.server.send_headers(sid1, [(b":status", b"201")], end_stream=True)
    pair.pump()
    assert one.events == [("head", 201), ("end", None)]
    assert pair.wire.closed  # its last stream done, the connection closes


@run
async def test_a_stream_over_a_limit_the_peer_lowered_is_refused_not_sent() -> None:
    pair = Pair({3: 2})  # SETTINGS_MAX_CONCURRENT_STREAMS
    first, second = pair.stream(), pair.stream()  # both reserved under the limit of 2
    first.send_head(Listener(), "GET", "/", GET, None, (), True, 10.0)
    pair.pump()
    pair.server.update_settings({3: 1})
    pair.pump()
    late = Listener()
    second.send_head(late, "GET", "/", GET, None, (), True, 10.0)
    pair.pump()
    assert late.events == [("failed", "The upstream refused the stream (HTTP/2 GOAWAY or REFUSED_STREAM).")]
    assert len(pair.requests()) == 1  # never sent past the target's limit


@run
async def test_many_streams_in_turn_keep_the_connection_state_small() -> None:
    pair = Pair({3: 4})
    for _ in range(100):
        stream = pair.stream()
        listener = Listener()
        stream.send_head(listener, "GET", "/", GET, None, (), True, 10.0)
        pair.pump()
        sid = pair.requests()[-1]
        pair.server.send_headers(sid, [(b":status", b"204")], end_stream=True)
        pair.pump()
        assert listener.events == [("head", 204), ("end", None)]
        stream.release()
    assert len(pair.requests()) == 100
    assert len(pair.client.h2.streams) <= 2 * 4 + 17  # finished streams are swept, not kept for good


@run
async def test_a_head_response_with_a_content_length_and_no_body_is_whole() -> None:
    pair = Pair()
    stream = pair.stream()
    listener = Listener()
    stream.send_head(listener, "HEAD", "/", GET, None, (), True, 10.0)
    pair.pump()
    (sid,) = pair.requests()
    pair.server.send_headers(sid, [(b":status", b"200"), (b"content-length", b"5")])
    pair.server.send_data(sid, b"", end_stream=True)  # h2 holds that to the length, but for HEAD
    pair.pump()
    assert listener.events == [("head", 200), ("end", None)]


@run
async def test_a_request_body_ends_with_its_last_data_frame_and_trailers_follow_it() -> None:
    pair = Pair()
    plain, trailed = pair.stream(), pair.stream()
    plain.send_head(Listener(), "POST", "/", GET, 4, (b"ab", b"cd"), True, 10.0)
    trailed.send_head(Listener(), "POST", "/", GET, None, (b"ef",), False, 10.0)
    trailed.send_end(Headers([(b"x-sum", b"1")]))
    pair.pump()
    sid1, sid2 = pair.requests()
    body = {sid1: b"", sid2: b""}
    for event in pair.events:
        if isinstance(event, DataReceived):
            body[event.stream_id] += event.data
    assert body == {sid1: b"abcd", sid2: b"ef"}
    ended = [e.stream_id for e in pair.events if isinstance(e, StreamEnded)]
    assert sorted(ended) == [sid1, sid2]
    trailers = [e for e in pair.events if type(e).__name__ == "TrailersReceived"]
    assert [(t.stream_id, list(t.headers)) for t in trailers] == [(sid2, [(b"x-sum", b"1")])]


def _raw_server(pair: Pair) -> None:
    """Let the test's server send what h2 would refuse to send (a broken target)."""
    pair.server.config.validate_outbound_headers = False
    pair.server.config.normalize_outbound_headers = False


@run
async def test_a_status_that_is_not_a_number_fails_the_connection_not_the_callback() -> None:
    pair = Pair()
    _raw_server(pair)
    stream = pair.stream()
    listener = Listener()
    stream.send_head(listener, "GET", "/", GET, None, (), True, 10.0)
    pair.pump()
    (sid,) = pair.requests()
    pair.server.send_headers(sid, [(b":status", b"2x0")], end_stream=True)
    pair.pump()
    assert listener.events == [("failed", "The upstream broke the HTTP/2 protocol (ProtocolError).")]
    assert pair.wire.closed


@run
async def test_trailers_with_a_pseudo_header_or_an_upper_case_name_fail_the_stream() -> None:
    for bad in ([(b":status", b"200")], [(b"Grpc-Status", b"0")]):
        pair = Pair()
        _raw_server(pair)
        stream = pair.stream()
        listener = Listener()
        stream.send_head(listener, "POST", "/", GET, 1, (b"x",), True, 10.0)
        pair.pump()
        (sid,) = pair.requests()
        pair.server.send_headers(sid, [(b":status", b"200")])
        pair.server.send_headers(sid, bad, end_stream=True)
        pair.pump()
        assert listener.events == [
            ("head", 200),
            ("failed", "The upstream broke the HTTP/2 protocol (ProtocolError)."),
        ], bad


@run
async def test_response_trailers_reach_the_listener_without_hop_by_hop_fields() -> None:
    pair = Pair()
    stream = pair.stream()
    listener = Listener()
    stream.send_head(listener, "POST", "/", GET, 1, (b"x",), True, 10.0)
    pair.pump()
    (sid,) = pair.requests()
    pair.server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    pair.server.send_headers(sid, [(b"grpc-status", b"0"), (b"x-request-id", b"theirs")], end_stream=True)
    pair.pump()
    assert listener.events == [("head", 200), ("end", [(b"grpc-status", b"0")])]


@run
async def test_a_request_head_over_one_frame_goes_out_with_continuation_frames() -> None:
    pair = Pair()
    stream = pair.stream()
    big = b"v" * 40_000  # over the default SETTINGS_MAX_FRAME_SIZE of 16384
    stream.send_head(Listener(), "GET", "/big", [*GET, (b"x-big", big)], None, (), True, 10.0)
    pair.pump()
    (request,) = [e for e in pair.events if isinstance(e, RequestReceived)]
    assert (b"x-big", big) in list(request.headers)
    assert any(isinstance(e, StreamEnded) for e in pair.events)


@run
async def test_a_target_that_shrinks_its_header_table_still_reads_our_heads() -> None:
    pair = Pair({1: 0})  # SETTINGS_HEADER_TABLE_SIZE: 0, acknowledged by a size update in the next block
    pair.pump()
    for path in ("/one", "/two"):
        stream = pair.stream()
        stream.send_head(Listener(), "GET", path, [*GET, (b"cookie", b"a=1")], None, (), True, 10.0)
        pair.pump()
    paths = [dict(e.headers)[b":path"] for e in pair.events if isinstance(e, RequestReceived)]
    assert paths == [b"/one", b"/two"]
