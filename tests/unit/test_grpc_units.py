"""gRPC pieces without sockets: content-types, grpc-timeout, messages, gRPC-Web framing."""

from __future__ import annotations

import base64

import pytest

from bastion.errors import BadRequest, GatewayError, NoHealthyTarget, NotFound, UpstreamTimeout
from bastion.http import grpc
from bastion.http.grpc_web import Base64Decoder, trailer_frame


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (b"application/grpc", grpc.GRPC),
        (b"application/grpc+proto", grpc.GRPC),
        (b"Application/GRPC+json; charset=x", grpc.GRPC),
        (b"application/grpc-web", grpc.GRPC_WEB),
        (b"application/grpc-web+proto", grpc.GRPC_WEB),
        (b"application/grpc-web-text", grpc.GRPC_WEB_TEXT),
        (b"application/grpc-web-text+proto", grpc.GRPC_WEB_TEXT),
        (b"application/grpcx", grpc.NOT_GRPC),
        (b"application/grpc-webx", grpc.NOT_GRPC),
        (b"application/json", grpc.NOT_GRPC),
        (None, grpc.NOT_GRPC),
    ],
)
def test_content_types(value: bytes | None, kind: int) -> None:
    assert grpc.grpc_kind(value) == kind


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"100m", 0.1),
        (b"5S", 5.0),
        (b"1H", 3600.0),
        (b"2M", 120.0),
        (b"7u", 7e-6),
        (b"9n", 9e-9),
        (b"99999999S", 99999999.0),
        (b"123456789S", None),  # at most 8 digits
        (b"5s", None),
        (b"S", None),
        (b"-1S", None),
        (b"1.5S", None),
        (b"", None),
    ],
)
def test_parse_timeout(value: bytes, seconds: float | None) -> None:
    got = grpc.parse_timeout(value)
    assert got == pytest.approx(seconds) if seconds is not None else got is None


def test_format_timeout_round_trips() -> None:
    for seconds in (0.25, 3.0, 1e6):
        parsed = grpc.parse_timeout(grpc.format_timeout(seconds))
        assert parsed is not None and parsed >= seconds


def test_messages_are_percent_encoded() -> None:
    assert grpc.encode_message("plain text") == b"plain text"
    assert grpc.encode_message("50% off\né") == b"50%25 off%0A%C3%A9"
    assert grpc.decode_message(b"50%25 off%0A%C3%A9") == "50% off\né"
    assert grpc.decode_message(b"bad %zz escape %") == "bad %zz escape %"


def test_error_statuses() -> None:
    assert grpc.status_for_error(NotFound()) == grpc.UNIMPLEMENTED
    assert grpc.status_for_error(NoHealthyTarget()) == grpc.UNAVAILABLE
    assert grpc.status_for_error(UpstreamTimeout()) == grpc.DEADLINE_EXCEEDED
    assert grpc.status_for_error(GatewayError()) == grpc.INTERNAL
    assert grpc.status_from_http(418) == grpc.UNKNOWN
    response, body = grpc.render_grpc(NotFound("No route, 100%."))
    assert response.status == 200 and body == b""
    assert response.headers.get("grpc-status") == "12"
    assert response.headers.get("grpc-message") == "No route, 100%25."
    assert grpc.http_from_status(grpc.NOT_FOUND) == 404
    assert grpc.http_from_status(99) == 500


def test_base64_decoder_takes_any_split() -> None:
    data = bytes(range(256)) * 3
    text = base64.b64encode(data)
    for step in (1, 2, 3, 5, 7, 64):
        decoder = Base64Decoder()
        out = b"".join(decoder.feed(text[i : i + step]) for i in range(0, len(text), step))
        assert out + decoder.end() == data


def test_base64_decoder_takes_padded_chunks() -> None:
    parts = [b"a", b"bc", b"def", b"ghij"]
    text = b"".join(base64.b64encode(p) for p in parts)  # each chunk padded on its own
    for step in (3, len(text)):  # small reads, and everything in one read
        decoder = Base64Decoder()
        out = b"".join(decoder.feed(text[i : i + step]) for i in range(0, len(text), step))
        assert out + decoder.end() == b"".join(parts)


def test_base64_decoder_skips_line_breaks() -> None:
    decoder = Base64Decoder()
    out = decoder.feed(b"aGVs\r\nbG8g") + decoder.feed(b"d29y bGQ=\n")
    assert out + decoder.end() == b"hello world"


def test_base64_decoder_refuses() -> None:
    with pytest.raises(BadRequest):
        Base64Decoder().feed(b"ab!d")
    decoder = Base64Decoder()
    decoder.feed(b"abc")
    with pytest.raises(BadRequest):
        decoder.end()


def test_trailer_frame() -> None:
    frame = trailer_frame([(b"grpc-status", b"0"), (b"X-Meta", b"v")])
    assert frame[0] == 0x80
    assert int.from_bytes(frame[1:5], "big") == len(frame) - 5
    assert frame[5:] == b"grpc-status: 0\r\nx-meta: v\r\n"


def test_grpc_web_needs_an_http2_upstream() -> None:
    from bastion.config.loader import load_config_text
    from bastion.errors import ConfigError

    text = """
version: 1
listeners: [{name: web, bind: "127.0.0.1:8080"}]
upstreams: {a: {targets: [{address: "127.0.0.1:9"}]}}
routes: [{name: r, upstream: a, grpc_web: true}]
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "c.yaml")
    assert "c.yaml:5: routes[0].grpc_web:" in "\n".join(info.value.problems)
    assert "h2 or h2c" in "\n".join(info.value.problems)


def test_grpc_json_needs_an_http2_upstream() -> None:
    from bastion.config.loader import load_config_text
    from bastion.errors import ConfigError

    text = """
version: 1
listeners: [{name: web, bind: "127.0.0.1:8080"}]
upstreams: {a: {targets: [{address: "127.0.0.1:9"}]}}
routes:
  - name: r
    upstream: a
    plugins:
      - grpc_json: {descriptor: api.pb}
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "c.yaml")
    assert "c.yaml:9: routes[0].plugins[0].grpc_json: upstream 'a' speaks http1" in "\n".join(info.value.problems)
