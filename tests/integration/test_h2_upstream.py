"""HTTP/1.1 clients through the gateway to HTTP/2 targets (h2c and h2 over TLS)."""

from __future__ import annotations

import hashlib
import http.client
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from h2_support import H2Origin
from support import GatewayThread, request, simple_config


@pytest.fixture
def h2_origin() -> Iterator[Callable[..., H2Origin]]:
    started: list[H2Origin] = []

    def start(**kwargs: Any) -> H2Origin:
        origin = H2Origin(**kwargs)
        started.append(origin)
        return origin

    yield start
    for origin in started:
        origin.stop()
    errors = [error for origin in started for error in origin.errors]
    assert not errors, errors


def h2c_gateway(gateway: Callable[..., GatewayThread], *origins: H2Origin, **upstream: Any) -> GatewayThread:
    config = simple_config(0, [o.port for o in origins])
    config["listeners"][0]["bind"] = "127.0.0.1:PORT"
    config["upstreams"]["app"].update({"protocol": "h2c", **upstream})
    return gateway(config)


def test_get_reaches_an_h2c_target_with_pseudo_headers(gateway: Any, h2_origin: Any) -> None:
    origin = h2_origin()
    gw = h2c_gateway(gateway, origin)
    reply = request(gw.port, "GET", "/hello?x=1", headers={"Host": "api.example", "Connection": "keep-alive"})
    assert reply.status == 200
    info = reply.json()
    assert info["method"] == "GET"
    assert info["path"] == "/hello?x=1"
    assert info["scheme"] == "http"
    assert info["authority"] == "api.example"
    names = [name for name, _ in info["headers"]]
    assert "host" not in names and "connection" not in names
    assert names[:4] == [":method", ":scheme", ":authority", ":path"]
    assert ("x-forwarded-for", "127.0.0.1") in [tuple(h) for h in info["headers"]]


def test_post_bodies_of_several_megabytes_both_ways(gateway: Any, h2_origin: Any) -> None:
    origin = h2_origin()
    gw = h2c_gateway(gateway, origin)
    body = bytes(range(256)) * (5 * 4096)  # 5 MiB
    reply = request(gw.port, "POST", "/upload", body=body, timeout=30)
    assert reply.status == 200
    assert reply.json()["body_size"] == len(body)
    assert reply.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    echoed = request(gw.port, "POST", "/echo-body", body=body, timeout=30)
    assert echoed.status == 200
    assert echoed.body == body


def test_chunked_upload_of_unknown_length_streams_through(gateway: Any, h2_origin: Any) -> None:
    origin = h2_origin()
    gw = h2c_gateway(gateway, origin)
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
    chunks = [bytes([i]) * 100_000 for i in range(30)]
    conn.request("POST", "/upload", body=iter(chunks), encode_chunked=True)
    reply = conn.getresponse()
    info = __import__("json").loads(reply.read())
    conn.close()
    assert reply.status == 200
    assert info["body_size"] == 3_000_000
    assert info["body_sha256"] == hashlib.sha256(b"".join(chunks)).hexdigest()
