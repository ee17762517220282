"""Trailers cross the gateway both ways on chunked HTTP/1.1 (gRPC's status travels in them)."""

from __future__ import annotations

import time

import pytest

from adversary import RawClient, Request, Step, Write


def _gateway(gateway, origin):
    return gateway(targets=[origin.port])


def test_response_trailers_reach_the_client(scripted_origin, gateway):
    def reply(request: Request) -> list[Step]:
        return [
            Write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"),
            Write(b"5\r\nhello\r\n"),
            Write(b"0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\nConnection: x\r\n\r\n"),
        ]

    origin = scripted_origin(reply=reply)
    gw = _gateway(gateway, origin)
    with RawClient(gw.port) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n")
        response = client.read_response()
    assert (response.status, response.body) == (200, b"hello")
    assert response.trailers == [("grpc-status", "0"), ("grpc-message", "ok")]  # hop-by-hop dropped


@pytest.mark.parametrize("pause", [0.0, 0.2], ids=["before-upstream", "after-upstream"])
def test_request_trailers_reach_the_origin(scripted_origin, gateway, pause):
    def reply(request: Request) -> list[Step]:
        return [Write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")]

    origin = scripted_origin(reply=reply)
    gw = _gateway(gateway, origin)
    with RawClient(gw.port) as client:
        client.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        time.sleep(pause)
        client.send(b"0\r\nx-checksum: 900150983cd24fb0\r\nx-consumer: forged\r\n\r\n")
        response = client.read_response()
    assert response.status == 200
    (seen,) = origin.requests
    assert seen.body == b"abc"
    assert seen.trailers == [("x-checksum", "900150983cd24fb0")]  # an identity name never passes
