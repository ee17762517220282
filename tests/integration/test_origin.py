"""The demo origin over real loopback sockets: the backend every other integration test trusts."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bastion.demo.origin import OriginHandle, start_origin_thread


@pytest.fixture
def origin() -> Iterator[OriginHandle]:
    with start_origin_thread("test-origin") as handle:
        yield handle


def connect(handle: OriginHandle) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", handle.port, timeout=5)


def get_json(response: http.client.HTTPResponse) -> Any:
    assert response.getheader("Content-Type") == "application/json"
    return json.loads(response.read())


def test_echo_reports_the_request(origin: OriginHandle) -> None:
    conn = connect(origin)
    conn.putrequest("GET", "/echo/a%20b?x=1&y=2", skip_accept_encoding=True)
    conn.putheader("X-Twice", "one")
    conn.putheader("X-Twice", "two")
    conn.putheader("X-Once", "only")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("X-Origin") == "test-origin"
    body = get_json(response)
    assert body["origin"] == "test-origin"
    assert body["method"] == "GET"
    assert body["path"] == "/echo/a%20b?x=1&y=2"
    assert body["headers"]["x-twice"] == ["one", "two"]
    assert body["headers"]["x-once"] == "only"
    assert body["body_bytes"] == 0


def test_chunked_upload_is_counted(origin: OriginHandle) -> None:
    parts = [b"a" * 1000, b"b" * 70_000, b"c"]
    conn = connect(origin)
    conn.request("POST", "/echo", body=iter(parts), encode_chunked=True)
    body = get_json(conn.getresponse())
    assert body["headers"]["transfer-encoding"] == "chunked"
    assert body["body_bytes"] == sum(map(len, parts))


def test_bytes_streams_in_chunks(origin: OriginHandle) -> None:
    size = 300_000  # four full 64 KB chunks and a short one
    conn = connect(origin)
    conn.request("GET", f"/bytes/{size}")
    response = conn.getresponse()
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.read() == b"x" * size


def test_bytes_respects_backpressure(origin: OriginHandle) -> None:
    size = 32 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", origin.port), timeout=10) as sock:
        sock.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        time.sleep(0.5)  # a client that does not read: the kernel buffers fill, then the origin must wait
        assert origin.call(origin.origin.buffered_bytes) < 512 * 1024
        received = 0
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
            if received >= size:
                break
    assert received >= size


def test_head_has_headers_but_no_body(origin: OriginHandle) -> None:
    conn = connect(origin)
    conn.request("HEAD", "/echo")
    response = conn.getresponse()
    assert response.status == 200
    assert int(response.getheader("Content-Length", "0")) > 0
    assert response.read() == b""
    conn.request("GET", "/plain")  # the connection is still in sync
    assert conn.getresponse().read() == b"hello"


def test_keep_alive_reuses_one_connection(origin: OriginHandle) -> None:
    conn = connect(origin)
    for path in ("/plain", "/echo", "/status/201", "/plain"):
        conn.request("GET", path)
        conn.getresponse().read()
    assert origin.origin.requests == 4
    assert origin.origin.connections == 1


def test_pipelined_requests_answer_in_order(origin: OriginHandle) -> None:
    with socket.create_connection(("127.0.0.1", origin.port), timeout=5) as sock:
        sock.sendall(
            b"GET /delay/100 HTTP/1.1\r\nHost: t\r\n\r\nGET /plain HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.index(b'"delay_ms": 100') < data.index(b"\r\n\r\nhello")


def test_health_flips(origin: OriginHandle) -> None:
    conn = connect(origin)
    conn.request("GET", "/healthz")
    assert conn.getresponse().read() == b"ok\n"
    conn.request("POST", "/admin/health?status=503")
    assert get_json(conn.getresponse())["health_status"] == 503
    conn.request("GET", "/healthz")
    response = conn.getresponse()
    response.read()
    assert response.status == 503
    origin.origin.healthy = True
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200


def test_status_cookies_and_stream(origin: OriginHandle) -> None:
    conn = connect(origin)
    conn.request("GET", "/status/418")
    response = conn.getresponse()
    assert response.status == 418
    assert get_json(response)["status"] == 418
    conn.request("GET", "/cookies")
    response = conn.getresponse()
    response.read()
    assert len(response.headers.get_all("Set-Cookie") or []) == 2
    conn.request("GET", "/stream/3")
    lines = conn.getresponse().read().splitlines()
    assert [json.loads(line)["line"] for line in lines] == [0, 1, 2]


def test_close_reset_and_garbage(origin: OriginHandle) -> None:
    conn = connect(origin)
    conn.request("GET", "/close")
    response = conn.getresponse()
    assert response.getheader("Connection") == "close"
    response.read()
    assert response.will_close

    for path, expected in (("/reset", b""), ("/garbage", b"\x00\xffTHIS IS NOT HTTP")):
        with socket.create_connection(("127.0.0.1", origin.port), timeout=5) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            assert data.startswith(expected) if expected else data == b""


def test_standalone_exits_cleanly_on_sigint() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "bastion.demo.origin", "--port", "0", "--name", "solo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        port = int(line.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/")
        assert get_json(conn.getresponse())["origin"] == "solo"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0
    assert "Traceback" not in stderr
