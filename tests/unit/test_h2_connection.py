"""The frame buffer whose HEADERS and DATA frames skip hyperframe's costly repr."""

from __future__ import annotations

from hyperframe.frame import DataFrame, HeadersFrame, PingFrame

from bastion.proto.h2_connection import QuietFrameBuffer


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
