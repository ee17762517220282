"""HTTP/1.1 reverse proxying end to end: real clients, a real gateway, real origins."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from support import CannedOrigin, raw_exchange, request, split_responses


def test_forwarded_headers_and_request_id(origins, gateway):
    origin = origins("a")
    gw = gateway(targets=[origin.port])
    reply = request(gw.port, path="/echo?q=1", headers={"X-Forwarded-For": "203.0.113.9", "Host": "API.example.com:81"})
    assert reply.status == 200
    seen = reply.json()
    assert seen["path"] == "/echo?q=1"
    headers = seen["headers"]
    assert headers["host"] == "API.example.com:81"  # Host preserved
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "API.example.com:81"
    assert headers["via"] == "1.1 bastion"
    assert headers["x-request-id"] == reply.header("X-Request-Id")
    assert reply.header("Via") == "1.1 bastion"


def test_valid_client_request_id_is_kept_invalid_is_replaced(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    kept = request(gw.port, headers={"X-Request-Id": "abc-123"})
    assert kept.header("X-Request-Id") == "abc-123"
    assert kept.json()["headers"]["x-request-id"] == "abc-123"
    replaced = request(gw.port, headers={"X-Request-Id": "bad id with spaces"})
    assert replaced.header("X-Request-Id") not in (None, "bad id with spaces")


def test_hop_by_hop_and_connection_listed_headers_removed(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    reply = request(
        gw.port,
        headers={"Connection": "keep-alive, X-Secret", "X-Secret": "1", "Keep-Alive": "timeout=5", "TE": "trailers"},
    )
    seen = reply.json()["headers"]
    for name in ("connection", "x-secret", "keep-alive", "te"):
        assert name not in seen


def test_upstream_hop_by_hop_headers_removed_toward_client(gateway):
    canned = CannedOrigin(
        b"HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nX-Internal: secret\r\nKeep-Alive: timeout=5\r\n"
        b"Upgrade: h2c\r\nContent-Length: 2\r\n\r\nok"
    )
    try:
        gw = gateway(targets=[canned.port])
        reply = request(gw.port)
        assert reply.status == 200 and reply.body == b"ok"
        assert reply.header("X-Internal") is None
        assert reply.header("Keep-Alive") is None
        assert reply.header("Upgrade") is None
    finally:
        canned.stop()


def test_client_sent_x_consumer_is_stripped(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    assert "x-consumer" not in request(gw.port, headers={"X-Consumer": "admin"}).json()["headers"]


def test_repeated_set_cookie_kept_apart(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    reply = request(gw.port, path="/cookies")
    assert len(reply.header_all("Set-Cookie")) == 2


def test_strip_prefix_and_routing_errors(origins, gateway):
    origin = origins()
    config = {
        "version": 1,
        "listeners": [{"name": "web", "bind": "127.0.0.1:PORT"}],
        "upstreams": {"app": {"targets": [{"address": origin.address}]}},
        "routes": [
            {"name": "v1", "match": {"path": "/v1/users", "methods": ["GET"]}, "upstream": "app", "strip_prefix": "/v1"}
        ],
        "log": {"access": False},
    }
    gw = gateway(config)
    assert request(gw.port, path="/v1/users/7?x=1").json()["path"] == "/users/7?x=1"
    missing = request(gw.port, path="/v2/users")
    assert missing.status == 404
    body = missing.json()
    assert body["error"] == "no_route" and body["request_id"] == missing.header("X-Request-Id")
    assert missing.header("Content-Type") == "application/json"
    wrong = request(gw.port, "DELETE", "/v1/users/7")
    assert wrong.status == 405
    assert wrong.header("Allow") == "GET, HEAD"
    assert wrong.json()["error"] == "method_not_allowed"
    assert request(gw.port, path="/v1/usersX").status == 404


def test_path_normalisation_routes_and_forwards_the_same_path(origins, gateway):
    public, admin = origins("public"), origins("admin")
    config = {
        "version": 1,
        "listeners": [{"name": "web", "bind": "127.0.0.1:PORT"}],
        "upstreams": {
            "public": {"targets": [{"address": public.address}]},
            "admin": {"targets": [{"address": admin.address}]},
        },
        "routes": [
            {"name": "admin", "match": {"path": "/admin"}, "upstream": "admin"},
            {"name": "public", "match": {"path": "/"}, "upstream": "public"},
        ],
        "log": {"access": False},
    }
    gw = gateway(config)
    for path in ("/public/../admin/x", "/%61dmin/x", "//admin//x", "/./admin/x"):
        seen = request(gw.port, path=path).json()
        assert seen["origin"] == "admin", path
        assert seen["path"] == "/admin/x", path
    encoded = request(gw.port, path="/public%2F..%2Fadmin")
    assert encoded.status == 400


def test_keep_alive_reuses_client_and_upstream_connections(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    try:
        for _ in range(20):
            assert request(gw.port, path="/plain", conn=conn).body == b"hello"
    finally:
        conn.close()
    assert origin.call(lambda: origin.origin.connections) == 1


def test_pipelined_requests_answered_in_order(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    batch = b"".join(
        b"GET /delay/%d?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (delay, n) for n, delay in enumerate((60, 0, 30, 0))
    )
    batch += b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    responses = split_responses(raw_exchange(gw.port, batch))
    assert [status for status, _, _ in responses] == [200] * 5
    paths = [json.loads(body)["path"] for _, _, body in responses]
    assert paths == ["/delay/60?n=0", "/delay/0?n=1", "/delay/30?n=2", "/delay/0?n=3", "/last"]


def test_chunked_request_and_response(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (b"hello ", b"chunked ", b"world")) + b"0\r\n\r\n"
    raw = b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body
    ((status, _, data),) = split_responses(raw_exchange(gw.port, raw))
    assert status == 200
    assert json.loads(data)["body_bytes"] == len(b"hello chunked world")
    stream = request(gw.port, path="/stream/50")
    assert stream.status == 200
    assert stream.header("Transfer-Encoding") == "chunked"
    assert len(stream.body.splitlines()) == 50


def test_http10_client_gets_close_delimited_body(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    data = raw_exchange(gw.port, b"GET /stream/3 HTTP/1.0\r\nHost: x\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert len(body.splitlines()) == 3


def test_head_204_304_have_no_body(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    try:
        head = request(gw.port, "HEAD", "/bytes/1000", conn=conn)
        assert head.status == 200 and head.body == b""
        assert request(gw.port, path="/status/204", conn=conn).body == b""
        assert request(gw.port, path="/status/304", conn=conn).body == b""
        # the connection is still in sync after the bodiless responses
        assert request(gw.port, path="/plain", conn=conn).body == b"hello"
    finally:
        conn.close()


def test_expect_100_continue(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = sock.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"hello")
        final = b""
        while b"body_bytes" not in final:
            final += sock.recv(65536)
    assert b"HTTP/1.1 200" in final and b'"body_bytes": 5' in final
    seen = final.partition(b"\r\n\r\n")[2]
    assert b"expect" not in seen.lower()


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "CL+TE"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", "two CL"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3x\r\n\r\nabc", "bad CL"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc", "TE not chunked"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", "TE chunked not last"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", "bad chunk"),
        (b"GET / HTTP/1.1\r\n\r\n", "no Host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "two Hosts"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", "space in name"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n Folded: 1\r\n\r\n", "obs-fold"),
        (b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", "NUL in target"),
        (b"GET /a%2fb HTTP/1.1\r\nHost: x\r\n\r\n", "encoded slash"),
        (b"HELLO\r\n\r\n", "not HTTP"),
    ],
)
def test_malformed_requests_get_400_and_close(origins, gateway, raw, why):
    origin = origins()
    gw = gateway(targets=[origin.port])
    data = raw_exchange(gw.port, raw)
    assert data.startswith(b"HTTP/1.1 400"), why
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), why
    assert b'"error": "bad_request"' in body, why
    assert origin.call(lambda: origin.origin.requests) == 0, why


def test_unknown_expectation_is_417(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    data = raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nExpect: something\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 417")
    assert origin.call(lambda: origin.origin.requests) == 0


def test_upstream_request_id_is_replaced_not_duplicated(gateway):
    canned = CannedOrigin(b"HTTP/1.1 200 OK\r\nX-Request-Id: from-upstream\r\nContent-Length: 2\r\n\r\nok")
    try:
        gw = gateway(targets=[canned.port])
        reply = request(gw.port, headers={"X-Request-Id": "mine"})
        assert reply.header_all("X-Request-Id") == ["mine"]
    finally:
        canned.stop()


def test_smuggling_attempt_does_not_reach_upstream_as_second_request(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    smuggle = (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert raw_exchange(gw.port, smuggle).startswith(b"HTTP/1.1 400")
    assert origin.call(lambda: origin.origin.requests) == 0


def test_header_and_uri_limits(origins, gateway):
    origin = origins()
    gw = gateway(
        targets=[origin.port],
        listeners=[
            {
                "name": "web",
                "bind": "127.0.0.1:0",
                "limits": {"max_header_bytes": "4KB", "max_uri_bytes": 1024, "max_headers": 20},
            }
        ],
    )
    assert raw_exchange(gw.port, b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 414")
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n"
    assert raw_exchange(gw.port, big).startswith(b"HTTP/1.1 431")
    many = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(30)) + b"\r\n"
    assert raw_exchange(gw.port, many).startswith(b"HTTP/1.1 431")
    # a header that never ends is cut off at the limit, not buffered forever
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        reply = b""
        try:
            for _ in range(100):
                sock.sendall(b"z" * 1024)
        except OSError:
            pass
        try:
            reply = sock.recv(1024)
        except OSError:
            reply = b"(reset)"
        assert reply.startswith(b"HTTP/1.1 431") or reply == b"(reset)"


def test_slow_header_and_idle_keepalive_are_timed_out(origins, gateway):
    origin = origins()
    gw = gateway(
        targets=[origin.port],
        listeners=[{"name": "web", "bind": "127.0.0.1:0", "timeouts": {"header": "300ms", "keepalive": "300ms"}}],
    )
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
        start = time.monotonic()
        assert sock.recv(1024) == b""
        assert time.monotonic() - start < 3
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    request(gw.port, path="/plain", conn=conn)
    time.sleep(0.8)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        conn.request("GET", "/plain")
        conn.getresponse()
    conn.close()


def test_absolute_form_target_uses_its_authority(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    data = raw_exchange(
        gw.port, b"GET http://Example.org:8000/p?q=1 HTTP/1.1\r\nHost: ignored\r\nConnection: close\r\n\r\n"
    )
    ((status, _, body),) = split_responses(data)
    seen = json.loads(body)
    assert status == 200
    assert seen["path"] == "/p?q=1"
    assert seen["headers"]["host"] == "Example.org:8000"
