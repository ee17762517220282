"""gRPC targets (grpcio servers) behind an h2c upstream: the `grpc` health check, and a
unary call relayed from an HTTP/1.1 client that speaks the gRPC wire format by hand."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from adversary import RawClient
from support import GatewayThread, simple_config


class GrpcOrigin:
    def __init__(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def set(self, service: str, status: Any) -> None:
        self.health.set(service, status)

    def stop(self) -> None:
        self.server.stop(0).wait(5)


@pytest.fixture
def grpc_origin() -> Iterator[Callable[[], GrpcOrigin]]:
    started: list[GrpcOrigin] = []

    def start() -> GrpcOrigin:
        origin = GrpcOrigin()
        started.append(origin)
        return origin

    yield start
    for origin in started:
        origin.stop()


def _gateway(gateway: Any, origin: GrpcOrigin, **active: Any) -> GatewayThread:
    config = simple_config(0, [origin.port])
    config["listeners"][0]["bind"] = "127.0.0.1:PORT"
    check = {"type": "grpc", "interval": "100ms", "timeout": "2s", "healthy": 1, "unhealthy": 1, **active}
    config["upstreams"]["app"].update({"protocol": "h2c", "health_check": {"active": check}})
    return gateway(config)


def _wait_health(gw: GatewayThread, healthy: bool, timeout: float = 10) -> str:
    (target,) = gw.gateway.registry.targets.values()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if target.healthy is healthy and (target.checks_ok if healthy else target.checks_failed):
            return str(target.health_reason)
        time.sleep(0.05)
    raise AssertionError(f"target never became {'healthy' if healthy else 'unhealthy'}: {target.health_reason}")


def test_grpc_check_follows_the_servicer_status(gateway: Any, grpc_origin: Any) -> None:
    origin = grpc_origin()
    origin.set("", health_pb2.HealthCheckResponse.SERVING)
    gw = _gateway(gateway, origin)
    _wait_health(gw, True)
    origin.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert _wait_health(gw, False) == "NOT_SERVING"
    origin.set("", health_pb2.HealthCheckResponse.SERVING)
    _wait_health(gw, True)


def test_grpc_check_asks_about_its_service(gateway: Any, grpc_origin: Any) -> None:
    origin = grpc_origin()
    origin.set("", health_pb2.HealthCheckResponse.SERVING)
    gw = _gateway(gateway, origin, service="users.v1.Users")
    assert "grpc-status 5" in _wait_health(gw, False)  # NOT_FOUND: the servicer has no such service
    origin.set("users.v1.Users", health_pb2.HealthCheckResponse.SERVING)
    _wait_health(gw, True)


def test_grpc_check_fails_on_a_plain_http1_server(gateway: Any, scripted_origin: Any) -> None:
    origin = scripted_origin(reply=lambda request: [])
    gw = _gateway(gateway, origin)
    _wait_health(gw, False)


def test_a_unary_call_from_an_http1_client_reaches_a_grpc_server(gateway: Any, grpc_origin: Any) -> None:
    origin = grpc_origin()
    origin.set("", health_pb2.HealthCheckResponse.SERVING)
    config = simple_config(0, [origin.port])
    config["listeners"][0]["bind"] = "127.0.0.1:PORT"
    config["upstreams"]["app"]["protocol"] = "h2c"
    gw = gateway(config)
    message = health_pb2.HealthCheckRequest(service="").SerializeToString()
    frame = struct.pack(">BI", 0, len(message)) + message
    head = (
        "POST /grpc.health.v1.Health/Check HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc\r\n"
        f"TE: trailers\r\nContent-Length: {len(frame)}\r\n\r\n"
    )
    with RawClient(gw.port) as client:
        client.send(head.encode() + frame)
        response = client.read_response()
    assert response.status == 200
    assert dict(response.trailers)["grpc-status"] == "0"
    reply = health_pb2.HealthCheckResponse.FromString(response.body[5:])
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
