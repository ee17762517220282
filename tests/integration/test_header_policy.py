"""Identity and forwarding headers a client cannot forge, through a real gateway and origin."""

from __future__ import annotations

from typing import Any

from support import raw_exchange, request, split_responses

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def _two_routes(origin_port: int) -> dict[str, Any]:
    """/private runs jwt (forwarding `sub` as X-User-Id); /public runs no plugin at all."""
    return {
        "version": 1,
        "listeners": [{"name": "web", "bind": "127.0.0.1:PORT"}],
        "upstreams": {"app": {"targets": [{"address": f"127.0.0.1:{origin_port}"}]}},
        "routes": [
            {
                "name": "private",
                "match": {"path": "/private"},
                "upstream": "app",
                "plugins": [{"jwt": {"secret": SECRET, "forward_claims": {"X-User-Id": "sub"}}}],
            },
            {"name": "public", "match": {"path": "/"}, "upstream": "app"},
        ],
        "log": {"access": False},
    }


def test_identity_headers_are_removed_on_routes_without_auth(origins, gateway):
    origin = origins()
    gw = gateway(_two_routes(origin.port))
    seen = request(
        gw.port, path="/public", headers={"X-User-Id": "admin", "X-Consumer": "root", "X-Other": "kept"}
    ).json()["headers"]
    assert "x-user-id" not in seen  # a forward_claims name of another route
    assert "x-consumer" not in seen
    assert seen["x-other"] == "kept"


def test_underscore_names_are_dropped_by_default(origins, gateway):
    origin = origins()
    gw = gateway(_two_routes(origin.port))
    data = (
        b"GET /public HTTP/1.1\r\nHost: x\r\nX_Consumer: root\r\nX_User_Id: admin\r\nX_Plain: 1\r\n"
        b"Connection: close\r\n\r\n"
    )
    ((status, _, body),) = split_responses(raw_exchange(gw.port, data))
    assert status == 200
    assert b"x_consumer" not in body.lower()
    assert b"x_user_id" not in body.lower()
    assert b"x_plain" not in body.lower()


def test_underscore_names_kept_on_request_but_never_as_identity(origins, gateway):
    origin = origins()
    config = _two_routes(origin.port)
    config["listeners"][0]["underscores_in_headers"] = True
    gw = gateway(config)
    data = (
        b"GET /public HTTP/1.1\r\nHost: x\r\nX_Consumer: root\r\nX_User_Id: a\r\nX_Plain: 1\r\n"
        b"Connection: close\r\n\r\n"
    )
    ((status, _, body),) = split_responses(raw_exchange(gw.port, data))
    assert status == 200
    assert b'"x_plain": "1"' in body
    assert b"x_consumer" not in body
    assert b"x_user_id" not in body


def test_forwarded_removed_and_x_real_ip_rewritten(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    seen = request(gw.port, headers={"Forwarded": "for=1.2.3.4;proto=https", "X-Real-IP": "1.2.3.4"}).json()
    assert "forwarded" not in seen["headers"]
    assert seen["headers"]["x-real-ip"] == "127.0.0.1"


def test_connection_cannot_remove_host(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    seen = request(gw.port, headers={"Host": "api.example.com", "Connection": "host, x-drop", "X-Drop": "1"}).json()
    assert seen["headers"]["host"] == "api.example.com"
    assert seen["headers"]["x-forwarded-host"] == "api.example.com"
    assert "x-drop" not in seen["headers"]


def test_unknown_transfer_coding_before_chunked_is_501(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    data = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    ((status, headers, body),) = split_responses(raw_exchange(gw.port, data))
    assert status == 501
    assert b'"error": "not_implemented"' in body
    assert headers["connection"] == "close"
    assert origin.origin.requests == 0


def test_an_http10_request_without_host_reaches_the_upstream_with_one(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    ((status, _, body),) = split_responses(raw_exchange(gw.port, b"GET /echo HTTP/1.0\r\n\r\n"))
    assert status == 200
    assert f'"host": "127.0.0.1:{origin.port}"'.encode() in body  # the upstream hop is HTTP/1.1
    assert b"x-forwarded-host" not in body
