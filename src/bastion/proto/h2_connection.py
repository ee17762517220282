"""h2's server connection as the gateway uses it: settings from the listener's limits, the
lean HPACK coders, a bounded header-block buffer, and three shortcuts on the per-request path
(sending HEADERS and DATA, receiving a request's HEADERS).

The shortcuts lean on h2 internals (`H2Connection._data_to_send`, `highest_inbound_stream_id`,
`H2Stream.state_machine`, `H2Stream._initialize_content_length`); h2 is pinned below 5 and
the tests cover each path.
"""

from __future__ import annotations

import struct
from typing import cast

import h2.config
import h2.connection
import h2.exceptions
import h2.settings
import h2.stream
from h2.events import Event
from h2.frame_buffer import FrameBuffer
from h2.utilities import is_informational_response
from hyperframe.frame import DataFrame, Frame, HeadersFrame

from bastion.config.schema import ListenerLimits
from bastion.http.model import HeaderList
from bastion.proto.hpack_in import FastDecoder
from bastion.proto.hpack_out import StatelessEncoder


def _hash_inputs_by_identity() -> None:
    """Make h2's state-machine lookups hash in C.

    Each stream input (five per request) and connection input looks up `(state, input)` in a
    transition table; `Enum.__hash__` is Python code (it hashes the member's name). Enum
    members compare by identity, so identity hashing keeps every lookup's answer; the two
    tables are rebuilt so their stored hashes match. Idempotent."""
    stream_machine = h2.stream
    connection_machine = h2.connection.H2ConnectionStateMachine
    for kind in (h2.stream.StreamInputs, h2.connection.ConnectionInputs, h2.connection.ConnectionState):
        if kind.__hash__ is not object.__hash__:
            kind.__hash__ = object.__hash__  # type: ignore[method-assign]
    stream_machine._transitions = {key: value for key, value in stream_machine._transitions.items()}
    connection_machine._transitions = {key: value for key, value in connection_machine._transitions.items()}


_hash_inputs_by_identity()


class _QuietHeadersFrame(HeadersFrame):
    def __repr__(self) -> str:
        return "HeadersFrame"


class _QuietDataFrame(DataFrame):
    def __repr__(self) -> str:
        return "DataFrame"


_QUIET: dict[type[Frame], type[Frame]] = {HeadersFrame: _QuietHeadersFrame, DataFrame: _QuietDataFrame}


class QuietFrameBuffer(FrameBuffer):
    """h2's frame buffer, whose HEADERS and DATA frames have a constant `repr`.

    h2 formats `repr(frame)` of every frame it receives for a trace log it then drops (the
    call is made before the logger is asked); hyperframe's repr renders the flags and the
    payload. The frames are the same objects, of a subclass that only answers `repr`
    cheaply; `FastSendConnection` routes them to h2's own handlers."""

    def __next__(self) -> Frame:
        frame = super().__next__()
        quiet = _QUIET.get(frame.__class__)
        if quiet is not None:
            frame.__class__ = quiet
        return frame


class BoundedFrameBuffer(QuietFrameBuffer):
    """h2's frame buffer, with the header block being assembled bounded by the header limit.

    h2 keeps HEADERS and CONTINUATION frames until END_HEADERS (up to 64 frames, so 1 MB at the
    default frame size) before decoding anything; the HPACK-encoded block is never larger than
    the decoded list plus a few bytes per field, so over `limit` it can only be refused."""

    def __init__(self, limit: int) -> None:
        super().__init__(server=True)
        self.limit = limit

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        result = super()._update_header_buffer(f)
        pending = self._headers_buffer
        if pending and sum(len(frame.data) for frame in pending) > self.limit:
            raise h2.exceptions.DenialOfServiceError("header block over the limit")
        return result


_FRAME_HEAD = struct.Struct(">HBBBL")  # 24-bit length (as 16 + 8), type, flags, stream id
_HEADERS, _DATA = 0x1, 0x0
_END_STREAM, _END_HEADERS = 0x1, 0x4
_SEND_HEADERS = h2.stream.StreamInputs.SEND_HEADERS
_SEND_DATA = h2.stream.StreamInputs.SEND_DATA
_SEND_END_STREAM = h2.stream.StreamInputs.SEND_END_STREAM


_SEND_HEADERS_CONN = h2.connection.ConnectionInputs.SEND_HEADERS
_CLIENT_IDS = h2.connection.AllowedStreamIDs.ODD


class FastSendConnection(h2.connection.H2Connection):
    """h2's connection with a shorter way to send HEADERS and DATA.

    h2's `send_headers` and `send_data` normalise, validate and re-encode each field, build
    frame objects and serialize them; here the stream's state machine gets the same inputs,
    the windows the same debits, and the frame bytes are appended to h2's output buffer
    directly. The encoder must be a `StatelessEncoder`. A head that needs CONTINUATION frames
    goes through h2.
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        table = self._frame_dispatch_table
        for plain, quiet in _QUIET.items():
            table[quiet] = table[plain]  # the frames of a QuietFrameBuffer

    def fast_headers(self, stream_id: int, headers: HeaderList, end_stream: bool) -> None:
        """HEADERS (a response head or trailers) on a stream h2 knows."""
        block = cast(StatelessEncoder, self.encoder).encode(headers)
        size = len(block)
        stream = self.streams.get(stream_id)
        if stream is None or size > self.max_outbound_frame_size:
            self.send_headers(stream_id, headers, end_stream=end_stream)
            return
        machine = stream.state_machine
        machine.process_input(_SEND_HEADERS)
        flags = _END_HEADERS
        if end_stream:
            machine.process_input(_SEND_END_STREAM)
            flags |= _END_STREAM
        elif machine.trailers_sent:
            raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set.")
        self._data_to_send += _FRAME_HEAD.pack(size >> 8, size & 0xFF, _HEADERS, flags, stream_id) + block

    def fast_open(
        self, stream_id: int, headers: HeaderList, end_stream: bool, method: bytes, authority: bytes, open_now: int
    ) -> None:
        """A client's request HEADERS opening a new stream, as h2's `send_headers` would:
        the same limit on open streams, the same connection and stream state, the request
        method kept (h2 needs it to know a HEAD response has no body).

        `open_now` is the caller's count of its open streams. h2 counts by walking every
        stream it still holds, closed ones included until that walk sweeps them: done here
        only when the caller's count reaches the limit, or once enough closed ones piled up."""
        block = cast(StatelessEncoder, self.encoder).encode(headers)
        size = len(block)
        if size > self.max_outbound_frame_size or stream_id in self.streams:
            self.send_headers(stream_id, headers, end_stream=end_stream)
            return
        limit = self.remote_settings.max_concurrent_streams
        if open_now + 1 > limit or len(self.streams) > 2 * limit + 16:
            count = self.open_outbound_streams  # the walk (and sweep)
            if count + 1 > limit:
                raise h2.exceptions.TooManyStreamsError(f"Max outbound streams is {limit}")
        self.state_machine.process_input(_SEND_HEADERS_CONN)
        stream = self._begin_new_stream(stream_id, _CLIENT_IDS)
        machine = stream.state_machine
        machine.process_input(_SEND_HEADERS)
        flags = _END_HEADERS
        if end_stream:
            machine.process_input(_SEND_END_STREAM)
            flags |= _END_STREAM
        stream._authority = authority
        stream.request_method = method
        self._data_to_send += _FRAME_HEAD.pack(size >> 8, size & 0xFF, _HEADERS, flags, stream_id) + block

    def fast_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool) -> None:
        """DATA within the windows (the caller checked them), as h2's `send_data` would."""
        stream = self.streams.get(stream_id)
        if stream is None:
            self.send_data(stream_id, data, end_stream=end_stream)
            return
        machine = stream.state_machine
        machine.process_input(_SEND_DATA)
        flags = 0
        if end_stream:
            machine.process_input(_SEND_END_STREAM)
            flags = _END_STREAM
        size = len(data)
        buffer = self._data_to_send
        buffer += _FRAME_HEAD.pack(size >> 8, size & 0xFF, _DATA, flags, stream_id)
        buffer += data
        self.outbound_flow_control_window -= size
        stream.outbound_flow_control_window -= size


_RECV_HEADERS_CONN = h2.connection.ConnectionInputs.RECV_HEADERS
_RECV_HEADERS = h2.stream.StreamInputs.RECV_HEADERS
_RECV_END_STREAM = h2.stream.StreamInputs.RECV_END_STREAM
_SERVER_IDS = h2.connection.AllowedStreamIDs.ODD  # the ids a client opens


class ServerConnection(FastSendConnection):
    """The server side: h2 with the fast sending path, a shorter way to receive a request's
    HEADERS, and a cheaper count of open streams.

    Counting open streams: h2 walks every stream on each new one, and a stream over the
    limit would end the connection; the limit is H2Server's (a stream error).
    """

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[Event]]:
        """HEADERS opening a stream, as h2's handler would receive it: the same stream limit,
        the same inputs to the connection's and the stream's state machines, the same
        expected Content-Length. What it leaves out is h2's inbound header pipeline, which
        `server_connection` switches off (no validation, normalisation or decoding: the list
        is used as HPACK decoded it). Trailers, a PRIORITY flag and a `:status` go through h2."""
        stream_id = frame.stream_id
        if stream_id in self.streams or "PRIORITY" in frame.flags or not self._lean_inbound:
            return super()._receive_headers_frame(frame)
        limit = self.local_settings.max_concurrent_streams
        count = self.open_inbound_streams
        if count + 1 > limit:
            raise h2.exceptions.TooManyStreamsError(f"Max inbound streams is {limit}, {count} open")
        headers = h2.connection._decode_headers(self.decoder, frame.data)
        events = self.state_machine.process_input(_RECV_HEADERS_CONN)
        stream = self._open_inbound(stream_id)
        end_stream = "END_STREAM" in frame.flags
        if is_informational_response(headers):  # h2 makes it an error: let h2 say which
            frames, stream_events = stream.receive_headers(headers, end_stream, None)
            return frames, events + stream_events
        machine = stream.state_machine
        stream_events = machine.process_input(_RECV_HEADERS)
        head = stream_events[0]
        if end_stream:
            ended = machine.process_input(_RECV_END_STREAM)
            head.stream_ended = ended[0]  # type: ignore[attr-defined]
            stream_events += ended
        stream._initialize_content_length(headers)
        head.headers = headers if isinstance(headers, list) else list(headers)  # type: ignore[attr-defined]
        return [], events + stream_events

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self._lean_inbound = not (
            config.validate_inbound_headers
            or config.normalize_inbound_headers
            or isinstance(config.header_encoding, str)
        )

    def _open_inbound(self, stream_id: int) -> h2.stream.H2Stream:
        """A client's new stream, as h2's `_begin_new_stream` makes it (the same id checks,
        windows and frame size) without its three debug-log calls."""
        if stream_id % 2 != 1:
            raise h2.exceptions.ProtocolError("Invalid stream ID for peer.")
        highest = self.highest_inbound_stream_id
        if stream_id <= highest:
            raise h2.exceptions.StreamIDTooLowError(stream_id, highest)
        stream = h2.stream.H2Stream(
            stream_id,
            config=self.config,
            inbound_window_size=self.local_settings.initial_window_size,
            outbound_window_size=self.remote_settings.initial_window_size,
        )
        stream.max_outbound_frame_size = self.max_outbound_frame_size
        self.streams[stream_id] = stream
        self.highest_inbound_stream_id = stream_id
        return stream

    @property
    def open_inbound_streams(self) -> int:
        # h2 would make a stream over the limit a connection error; H2Server refuses it alone
        # (RST_STREAM REFUSED_STREAM, RFC 9113 section 5.1.2). h2's count walks every stream
        # and sweeps the closed ones: done only once enough have piled up.
        if len(self.streams) > self.sweep_at:
            super().open_inbound_streams  # noqa: B018 - the sweep
        return 0

    sweep_at = 200
    """Twice the listener's SETTINGS_MAX_CONCURRENT_STREAMS (set by `server_connection`)."""


def server_connection(limits: ListenerLimits) -> ServerConnection:
    """A server-side connection announcing the listener's limits and enforcing them from the
    first frame (not only once the client acknowledges the SETTINGS)."""
    config = h2.config.H2Configuration(
        client_side=False,
        header_encoding=None,
        validate_inbound_headers=False,  # h2_request checks: a stream error, not the connection's
        normalize_inbound_headers=False,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        split_outbound_cookies=False,
    )
    conn = ServerConnection(config)
    codes = h2.settings.SettingCodes
    conn.local_settings = h2.settings.Settings(
        client=False,
        initial_values={
            codes.MAX_CONCURRENT_STREAMS: limits.h2_max_concurrent_streams,
            codes.INITIAL_WINDOW_SIZE: limits.h2_initial_window_size,
            codes.MAX_FRAME_SIZE: limits.h2_max_frame_size,
            codes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
            codes.ENABLE_PUSH: 0,
        },
    )
    conn.max_inbound_frame_size = limits.h2_max_frame_size
    conn.sweep_at = 2 * limits.h2_max_concurrent_streams
    conn.decoder = FastDecoder(limits.max_header_bytes)  # type: ignore[assignment]  # HPACK bomb: stops there
    conn.encoder = StatelessEncoder()  # type: ignore[assignment]
    conn.incoming_buffer = BoundedFrameBuffer(limits.max_header_bytes)  # CONTINUATION flood
    return conn
