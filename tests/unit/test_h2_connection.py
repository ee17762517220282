"""The frame buffer whose HEADERS and DATA frames skip hyperframe's costly repr."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.stream
import pytest
from hyperframe.frame import DataFrame, HeadersFrame, PingFrame

from bastion.config.schema import ListenerLimits
from bastion.proto.h2_connection import QuietFrameBuffer, server_connection


def test_frames_keep_their_kind_and_content_with_a_constant_repr() -> None:
    headers = HeadersFrame(1, b"\x82\x84", flags=["END_HEADERS"])
    data = DataFrame(1, b"x" * 100, flags=["END_STREAM"])
    ping = PingFrame(0, b"12345678")
    buffer = QuietFrameBuffer(server=True)
    buffer.max_frame_size = 16384
    buffer.add_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + headers.serialize() + data.serialize() + ping.serialize())
    frames = list(buffer)
    assert [isinstance(f, kind) for f, kind in zip(frames, (HeadersFrame, DataFrame, PingFrame), strict=True)] == [
        True
    ] * 3
    assert (frames[0].data, frames[1].data, frames[2].opaque_data) == (b"\x82\x84", b"x" * 100, b"12345678")
    assert "END_STREAM" in frames[1].flags
    assert (repr(frames[0]), repr(frames[1])) == ("HeadersFrame", "DataFrame")
    assert "PingFrame" in repr(frames[2])  # other frames are left as they are


def _client_bytes(*streams: tuple[int, list[tuple[bytes, bytes]], bool, bytes | None]) -> bytes:
    """What an h2 client sends: its preface and, per stream, HEADERS (and DATA)."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    for stream_id, headers, end_stream, data in streams:
        client.send_headers(stream_id, headers, end_stream=end_stream)
        if data is not None:
            client.send_data(stream_id, data, end_stream=True)
    return client.data_to_send()


REQUEST = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/a"), (b":authority", b"x")]


def _summary(events: list[h2.events.Event]) -> list[tuple[str, object, bool]]:
    return [
        (type(e).__name__, getattr(e, "headers", None), getattr(e, "stream_ended", None) is not None) for e in events
    ]


def test_request_headers_are_received_without_h2s_inbound_header_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _client_bytes((1, [*REQUEST, (b"x-a", b"1")], True, None), (3, REQUEST, False, b"abc"))
    h2_events = _summary(server_connection(ListenerLimits()).receive_data(data))

    def pipeline(*args: object) -> None:
        raise AssertionError("h2's inbound header pipeline ran")

    monkeypatch.setattr(h2.stream.H2Stream, "_build_hdr_validation_flags", pipeline)
    events = server_connection(ListenerLimits()).receive_data(data)
    assert _summary(events) == h2_events  # the same events, headers and END_STREAM as h2's own path
    kinds = [name for name, _, _ in _summary(events)]
    assert kinds.count("RequestReceived") == 2 and kinds.count("StreamEnded") == 2
    assert events[[type(e) for e in events].index(h2.events.RequestReceived)].headers[-1] == (b"x-a", b"1")


def test_a_body_longer_than_its_content_length_is_still_refused() -> None:
    data = _client_bytes((1, [*REQUEST, (b"content-length", b"2")], False, b"abcde"))
    with pytest.raises(h2.exceptions.InvalidBodyLengthError):  # the length was noted on the lean path
        server_connection(ListenerLimits()).receive_data(data)


def test_h2_state_machine_inputs_hash_in_c_and_still_find_their_transitions() -> None:
    member = h2.stream.StreamInputs.RECV_HEADERS
    assert hash(member) == object.__hash__(member)  # not Enum.__hash__, which is Python code
    state = h2.connection.ConnectionState.IDLE
    assert hash(state) == object.__hash__(state)
    machine = h2.stream.H2StreamStateMachine(1)
    assert [type(e) for e in machine.process_input(member)] == [h2.events.RequestReceived]
    with pytest.raises(h2.exceptions.ProtocolError):  # an input the state does not take still fails
        h2.stream.H2StreamStateMachine(3).process_input(h2.stream.StreamInputs.SEND_DATA)  # DATA on an idle stream


def _headers_frame(stream_id: int) -> bytes:
    block = b"\x82\x87\x84\x41\x01x"  # :method GET, :scheme https, :path /, :authority x
    return HeadersFrame(stream_id, block, flags=["END_HEADERS", "END_STREAM"]).serialize()


@pytest.mark.parametrize("ids", [(2,), (5, 3)], ids=["even id", "lower id"])
def test_a_client_stream_id_even_or_lower_than_the_last_one_is_a_connection_error(ids: tuple[int, ...]) -> None:
    conn = server_connection(ListenerLimits())
    conn.receive_data(_client_bytes())
    *accepted, refused = ids
    for stream_id in accepted:
        conn.receive_data(_headers_frame(stream_id))
    with pytest.raises(h2.exceptions.ProtocolError):
        conn.receive_data(_headers_frame(refused))
    assert refused not in conn.streams


def test_a_new_stream_takes_the_announced_window_and_frame_size() -> None:
    conn = server_connection(ListenerLimits(h2_initial_window_size=1 << 20))
    conn.receive_data(_client_bytes())
    conn.receive_data(_headers_frame(1))
    stream = conn.streams[1]
    assert stream.inbound_flow_control_window == 1 << 20
    assert stream.outbound_flow_control_window == 65535  # the client's default
    assert stream.max_outbound_frame_size == conn.max_outbound_frame_size
    assert conn.highest_inbound_stream_id == 1
