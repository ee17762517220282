"""The gateway's own answers to gRPC requests are gRPC statuses, never JSON (the contract).

These requests travel over HTTP/1.1 (as gRPC-Web would) so they need no HTTP/2: the answer
is a head with grpc-status and an empty body. The same renderer serves HTTP/2 clients.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from adversary import wait_until
from bastion.demo.origin import OriginHandle
from support import GatewayThread, Reply, free_port, request

Start = Callable[..., GatewayThread]

GRPC = {"content-type": "application/grpc", "te": "trailers"}
FRAME = b"\x00\x00\x00\x00\x02\x08\x01"  # one message of two bytes


def call(gw: GatewayThread, path: str = "/pkg.Svc/Method", headers: dict[str, str] | None = None) -> Reply:
    return request(gw.port, "POST", path, headers={**GRPC, **(headers or {})}, body=FRAME)


def assert_status(reply: Reply, code: int, message: str | None = None) -> None:
    assert reply.status == 200, (reply.status, reply.body)
    assert reply.header("grpc-status") == str(code), reply.headers
    assert reply.header("content-type") == "application/grpc"
    assert reply.body == b""
    assert reply.header("x-request-id")
    if message is not None:
        assert message in (reply.header("grpc-message") or "")


def config(targets: list[int], plugins: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": [{"name": "web", "bind": "127.0.0.1:PORT"}],
        "upstreams": {"app": {"targets": [{"address": f"127.0.0.1:{t}"} for t in targets]}},
        "routes": [
            {
                "name": "svc",
                "match": {"path": "/pkg.Svc/"},
                "upstream": "app",
                "strip_prefix": "/pkg.Svc",
                "plugins": plugins or [],
            }
        ],
        "log": {"access": False},
        **extra,
    }


def test_no_route_is_unimplemented(gateway: Start, origins: Callable[..., OriginHandle]) -> None:
    origin = origins()
    gw = gateway(config([origin.port]))
    reply = call(gw, "/other.Svc/Method")
    assert_status(reply, 12, "No route")
    # The same request without the gRPC content-type still gets the contract's JSON.
    plain = request(gw.port, "POST", "/other.Svc/Method", body=b"{}")
    assert plain.status == 404 and plain.json()["error"] == "no_route"


def test_refused_upstream_is_unavailable(gateway: Start) -> None:
    gw = gateway(config([free_port()]))
    assert_status(call(gw), 14)


def test_grpc_web_errors_keep_the_grpc_web_content_type(gateway: Start) -> None:
    gw = gateway(config([free_port()]))
    reply = request(gw.port, "POST", "/x.Y/Z", headers={"content-type": "application/grpc-web-text"}, body=b"")
    assert reply.status == 200 and reply.header("grpc-status") == "12"
    assert reply.header("content-type") == "application/grpc-web-text+proto"


def test_upstream_http_status_becomes_a_grpc_status(gateway: Start, scripted_origin: Callable[..., Any]) -> None:
    from adversary import Write

    def answer(status: int) -> bytes:
        return b"HTTP/1.1 %d X\r\ncontent-type: text/html\r\ncontent-length: 5\r\n\r\nhello" % status

    statuses = iter([503, 404, 401, 429])
    origin = scripted_origin(reply=lambda req: [Write(answer(next(statuses)))])
    gw = gateway(config([origin.port]))
    for code in (14, 12, 16, 8):
        assert_status(call(gw), code, "not gRPC")


def test_upstream_grpc_answer_passes_untouched(gateway: Start, scripted_origin: Callable[..., Any]) -> None:
    from adversary import Write

    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-status: 5\r\ngrpc-message: gone\r\n"
    origin = scripted_origin(reply=[Write(head + b"content-length: 0\r\n\r\n")])
    gw = gateway(config([origin.port]))
    assert_status(call(gw), 5, "gone")
    assert origin.requests[0].header("te") == "trailers"


def test_grpc_timeout_expires_as_deadline_exceeded(gateway: Start, origins: Callable[..., OriginHandle]) -> None:
    origin = origins()
    gw = gateway(config([origin.port]))
    started = time.monotonic()
    reply = call(gw, "/pkg.Svc/delay/3000", headers={"grpc-timeout": "200m"})
    assert_status(reply, 4)
    assert time.monotonic() - started < 5  # the origin's answer takes far longer


def test_the_upstream_gets_what_is_left_of_the_deadline(gateway: Start, origins: Callable[..., OriginHandle]) -> None:
    origin = origins()
    gw = gateway(config([origin.port]))
    forwarded = call(gw, headers={"grpc-timeout": "10S"}).json()["headers"]["grpc-timeout"]
    assert forwarded != "10S" and forwarded.endswith("m")
    assert 9000 <= int(forwarded[:-1]) <= 10000


def test_extreme_deadlines(gateway: Start, origins: Callable[..., OriginHandle]) -> None:
    origin = origins()
    gw = gateway(config([origin.port]))
    huge = call(gw, headers={"grpc-timeout": "99999999H"})  # 11,000 years: a valid deadline
    assert huge.status == 200 and huge.header("grpc-status") is None
    assert_status(call(gw, headers={"grpc-timeout": "0n"}), 4)  # already over


@pytest.mark.parametrize("value", ["1a", "123456789S", "S", ""])
def test_malformed_grpc_timeout_is_ignored(gateway: Start, origins: Callable[..., OriginHandle], value: str) -> None:
    origin = origins()
    gw = gateway(config([origin.port]))
    reply = call(gw, "/pkg.Svc/Method", headers={"grpc-timeout": value})
    assert reply.status == 200 and reply.header("grpc-status") is None  # the origin's echo


CONSUMERS = [
    {"name": "alice", "groups": ["staff"], "credentials": {"key_auth": [{"key": "alice-key"}]}},
    {"name": "bob", "groups": ["guests"], "credentials": {"key_auth": [{"key": "bob-key"}]}},
]


def test_key_auth_answers_unauthenticated(gateway: Start, origins: Callable[..., OriginHandle]) -> None:
    origin = origins()
    gw = gateway(config([origin.port], [{"key_auth": {}}], consumers=CONSUMERS))
    reply = call(gw)
    assert_status(reply, 16)
    assert reply.header("www-authenticate")  # the plugin's challenge stays, as metadata
    assert_status(call(gw, headers={"x-api-key": "wrong"}), 16)
    ok = call(gw, headers={"x-api-key": "alice-key"})
    assert ok.status == 200 and ok.header("grpc-status") is None
    assert ok.json()["headers"]["x-consumer"] == "alice"


def test_acl_answers_permission_denied(gateway: Start, origins: Callable[..., OriginHandle]) -> None:
    origin = origins()
    plugins = [{"key_auth": {}}, {"acl": {"allow_groups": ["staff"]}}]
    gw = gateway(config([origin.port], plugins, consumers=CONSUMERS))
    assert_status(call(gw, headers={"x-api-key": "bob-key"}), 7)
    assert call(gw, headers={"x-api-key": "alice-key"}).header("grpc-status") is None


def test_rate_limit_answers_resource_exhausted(gateway: Start, origins: Callable[..., OriginHandle]) -> None:
    origin = origins()
    gw = gateway(config([origin.port], [{"rate_limit": {"limit": 2, "per": "1m", "key": "ip"}}]))
    assert call(gw).header("grpc-status") is None
    assert call(gw).header("grpc-status") is None
    reply = call(gw)
    assert_status(reply, 8)
    assert reply.header("retry-after")


def test_jwt_answers_unauthenticated(gateway: Start, origins: Callable[..., OriginHandle]) -> None:
    import jwt

    origin = origins()
    secret = "s" * 32
    gw = gateway(config([origin.port], [{"jwt": {"secret": secret, "algorithms": ["HS256"]}}]))
    assert_status(call(gw), 16)
    assert_status(call(gw, headers={"authorization": "Bearer not.a.jwt"}), 16)
    token = jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, secret, algorithm="HS256")
    assert call(gw, headers={"authorization": f"Bearer {token}"}).header("grpc-status") is None


def test_body_limit_answers_resource_exhausted(gateway: Start, origins: Callable[..., OriginHandle]) -> None:
    origin = origins()
    gw = gateway(config([origin.port], [{"body_limit": {"max": "4B"}}]))
    assert_status(call(gw), 8)


def test_deadline_mid_stream_ends_with_status_trailers(gateway: Start, scripted_origin: Callable[..., Any]) -> None:
    """The response has started: the deadline still ends it, with grpc-status 4 in trailers."""
    from adversary import Pause, Write

    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n\r\n"
    chunk = b"7\r\n" + FRAME + b"\r\n"
    trickle: list[Any] = [Write(head + chunk)]
    for _ in range(40):  # a message every 100 ms: the upstream is never idle for long
        trickle += [Pause(0.1), Write(chunk)]
    origin = scripted_origin(reply=[*trickle, Pause(10)])
    gw = gateway(config([origin.port]))
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(
            b"POST /pkg.Svc/M HTTP/1.1\r\nhost: x\r\ncontent-type: application/grpc\r\ngrpc-timeout: 300m\r\n"
            b"content-length: 7\r\n\r\n" + FRAME
        )
        data = b""
        while not data.endswith(b"\r\n\r\n") or b"\r\n0\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert time.monotonic() - started < 3  # the origin's stream lasts 4 s, then holds 10 s
    assert FRAME in data  # the message that came before the deadline
    assert b"\r\n0\r\ngrpc-status: 4\r\n" in data, data


def test_access_log_has_the_grpc_status(gateway: Start, scripted_origin: Callable[..., Any], tmp_path: Any) -> None:
    from adversary import Write

    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n\r\n"
    trailers = b"0\r\ngrpc-status: 9\r\ngrpc-message: later\r\n\r\n"
    origin = scripted_origin(reply=[Write(head + b"7\r\n" + FRAME + b"\r\n" + trailers)])
    access = tmp_path / "access.log"
    gw = gateway(config([origin.port], log={"access": True, "access_file": str(access)}))
    assert call(gw).status == 200
    assert_status(call(gw, "/other/x"), 12)
    plain = request(gw.port, "GET", "/pkg.Svc/x")
    assert plain.status == 200
    wait_until(lambda: len(access.read_text().splitlines()) == 3, what="three access lines")
    lines = [json.loads(line) for line in access.read_text().splitlines()]
    assert [line.get("grpc_status", "absent") for line in lines] == [9, 12, "absent"]
    # The status logged for the gateway's own gRPC answer is the one it stands for (the client got 200).
    assert [line["status"] for line in lines] == [200, 404, 200]


def test_grpc_refusals_count_in_the_metrics(gateway: Start, origins: Callable[..., OriginHandle]) -> None:
    origin = origins()
    admin = free_port()
    plugins = [{"rate_limit": {"limit": 1, "per": "1m", "key": "ip"}}]
    gw = gateway(config([origin.port], plugins, admin={"bind": f"127.0.0.1:{admin}"}))
    assert call(gw).header("grpc-status") is None
    assert_status(call(gw), 8)
    metrics = request(admin, "GET", "/metrics").body.decode()
    assert 'bastion_rate_limited_total{route="svc"} 1.0' in metrics
    assert 'bastion_http_requests_total{code="429",method="POST",route="svc"} 1.0' in metrics
