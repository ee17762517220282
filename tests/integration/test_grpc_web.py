"""gRPC-Web from an HTTP/1.1 client (as a browser's fetch would send it) to a plain grpcio
server: binary and text bodies, trailers as the last frame, CORS."""

from __future__ import annotations

import base64
import http.client
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from grpc_support import Compiled, GrpcOrigin, compiled
from support import GatewayThread

Start = Callable[..., GatewayThread]
SERVICE = "/bookstore.v1.Bookstore"


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    return compiled(tmp_path_factory.mktemp("proto"))


@pytest.fixture
def origin(kit: Compiled) -> Iterator[GrpcOrigin]:
    server = GrpcOrigin(kit)
    yield server
    server.stop()


def web_config(port: int, plugins: list[Any] | None = None) -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": [{"name": "web", "bind": "127.0.0.1:PORT"}],
        "upstreams": {"books": {"protocol": "h2c", "targets": [{"address": f"127.0.0.1:{port}"}]}},
        "routes": [
            {
                "name": "books",
                "match": {"path": SERVICE + "/"},
                "upstream": "books",
                "grpc_web": True,
                "plugins": plugins or [],
            }
        ],
        "log": {"access": False},
    }


def frame(message: Any) -> bytes:
    payload = message.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def parse_frames(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    messages, trailers, at = [], {}, 0
    while at < len(body):
        flag, size = body[at], int.from_bytes(body[at + 1 : at + 5], "big")
        data = body[at + 5 : at + 5 + size]
        assert len(data) == size, "a frame is cut short"
        if flag & 0x80:
            for line in data.decode().split("\r\n"):
                if line:
                    name, _, value = line.partition(":")
                    trailers[name.strip()] = value.strip()
        else:
            messages.append(data)
        at += 5 + size
    return messages, trailers


def decode_text(body: bytes) -> bytes:
    """What a gRPC-Web client does: decode 4 characters at a time (chunks may be padded)."""
    return b"".join(base64.b64decode(body[i : i + 4]) for i in range(0, len(body), 4))


def post(port: int, path: str, body: bytes | list[bytes], headers: dict[str, str]) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    if isinstance(body, list):
        conn.request("POST", path, body=iter(body), headers=headers, encode_chunked=True)
    else:
        conn.request("POST", path, body=body, headers=headers)
    return conn.getresponse()


@pytest.fixture
def gw(origin: GrpcOrigin, gateway: Start) -> GatewayThread:
    return gateway(web_config(origin.port))


def test_binary_unary_with_trailers_in_the_body(kit: Compiled, gw: GatewayThread) -> None:
    headers = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1", "x-meta": "m1"}
    response = post(gw.port, SERVICE + "/Echo", frame(kit.pb2.EchoRequest(text="web")), headers)
    body = response.read()
    assert response.status == 200
    assert response.getheader("content-type") == "application/grpc-web+proto"
    messages, trailers = parse_frames(body)
    answer = kit.pb2.EchoResponse.FromString(messages[0])
    assert answer.text == "web" and answer.metadata["x-meta"] == "m1"
    assert trailers["grpc-status"] == "0" and trailers["x-trailer"] == "t-value"


def test_text_form_split_inside_base64_groups(kit: Compiled, gw: GatewayThread) -> None:
    text = base64.b64encode(frame(kit.pb2.EchoRequest(text="split", blob=bytes(range(200)))))
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]  # 7: never a whole group
    headers = {"content-type": "application/grpc-web-text", "accept": "application/grpc-web-text"}
    response = post(gw.port, SERVICE + "/Echo", pieces, headers)
    body = response.read()
    assert response.status == 200
    assert response.getheader("content-type") == "application/grpc-web-text+proto"
    messages, trailers = parse_frames(decode_text(body))
    answer = kit.pb2.EchoResponse.FromString(messages[0])
    assert answer.text == "split" and answer.blob == bytes(range(200))
    assert trailers["grpc-status"] == "0"


def test_text_form_server_stream(kit: Compiled, gw: GatewayThread) -> None:
    text = base64.b64encode(frame(kit.pb2.StreamRequest(count=50, size=100)))
    response = post(gw.port, SERVICE + "/Stream", text, {"content-type": "application/grpc-web-text+proto"})
    messages, trailers = parse_frames(decode_text(response.read()))
    assert [kit.pb2.Chunk.FromString(m).index for m in messages] == list(range(50))
    assert trailers["grpc-status"] == "0"


def test_error_status_reaches_the_browser(kit: Compiled, gw: GatewayThread) -> None:
    request = frame(kit.pb2.EchoRequest(fail_code=7, fail_message="nope"))
    response = post(gw.port, SERVICE + "/Echo", request, {"content-type": "application/grpc-web"})
    body = response.read()
    assert response.status == 200
    _, trailers = parse_frames(body)
    status = response.getheader("grpc-status") or trailers.get("grpc-status")
    message = response.getheader("grpc-message") or trailers.get("grpc-message")
    assert (status, message) == ("7", "nope")


def test_bad_base64_is_refused(gw: GatewayThread) -> None:
    response = post(gw.port, SERVICE + "/Echo", b"!!!!", {"content-type": "application/grpc-web-text"})
    response.read()
    assert response.status == 200 and response.getheader("grpc-status") == "13"  # 400 -> INTERNAL


def test_gateway_answers_preflights_and_exposes_grpc_status(kit: Compiled, gw: GatewayThread) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request(
        "OPTIONS",
        SERVICE + "/Echo",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "x-grpc-web, content-type, x-custom",
        },
    )
    preflight = conn.getresponse()
    preflight.read()
    assert preflight.status == 204
    allowed = preflight.getheader("access-control-allow-headers") or ""
    assert "x-grpc-web" in allowed and "grpc-timeout" in allowed and "x-custom" in allowed
    assert "POST" in (preflight.getheader("access-control-allow-methods") or "")
    headers = {"content-type": "application/grpc-web+proto", "origin": "https://app.example"}
    response = post(gw.port, SERVICE + "/Echo", frame(kit.pb2.EchoRequest(text="x")), headers)
    response.read()
    assert response.getheader("access-control-allow-origin") == "*"
    assert response.getheader("access-control-expose-headers") == "grpc-status, grpc-message"


def test_a_cors_plugin_decides(kit: Compiled, origin: GrpcOrigin, gateway: Start) -> None:
    cors = {"cors": {"origins": ["https://good.example"], "headers": ["*"], "expose_headers": ["x-trailer"]}}
    gw = gateway(web_config(origin.port, [cors]))
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    preflight_headers = {"origin": "https://evil.example", "access-control-request-method": "POST"}
    conn.request("OPTIONS", SERVICE + "/Echo", headers=preflight_headers)
    refused = conn.getresponse()
    refused.read()
    assert refused.status == 403  # the plugin's answer, not the gateway's permissive one
    headers = {"content-type": "application/grpc-web+proto", "origin": "https://good.example"}
    response = post(gw.port, SERVICE + "/Echo", frame(kit.pb2.EchoRequest(text="x")), headers)
    response.read()
    assert response.getheader("access-control-allow-origin") == "https://good.example"
    assert response.getheader("access-control-expose-headers") == "x-trailer, grpc-status, grpc-message"


def test_grpc_web_over_http2(kit: Compiled, origin: GrpcOrigin, gateway: Start) -> None:
    """A browser on HTTP/2 speaks the same gRPC-Web: trailers still come in the body."""
    import httpx

    config = web_config(origin.port)
    config["listeners"][0]["http2"] = "prior_knowledge"
    gw = gateway(config)
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        text = base64.b64encode(frame(kit.pb2.StreamRequest(count=5, size=10)))
        reply = client.post(
            f"http://127.0.0.1:{gw.port}{SERVICE}/Stream",
            content=text,
            headers={"content-type": "application/grpc-web-text"},
        )
    assert reply.http_version == "HTTP/2"
    assert reply.headers["content-type"] == "application/grpc-web-text+proto"
    messages, trailers = parse_frames(decode_text(reply.content))
    assert [kit.pb2.Chunk.FromString(m).index for m in messages] == list(range(5))
    assert trailers["grpc-status"] == "0"


def test_the_upstream_gets_plain_grpc(gateway: Start) -> None:
    """What crosses toward the server: application/grpc (codec kept), te: trailers, the
    decoded body. An HTTP/2 origin that echoes what it got as JSON shows it."""
    import json

    from h2_support import H2Origin

    h2_origin = H2Origin()
    try:
        gw = gateway(web_config(h2_origin.port))
        data = b"\x00\x00\x00\x00\x03abc"
        response = post(
            gw.port,
            SERVICE + "/Echo",
            base64.b64encode(data),
            {"content-type": "application/grpc-web-text+proto", "x-grpc-web": "1"},
        )
        seen = json.loads(response.read())
    finally:
        h2_origin.stop()
    headers = dict((name, value) for name, value in seen["headers"])
    assert headers["content-type"] == "application/grpc+proto"
    assert headers["te"] == "trailers"
    assert seen["body_size"] == len(data)


def test_bad_base64_after_the_call_started(kit: Compiled, origin: GrpcOrigin, gw: GatewayThread) -> None:
    """Valid text first (the call reaches the server), then garbage: the call ends with an
    error status and the gateway goes on serving."""
    start = base64.b64encode(b"\x00\x00\x00\x10\x00")  # a frame header announcing 4096 bytes
    pieces = [start, b"AAAA" * 10, b"!!!!"]
    response = post(gw.port, SERVICE + "/Upload", pieces, {"content-type": "application/grpc-web-text"})
    body = response.read()
    status = response.getheader("grpc-status") or parse_frames(decode_text(body))[1].get("grpc-status")
    assert status is not None and status != "0"
    ok = post(
        gw.port, SERVICE + "/Echo", frame(kit.pb2.EchoRequest(text="still")), {"content-type": "application/grpc-web"}
    )
    assert parse_frames(ok.read())[1]["grpc-status"] == "0"
