"""Cross-feature review: what an HTTP/2 client sends is held to the same rules as HTTP/1.1
(identity headers stripped, paths normalised, host picked once), and what an HTTP/1.1
upstream answers reaches the HTTP/2 client correctly, errors included."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import h2.events
import pytest

import support
from adversary import Close, Write, http_response
from bastion.demo.origin import OriginHandle
from h2_support import RawH2
from support import GatewayThread


def h2c(targets: list[str], **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "version": 1,
        "listeners": [{"name": "web", "bind": "127.0.0.1:PORT", "http2": "prior_knowledge"}],
        "upstreams": {"app": {"targets": [{"address": t} for t in targets]}},
        "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "app"}],
        "log": {"access": False},
    }
    config.update(extra)
    return config


@pytest.fixture
def origin(origins: Callable[..., OriginHandle]) -> OriginHandle:
    return origins("a")


def echo(client: RawH2, path: str = "/echo", **kwargs: Any) -> tuple[int, dict[str, Any]]:
    status, _, body = client.response(client.request(path, **kwargs))
    return status, json.loads(body)


def test_forged_identity_headers_are_stripped_over_http2(
    gateway: Callable[..., GatewayThread], origin: OriginHandle
) -> None:
    gw = gateway(h2c([origin.address]))
    forged = [(b"x-consumer", b"admin"), (b"x_consumer", b"admin"), (b"x-forwarded-host", b"evil.com")]
    with RawH2(gw.port) as client:
        status, seen = echo(client, extra=forged)
    assert status == 200
    headers = seen["headers"]
    assert "x-consumer" not in headers and "x_consumer" not in headers
    assert headers.get("x-forwarded-host") != "evil.com"


def test_host_and_authority_that_disagree_route_by_what_the_origin_sees(
    gateway: Callable[..., GatewayThread], origins: Callable[..., OriginHandle]
) -> None:
    good, evil = origins("good"), origins("evil")
    config = h2c([good.address])
    config["upstreams"]["evil"] = {"targets": [{"address": evil.address}]}
    config["routes"] = [
        {"name": "evil", "match": {"hosts": ["evil.com"], "path": "/"}, "upstream": "evil"},
        {"name": "good", "match": {"hosts": ["good.com"], "path": "/"}, "upstream": "app"},
    ]
    gw = gateway(config)
    with RawH2(gw.port) as client:
        stream = client.request("/echo", authority=b"good.com", extra=[(b"host", b"evil.com")])
        status, _, body = client.response(stream)
    if status == 200:
        seen = json.loads(body)
        # The origin must see the host the route was picked by.
        host = seen["headers"]["host"]
        assert (seen["origin"], host) in (("good", "good.com"), ("evil", "evil.com")), seen
    else:
        assert status == 400


def test_underscore_header_policy_applies_to_http2(gateway: Callable[..., GatewayThread], origin: OriginHandle) -> None:
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        status, seen = echo(client, extra=[(b"x_consumer", b"admin"), (b"x-fine", b"1")])
        status1 = status
    assert status1 in (200, 400)
    if status1 == 200:
        assert "x_consumer" not in seen["headers"]
        assert seen["headers"]["x-fine"] == "1"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/a/../echo", "/echo"),
        ("/a/%2e%2e/echo", "/echo"),
        ("/a/%2E%2E/echo", "/echo"),
        ("/a/./echo", "/a/echo"),
    ],
)
def test_dot_segments_in_path_are_resolved_like_http1(
    gateway: Callable[..., GatewayThread], origin: OriginHandle, path: str, expected: str
) -> None:
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        status, _, body = client.response(client.request(path))
    h1 = support.request(gw.port, path=path)
    assert status == h1.status
    if status == 200:
        assert json.loads(body)["path"] == h1.json()["path"]


def test_dot_segments_cannot_escape_a_prefix_route_over_http2(
    gateway: Callable[..., GatewayThread], origins: Callable[..., OriginHandle]
) -> None:
    public, admin = origins("public"), origins("admin")
    config = h2c([public.address])
    config["upstreams"]["admin"] = {"targets": [{"address": admin.address}]}
    config["routes"] = [
        {"name": "admin", "match": {"path": "/admin/"}, "upstream": "admin", "plugins": [{"key_auth": {}}]},
        {"name": "public", "match": {"path": "/"}, "upstream": "app"},
    ]
    gw = gateway(config)
    with RawH2(gw.port) as client:
        for path in ("/public/../admin/x", "/public/%2e%2e/admin/x", "/public/..%2fadmin/x", "/public\\..\\admin/x"):
            status, _, body = client.response(client.request(path))
            if status == 200:
                seen = json.loads(body)
                assert seen["origin"] == "public" and not seen["path"].startswith("/admin"), (path, seen)
            else:
                assert status in (400, 401), (path, status)


@pytest.mark.parametrize("path", ["*", "http://evil.com/echo"])
def test_asterisk_and_absolute_path_over_http2(
    gateway: Callable[..., GatewayThread], origin: OriginHandle, path: str
) -> None:
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        stream = client.request(path)
        client.until(lambda: client.of(h2.events.StreamEnded, stream) or client.of(h2.events.StreamReset, stream))
        heads = client.of(h2.events.ResponseReceived, stream)
        if heads:
            status = int(dict(heads[0].headers)[b":status"])
            assert status >= 400 or path != "*"
        assert client.response(client.request("/echo"))[0] == 200


def test_cookie_crumbs_are_joined_for_an_http1_origin(
    gateway: Callable[..., GatewayThread], origin: OriginHandle
) -> None:
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        status, seen = echo(client, extra=[(b"cookie", b"a=1"), (b"cookie", b"b=2")])
    assert status == 200
    assert seen["headers"]["cookie"] == "a=1; b=2"


# --- HTTP/1.1 upstream answers relayed to an HTTP/2 client -----------------------------------------


def test_chunked_response_with_trailers_from_an_http1_origin(
    gateway: Callable[..., GatewayThread], scripted_origin: Any
) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n"
    raw = head + b"3\r\nabc\r\n2\r\nde\r\n0\r\nx-sum: 5\r\n\r\n"
    origin = scripted_origin(reply=[Write(raw)])
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        stream = client.request("/x", extra=[(b"te", b"trailers")])
        status, headers, body = client.response(stream)
        trailers = client.of(h2.events.TrailersReceived, stream)
    assert status == 200 and body == b"abcde"
    assert b"transfer-encoding" not in headers
    assert trailers and dict(trailers[0].headers).get(b"x-sum") == b"5"


def test_early_hints_then_the_final_answer(gateway: Callable[..., GatewayThread], scripted_origin: Any) -> None:
    raw = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + http_response(200, b"done")
    origin = scripted_origin(reply=[Write(raw)])
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        status, _, body = client.response(client.request("/x"))
    assert status == 200 and body == b"done"


@pytest.mark.parametrize("code", [204, 304])
def test_a_bodiless_status_carrying_a_body_reaches_http2_without_it(
    gateway: Callable[..., GatewayThread], scripted_origin: Any, code: int
) -> None:
    raw = f"HTTP/1.1 {code} X\r\nContent-Length: 5\r\n\r\nhello".encode()
    origin = scripted_origin(reply=[Write(raw)])
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        status, _, body = client.response(client.request("/x"))
        assert status == code and body == b""
        assert not client.of(h2.events.StreamReset)
        status2, _, _ = client.response(client.request("/y"))
    assert status2 == code


def test_an_origin_that_closes_mid_body_resets_the_http2_stream(
    gateway: Callable[..., GatewayThread], scripted_origin: Any
) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100
    origin = scripted_origin(reply=[Write(raw), Close()])
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        stream = client.request("/x")
        client.until(lambda: client.of(h2.events.StreamReset, stream) or client.of(h2.events.StreamEnded, stream))
        assert client.of(h2.events.StreamReset, stream), "a truncated body must not end cleanly"
        assert not client.of(h2.events.StreamEnded, stream)


def test_an_origin_that_closes_mid_chunked_body_resets_the_http2_stream(
    gateway: Callable[..., GatewayThread], scripted_origin: Any
) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    origin = scripted_origin(reply=[Write(raw), Close()])
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        stream = client.request("/x")
        client.until(lambda: client.of(h2.events.StreamReset, stream) or client.of(h2.events.StreamEnded, stream))
        assert client.of(h2.events.StreamReset, stream)


def test_a_huge_response_head_is_a_502_and_the_connection_lives(
    gateway: Callable[..., GatewayThread], scripted_origin: Any
) -> None:
    big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\nContent-Length: 2\r\n\r\nok"
    good = http_response(200, b"fine")

    def reply(request: Any) -> list[Any]:
        return [Write(big if request.target == "/huge" else good)]

    origin = scripted_origin(reply=reply)
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        status, _, _ = client.response(client.request("/huge"))
        assert status == 502
        status, _, body = client.response(client.request("/fine"))
    assert status == 200 and body == b"fine"


def test_an_endless_response_head_is_a_502_for_an_http1_client(
    gateway: Callable[..., GatewayThread], scripted_origin: Any
) -> None:
    # One field that never ends: before the limit, the gateway buffered it without bound.
    endless = [Write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 60_000) for _ in range(10)]
    origin = scripted_origin(reply=endless)
    gw = gateway(h2c([origin.address]))
    reply = support.request(gw.port, path="/endless")
    assert reply.status == 502


HOP_BY_HOP = (
    b"Connection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
    b"Upgrade: h2c\r\nX-Secret: s\r\nTE: trailers\r\n"
)


def test_connection_specific_response_fields_never_reach_an_http2_client(
    gateway: Callable[..., GatewayThread], scripted_origin: Any
) -> None:
    """HTTP/2 forbids them (a client treats them as a protocol error): all are dropped."""
    raw = b"HTTP/1.1 200 OK\r\n" + HOP_BY_HOP + b"Content-Length: 2\r\n\r\nok"
    origin = scripted_origin(reply=[Write(raw)])
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:  # h2 validates what it receives
        status, headers, body = client.response(client.request("/x"))
    assert status == 200 and body == b"ok"
    for name in (b"connection", b"keep-alive", b"proxy-connection", b"upgrade", b"x-secret", b"te"):
        assert name not in headers, name


def test_forbidden_trailer_fields_from_an_http1_origin_are_dropped_for_http2(
    gateway: Callable[..., GatewayThread], scripted_origin: Any
) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
    trailers = b"Connection: close\r\nTransfer-Encoding: chunked\r\nKeep-Alive: 1\r\nTE: gzip\r\nX-Sum: 1\r\n\r\n"
    origin = scripted_origin(reply=[Write(head + trailers)])
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        stream = client.request("/x", extra=[(b"te", b"trailers")])
        status, _, body = client.response(stream)
        assert not client.of(h2.events.StreamReset, stream)
        (trailer,) = client.of(h2.events.TrailersReceived, stream)
        assert client.response(client.request("/y"))[0] == 200  # the connection lives
    assert status == 200 and body == b"ok"
    fields = dict(trailer.headers)
    assert fields.get(b"x-sum") == b"1"
    for name in (b"connection", b"transfer-encoding", b"keep-alive", b"te"):
        assert name not in fields, name


def test_a_content_length_in_the_trailers_is_a_502_and_the_http2_connection_lives(
    gateway: Callable[..., GatewayThread], scripted_origin: Any
) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nContent-Length: 2\r\n\r\n"
    origin = scripted_origin(reply=[Write(raw)])
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        assert client.response(client.request("/x"))[0] == 502
        assert client.response(client.request("/y"))[0] == 502


def test_a_close_delimited_http10_answer_ends_the_http2_stream_cleanly(
    gateway: Callable[..., GatewayThread], scripted_origin: Any
) -> None:
    origin = scripted_origin(reply=[Write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it"), Close()])
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        stream = client.request("/x")
        status, _, body = client.response(stream)
        assert not client.of(h2.events.StreamReset, stream)
    assert status == 200 and body == b"all of it"


def test_a_smuggling_response_is_a_502_over_http2(gateway: Callable[..., GatewayThread], scripted_origin: Any) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    origin = scripted_origin(reply=[Write(raw), Close()])
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        status, _, _ = client.response(client.request("/x"))
    assert status == 502


def test_grpc_json_over_http2_from_a_rest_client(gateway: Callable[..., GatewayThread], tmp_path: Any) -> None:
    from grpc_support import GrpcOrigin, compiled

    kit = compiled(tmp_path / "proto")
    origin = GrpcOrigin(kit)
    try:
        config = h2c([f"127.0.0.1:{origin.port}"])
        config["upstreams"]["app"]["protocol"] = "h2c"
        config["routes"][0]["plugins"] = [{"grpc_json": {"descriptor": str(kit.descriptor)}}]
        gw = gateway(config)
        with RawH2(gw.port) as client:
            status, headers, body = client.response(client.request("/v1/shelves/s/books/9"))
            assert status == 200 and json.loads(body)["title"] == "s:9"
            assert headers[b"content-type"].startswith(b"application/json")
            status, _, body = client.response(client.request("/v1/shelves/s/books/404"))
            assert status == 404 and json.loads(body)["error"] == "not_found"
    finally:
        origin.stop()


# --- pseudo-header values an HTTP/1.1 upstream would read as something else -------------------------

SMUGGLING = {
    "path-crlf": [(b":method", b"GET"), (b":path", b"/a HTTP/1.1\r\nHost: internal\r\n\r\nGET /admin")],
    "path-lf": [(b":method", b"GET"), (b":path", b"/a\nX-Injected: 1")],
    "path-space": [(b":method", b"GET"), (b":path", b"/public /admin")],
    "path-nul": [(b":method", b"GET"), (b":path", b"/a\x00b")],
    "path-tab": [(b":method", b"GET"), (b":path", b"/a\tb")],
    "path-del": [(b":method", b"GET"), (b":path", b"/a\x7f")],
    "path-non-ascii": [(b":method", b"GET"), (b":path", b"/a\x80")],
    "method-space": [(b":method", b"GET /admin"), (b":path", b"/public")],
    "method-crlf": [(b":method", b"GET\r\n"), (b":path", b"/public")],
    "method-empty": [(b":method", b""), (b":path", b"/public")],
    "method-separator": [(b":method", b"G(T"), (b":path", b"/public")],
}


@pytest.mark.parametrize("name", list(SMUGGLING))
def test_pseudo_header_values_cannot_smuggle_into_an_http1_request_line(
    gateway: Callable[..., GatewayThread], scripted_origin: Any, name: str
) -> None:
    """An HTTP/1.1 request line is `method SP target SP version CRLF`: a space, CR, LF or a
    control byte in :method or :path would let an HTTP/2 client write its own request line,
    headers or a second request to the upstream, past routing and authentication. Such a
    stream is malformed (RFC 9113 section 8.2.1 and 8.3.1; a method is a token)."""
    origin = scripted_origin(reply=[Write(http_response(200, b"ok"))])
    gw = gateway(h2c([origin.address]))
    fields = [*SMUGGLING[name], (b":scheme", b"http"), (b":authority", b"example.com")]
    with RawH2(gw.port) as client:
        stream = client.conn.get_next_available_stream_id()
        client.conn.send_headers(stream, fields, end_stream=True)
        client.flush()
        client.until(lambda: client.of(h2.events.StreamReset, stream) or client.of(h2.events.StreamEnded, stream))
        heads = client.of(h2.events.ResponseReceived, stream)
        assert not heads or dict(heads[0].headers)[b":status"] == b"400", heads
        assert client.response(client.request("/fine"))[0] == 200
    assert [r.target for r in origin.requests] == ["/fine"]
    assert all(raw.count(b" HTTP/1.1\r\n") == 1 for raw in origin.raw)


@pytest.mark.parametrize(
    "value",
    [
        b"1\r\n\r\nGET /admin HTTP/1.1\r\nHost: internal",
        b"1\r\nX-Injected: yes",
        b"1\nX-Injected: yes",
        b"a\x00b",
        b" 1",
    ],
    ids=["crlf-request", "crlf-field", "lf", "nul", "leading-space"],
)
def test_request_trailer_values_cannot_smuggle_into_an_http1_upstream(
    gateway: Callable[..., GatewayThread], scripted_origin: Any, value: bytes
) -> None:
    """Request trailers go to an HTTP/1.1 upstream at the end of a chunked body: a CR or LF in a
    value would end the trailers and start a request of the client's own on the upstream
    connection. The same rules as the head's values apply (RFC 9113 section 8.2.1)."""
    origin = scripted_origin(reply=[Write(http_response(200, b"ok"))])
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        stream = client.request("/upload", "POST", extra=[(b"te", b"trailers")], end=False)
        client.conn.send_data(stream, b"body")
        client.conn.send_headers(stream, [(b"x-checksum", value)], end_stream=True)
        client.flush()
        client.until(lambda: client.of(h2.events.StreamReset, stream) or client.of(h2.events.StreamEnded, stream))
    time.sleep(0.3)  # what reached the origin by now is all it gets
    sent = b"".join(bytes(raw) for raw in origin.raw)
    assert b"/admin" not in sent and b"x-injected" not in sent.lower()
    assert all(r.target == "/upload" for r in origin.requests)


@pytest.mark.parametrize("sent", [b"abcdefgh", b"a"], ids=["longer", "shorter"])
def test_a_body_that_disagrees_with_its_content_length_never_reaches_the_upstream_whole(
    gateway: Callable[..., GatewayThread], scripted_origin: Any, sent: bytes
) -> None:
    """content-length 3 with 8 or 1 bytes of DATA: the HTTP/1.1 upstream must never get bytes
    past the 3 it was told of (they would start the next request on its connection), nor a
    request that looks complete with fewer. (The gateway ends the whole connection with
    PROTOCOL_ERROR, as h2 does; RFC 9113 section 8.1.1 asks for a stream error.)"""
    origin = scripted_origin(reply=[Write(http_response(200, b"ok"))])
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        stream = client.request("/up", "POST", extra=[(b"content-length", b"3")], end=False)
        client.conn.send_data(stream, sent, end_stream=True)
        client.flush()
        client.until(lambda: client.goaway() or client.of(h2.events.StreamReset, stream))
    time.sleep(0.3)
    for raw in origin.raw:
        body = bytes(raw).partition(b"\r\n\r\n")[2]
        assert len(body) <= 3 and b"defgh" not in body
    assert not [r for r in origin.requests if r.target == "/up" and r.body == sent]


def test_a_grpc_json_body_larger_than_the_stream_window_over_http2(
    gateway: Callable[..., GatewayThread], tmp_path: Any
) -> None:
    """grpc_json collects the JSON body before it calls the upstream: over HTTP/2 the stream's
    window (64 KB) must still be re-opened as the plugin takes the bytes, or the upload stalls."""
    from grpc_support import GrpcOrigin, compiled

    kit = compiled(tmp_path / "proto")
    origin = GrpcOrigin(kit)
    try:
        config = h2c([f"127.0.0.1:{origin.port}"])
        config["upstreams"]["app"]["protocol"] = "h2c"
        config["routes"][0]["plugins"] = [{"grpc_json": {"descriptor": str(kit.descriptor)}}]
        config["listeners"][0]["timeouts"] = {"body": "5s"}
        gw = gateway(config)
        text = "x" * 300_000
        body = json.dumps({"text": text}).encode()
        with RawH2(gw.port, timeout=10) as client:
            stream = client.request(
                "/v1/echo",
                "POST",
                extra=[(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                end=False,
            )
            sent = 0
            deadline = time.monotonic() + 8
            while sent < len(body) and time.monotonic() < deadline:
                room = min(client.conn.local_flow_control_window(stream), client.conn.max_outbound_frame_size)
                if room <= 0:
                    client.read(0.05)
                    continue
                chunk = body[sent : sent + room]
                sent += len(chunk)
                client.conn.send_data(stream, chunk, end_stream=sent == len(body))
                client.flush()
            assert sent == len(body), f"stalled after {sent} bytes"
            status, _, answer = client.response(stream)
        assert status == 200 and json.loads(answer)["text"] == text
    finally:
        origin.stop()


def test_many_tiny_response_fields_are_a_502_and_the_connection_lives(
    gateway: Callable[..., GatewayThread], scripted_origin: Any
) -> None:
    """HTTP/2 peers count 32 bytes per field on top of its name and value (RFC 7541 section
    4.1): 2500 fields of 4 bytes are 90 KB to an HTTP/2 client, over the 64 KB it takes."""
    many = b"".join(b"x-%d: 1\r\n" % i for i in range(2500))
    big = b"HTTP/1.1 200 OK\r\n" + many + b"Content-Length: 2\r\n\r\nok"

    def reply(request: Any) -> list[Any]:
        return [Write(big if request.target == "/many" else http_response(200, b"fine"))]

    origin = scripted_origin(reply=reply)
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        status, _, _ = client.response(client.request("/many"))
        assert status == 502
        assert client.response(client.request("/fine"))[0] == 200
