"""The adversarial kit checked against itself (no gateway): a broken kit would hide gateway bugs."""

from __future__ import annotations

import random
import time

import pytest

from adversary import (
    Close,
    Pause,
    PeerClosed,
    RawClient,
    ReadRequest,
    Reset,
    Write,
    http_response,
    trickle,
    wait_until,
)


def test_timeline_interim_chunked_trailers_and_recording(scripted_origin):
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n"
    origin = scripted_origin(
        reply=lambda req: [
            Write(http_response(103, b"", ("Link", "</a.css>"))),
            *trickle(chunked, random.Random(1), pieces=6),
        ]
    )
    with RawClient(origin.port) as client:
        client.send(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", piece=5, pause=0.001)
        client.send(b"2\r\nhi\r\n0\r\n\r\n")
        response = client.read_response()
        assert [h.status for h in response.interim] == [103]
        assert response.interim[0].header("link") == "</a.css>"
        assert (response.status, response.body, response.trailers) == (200, b"abcde", [("X-Sum", "5")])
        client.send(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.read_response().body == b"abcde"
    wait_until(lambda: len(origin.requests) == 2)
    first, second = origin.requests
    assert (first.method, first.target, first.body, first.number) == ("POST", "/up", b"hi", 0)
    assert (second.target, second.connection, second.number) == ("/again", 0, 1)
    assert origin.connections == 1
    assert origin.raw[0].startswith(b"POST /up HTTP/1.1\r\n")


def test_per_connection_timelines_close_and_reset(scripted_origin):
    origin = scripted_origin(
        connections=[
            [ReadRequest(), Write(b"HTTP/1.1 200 OK\r\n\r\nuntil close"), Close()],
            [ReadRequest(), Write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npart"), Pause(0.05), Reset()],
        ]
    )
    with RawClient(origin.port) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.read_response().body == b"until close"
        assert client.closed
    with RawClient(origin.port) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(PeerClosed) as cut:
            client.read_response()
        assert cut.value.reset
    assert origin.connections == 2


def test_stop_is_prompt_with_a_connection_mid_pause(scripted_origin):
    origin = scripted_origin(reply=[Pause(30), Write(http_response(200))])
    with RawClient(origin.port) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: origin.requests)
        start = time.monotonic()
        origin.stop()
        assert time.monotonic() - start < 1
        assert client.read_available(1) == b""
        assert client.closed
