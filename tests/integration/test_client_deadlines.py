"""Clients that trickle, stall or never read cannot hold a connection or grow the gateway.

Every byte state of a client connection has a deadline that more trickled bytes cannot push
back, and a client that does not read its responses stops being read.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

from support import free_port, simple_config, split_responses


def _config(origin_port: int, timeouts: dict[str, str] | None = None, **limits: Any) -> dict[str, Any]:
    config = simple_config(free_port(), [origin_port])
    config["listeners"][0]["bind"] = "127.0.0.1:PORT"
    if timeouts:
        config["listeners"][0]["timeouts"] = timeouts
    if limits:
        config["listeners"][0]["limits"] = limits
    return config


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Read until the peer closes (True) or `seconds` pass (False); also what was read."""
    deadline = time.monotonic() + seconds
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return True, data
        if not chunk:
            return True, data
        data += chunk
    return False, data


def test_partial_next_head_after_a_complete_request_times_out(origins, gateway):
    origin = origins()
    gw = gateway(_config(origin.port, {"header": "1s", "keepalive": "60s"}))
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nG")  # one request, and one byte of the next
        started = time.monotonic()
        closed, data = _closed_within(sock, 5)
    assert closed, "the connection outlived the header timeout"
    assert time.monotonic() - started < 3
    assert [status for status, _, _ in split_responses(data)] == [200]


def test_trickled_head_times_out_from_its_first_byte(origins, gateway):
    origin = origins()
    gw = gateway(_config(origin.port, {"header": "1s"}))
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        started = time.monotonic()
        closed_at = None
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed_at = time.monotonic()
                break
            sock.settimeout(0.1)
            try:
                if sock.recv(1024) == b"":
                    closed_at = time.monotonic()
                    break
            except TimeoutError:
                pass
            if time.monotonic() - started > 5:
                break
    assert closed_at is not None and closed_at - started < 2.5


def test_trickled_body_is_cut_by_the_minimum_rate(origins, gateway):
    origin = origins()
    gw = gateway(_config(origin.port, {"body": "1s"}, min_body_rate="100B"))
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        started = time.monotonic()
        answer = b""
        while time.monotonic() - started < 6 and not answer:
            try:
                sock.sendall(b"x")  # a byte every 0.2 s: well inside the 1 s gap timeout
            except OSError:
                break
            sock.settimeout(0.2)
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                answer = sock.recv(65536)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert b"too slowly" in answer
    assert elapsed < 3


def test_a_client_that_never_reads_stops_being_served(origins, gateway):
    origin = origins()
    gw = gateway(_config(origin.port))
    request = b"GET /bytes/10000 HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gw.port))
        sock.sendall(request * 3000)  # 114 KB of requests asking for 30 MB, never read
        served = []
        for _ in range(6):
            time.sleep(0.25)
            served.append(origin.origin.requests)
    # Kernel buffers hold a few MB of responses; then the gateway stops starting exchanges and,
    # with 8 waiting, stops parsing and reading. Without the bound, it served all 3000.
    assert served[-1] < 1000, served
    assert served[-1] == served[-3], f"still serving a client that does not read: {served}"


def test_many_pipelined_requests_in_one_read_are_all_answered_in_order(origins, gateway):
    origin = origins()
    gw = gateway(_config(origin.port))
    data = b"".join(b"GET /n%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(300))
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(data + b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        closed, received = _closed_within(sock, 10)
    assert closed
    responses = split_responses(received)
    paths = [r[2].split(b'"path": "')[1].split(b'"')[0] for r in responses]
    assert paths == [b"/n%d" % i for i in range(300)] + [b"/last"]


def test_a_flood_behind_a_chunked_body_is_cut_at_the_pipeline_limit(origins, gateway):
    origin = origins()
    gw = gateway(_config(origin.port))
    flood = b"".join(b"GET /n%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(200))
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        time.sleep(0.2)  # the chunked body is arriving: its reads are parsed whole
        sock.sendall(b"0\r\n\r\n" + flood)
        closed, received = _closed_within(sock, 10)
    assert closed
    responses = split_responses(received)
    assert len(responses) == 1 + 64  # the upload, then the queue up to its limit
    assert [r[0] for r in responses] == [200] * len(responses)
    assert responses[-1][1]["connection"] == "close"
    assert all(r[1].get("connection") != "close" for r in responses[:-1])


def test_ordinary_pipelining_is_answered_in_full(origins, gateway):
    origin = origins()
    gw = gateway(_config(origin.port))
    data = b"".join(b"GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(40))
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        for i in range(0, len(data), 300):  # across several reads: paused and resumed, never cut
            sock.sendall(data[i : i + 300])
            time.sleep(0.005)
        sock.sendall(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        closed, received = _closed_within(sock, 10)
    assert closed
    assert len(split_responses(received)) == 41


def _flood(sock: socket.socket, request: bytes, per_send: int, seconds: float, gw: Any) -> list[dict[str, Any]]:
    """Send pipelined requests `per_send` at a time for `seconds`, never reading; sample stats."""
    sock.setblocking(False)
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(BlockingIOError):
            sock.send(request * per_send)
        time.sleep(0.002)
        samples += gw.call(_connection_stats(gw))
    return samples


def _connection_stats(gw: Any) -> Any:
    async def stats() -> list[dict[str, Any]]:
        return [conn.statistics() for conn in gw.gateway.connections]

    return stats()


def test_pipelining_without_reading_holds_a_bounded_queue(origins, gateway):
    origin = origins()
    gw = gateway(_config(origin.port))
    request = b"GET /bytes/20000 HTTP/1.1\r\nHost: x\r\n\r\n"
    for per_send in (10, 400):  # reads small enough to parse whole, and reads that are sliced
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", gw.port))
            samples = _flood(sock, request, per_send, 2.0, gw)
        assert samples
        assert max(s["queued"] for s in samples) <= 8 + 512 // len(request) + 1, per_send
        assert max(s["held_bytes"] for s in samples) <= 16 * 1024, per_send
        assert not samples[-1]["reading"], "still reading from a client that does not read"
        time.sleep(0.2)


def test_a_stalled_pipelined_head_lets_the_running_response_finish(origins, gateway):
    origin = origins()
    gw = gateway(_config(origin.port, {"header": "1s"}))
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"GET /delay/2000 HTTP/1.1\r\nHost: x\r\n\r\nG")
        closed, data = _closed_within(sock, 6)
    assert closed
    ((status, headers, _),) = split_responses(data)
    assert status == 200
    assert headers["connection"] == "close"


def test_a_client_far_ahead_of_its_answers_is_read_a_little_at_a_time(origins, gateway):
    origin = origins()
    gw = gateway(_config(origin.port))
    request = b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(request * 2000 + b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        samples = []
        received = b""
        sock.settimeout(0.005)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(8192)
            except TimeoutError:
                chunk = None
            if chunk == b"":
                break
            received += chunk or b""
            samples += gw.call(_connection_stats(gw))
    assert received.count(b"HTTP/1.1 200 ") == 2001
    assert max(s["held_bytes"] for s in samples) <= 16 * 1024  # one head-sized read, then 4 KB reads
