"""Paths and hosts through a real gateway: what routes is what the origin receives."""

from __future__ import annotations

import pytest

from support import raw_exchange, request, split_responses


def _config(origin_port: int) -> dict:
    return {
        "version": 1,
        "listeners": [{"name": "web", "bind": "127.0.0.1:PORT"}],
        "upstreams": {"app": {"targets": [{"address": f"127.0.0.1:{origin_port}"}]}},
        "routes": [
            {"name": "api", "match": {"hosts": ["api.example.com"], "path": "/"}, "upstream": "app"},
        ],
        "log": {"access": False},
    }


def test_trailing_dot_is_normalised_for_routing_and_forwarding(origins, gateway):
    origin = origins()
    gw = gateway(_config(origin.port))
    reply = request(gw.port, headers={"Host": "API.example.com.:8080"})
    assert reply.status == 200  # routed as api.example.com
    seen = reply.json()["headers"]
    assert seen["host"] == "API.example.com:8080"
    assert seen["x-forwarded-host"] == "API.example.com:8080"


@pytest.mark.parametrize(
    "host",
    [b"user@api.example.com", b"api.example.com,evil.com", b"api.example.com/x", b"api example.com", b"a.com:99999"],
)
def test_ambiguous_hosts_are_400(origins, gateway, host):
    origin = origins()
    gw = gateway(_config(origin.port))
    data = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    ((status, headers, _),) = split_responses(raw_exchange(gw.port, data))
    assert status == 400
    assert headers["connection"] == "close"
    assert origin.origin.requests == 0


@pytest.mark.parametrize("target", [b"/a\\..\\admin", b"/..;/admin", b"/a/.;/b", b"/%2e%2e;x/admin"])
def test_ambiguous_paths_are_400(origins, gateway, target):
    origin = origins()
    gw = gateway(_config(origin.port))
    data = b"GET " + target + b" HTTP/1.1\r\nHost: api.example.com\r\n\r\n"
    ((status, _, _),) = split_responses(raw_exchange(gw.port, data))
    assert status == 400
    assert origin.origin.requests == 0
