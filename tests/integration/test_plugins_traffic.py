"""rate_limit, ip_filter and body_limit through a real gateway; the machine-wide limit with workers."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bastion.demo.origin import OriginHandle
from support import (
    GatewayProcess,
    GatewayThread,
    free_port,
    raw_exchange,
    request,
    simple_config,
    split_responses,
    write_config,
)

Start = Callable[..., GatewayThread]

CONSUMERS = [
    {"name": "alice", "credentials": {"key_auth": [{"key": "alice-key"}]}},
    {"name": "bob", "credentials": {"key_auth": [{"key": "bob-key"}]}},
]


@pytest.fixture
def origin(origins: Callable[..., OriginHandle]) -> OriginHandle:
    return origins("a")


def statuses(port: int, count: int, **kwargs: Any) -> list[int]:
    return [request(port, **kwargs).status for _ in range(count)]


# --- rate_limit ----------------------------------------------------------------------------------


def test_the_sixth_request_of_five_per_minute_is_429(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], plugins=[{"rate_limit": {"limit": 5, "per": "1m", "key": "ip"}}])
    replies = [request(gw.port) for _ in range(6)]
    assert [r.status for r in replies] == [200] * 5 + [429]
    assert [r.header("RateLimit-Remaining") for r in replies] == ["4", "3", "2", "1", "0", "0"]
    for reply in replies:
        assert reply.header("RateLimit-Limit") == "5"
        assert reply.header("RateLimit-Policy") == "5;w=60"
        assert 0 < int(reply.header("RateLimit-Reset") or 0) <= 60
    last = replies[-1]
    assert last.json()["error"] == "rate_limited"
    assert last.json()["request_id"] == last.header("X-Request-Id")
    assert 1 <= int(last.header("Retry-After") or 0) <= 12
    assert origin.origin.requests == 5


def test_requests_come_back_at_the_sustained_rate(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], plugins=[{"rate_limit": {"limit": 4, "per": "1s", "key": "ip"}}])
    assert statuses(gw.port, 5) == [200] * 4 + [429]
    time.sleep(0.3)  # one emission interval (250 ms): one more request, not a whole new window
    assert statuses(gw.port, 2) == [200, 429]


def test_stacked_limits(gateway: Start, origin: OriginHandle) -> None:
    plugins = [
        {"rate_limit": {"limit": 2, "per": "1s", "key": "ip"}},
        {"rate_limit": {"limit": 3, "per": "1h", "key": "ip"}},
    ]
    gw = gateway(targets=[origin.port], plugins=plugins)
    first = request(gw.port)
    assert first.header("RateLimit-Policy") == "2;w=1, 3;w=3600"
    second = request(gw.port)
    assert second.header("RateLimit-Remaining") == "0"
    assert request(gw.port).status == 429  # 2 per second
    time.sleep(1.05)
    third = request(gw.port)
    assert third.status == 200
    assert third.header("RateLimit-Limit") == "3"  # the hourly entry is now the closer one
    assert request(gw.port).status == 429
    time.sleep(0.55)
    assert request(gw.port).status == 429  # the per-second entry has room, the hourly one does not


def test_a_429_from_the_first_entry_lists_every_policy_of_its_route(gateway: Start, origin: OriginHandle) -> None:
    routes = [
        {"name": "plain", "match": {"path": "/plain"}, "upstream": "app"},
        {
            "name": "tight",
            "match": {"path": "/tight"},
            "upstream": "app",
            "plugins": [{"rate_limit": {"limit": 50, "per": "1h", "key": "ip"}}],
        },
    ]
    plugins = [{"rate_limit": {"limit": 1, "per": "1m", "key": "ip"}}]
    gw = gateway(targets=[origin.port], plugins=plugins, routes=routes)
    assert request(gw.port, path="/tight").header("RateLimit-Policy") == "1;w=60, 50;w=3600"
    refused = request(gw.port, path="/tight")  # refused by the global entry, before the route's is checked
    assert refused.status == 429
    assert refused.header("RateLimit-Policy") == "1;w=60, 50;w=3600"
    assert refused.header("RateLimit-Limit") == "1"
    plain = request(gw.port, path="/plain")
    assert plain.status == 429
    assert plain.header("RateLimit-Policy") == "1;w=60"


def test_key_consumer_counts_each_consumer(gateway: Start, origin: OriginHandle) -> None:
    plugins = [{"key_auth": {}}, {"rate_limit": {"limit": 2, "per": "1h"}}]
    gw = gateway(targets=[origin.port], consumers=CONSUMERS, plugins=plugins)
    assert statuses(gw.port, 3, headers={"X-Api-Key": "alice-key"}) == [200, 200, 429]
    assert statuses(gw.port, 3, headers={"X-Api-Key": "bob-key"}) == [200, 200, 429]


def test_key_consumer_falls_back_to_the_address(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], plugins=[{"rate_limit": {"limit": 2, "per": "1h"}}])
    assert statuses(gw.port, 3) == [200, 200, 429]


def test_key_header(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], plugins=[{"rate_limit": {"limit": 1, "per": "1h", "key": "header:X-Tenant"}}])
    assert statuses(gw.port, 2, headers={"X-Tenant": "a"}) == [200, 429]
    assert statuses(gw.port, 2, headers={"X-Tenant": "b"}) == [200, 429]


def test_key_route_and_route_scopes(gateway: Start, origin: OriginHandle) -> None:
    routes = [
        {"name": "one", "match": {"path": "/one"}, "upstream": "app"},
        {"name": "two", "match": {"path": "/two"}, "upstream": "app"},
        {
            "name": "three",
            "match": {"path": "/three"},
            "upstream": "app",
            "plugins": [{"rate_limit": {"limit": 1, "per": "1h", "key": "ip"}}],
        },
        {"name": "free", "match": {"path": "/free"}, "upstream": "app"},
    ]
    plugins = [{"rate_limit": {"limit": 2, "per": "1h", "key": "route"}}]
    gw = gateway(targets=[origin.port], plugins=plugins, routes=routes)
    assert statuses(gw.port, 3, path="/one") == [200, 200, 429]
    assert statuses(gw.port, 3, path="/two") == [200, 200, 429]
    assert statuses(gw.port, 2, path="/three") == [200, 429]  # the route's own entry is stricter


def test_headers_only_on_limited_routes(gateway: Start, origin: OriginHandle) -> None:
    routes = [
        {
            "name": "limited",
            "match": {"path": "/l"},
            "upstream": "app",
            "plugins": [{"rate_limit": {"limit": 9, "per": "1m"}}],
        },
        {"name": "free", "match": {"path": "/"}, "upstream": "app"},
    ]
    gw = gateway(targets=[origin.port], routes=routes)
    assert request(gw.port, path="/l").header("RateLimit-Remaining") == "8"
    assert request(gw.port, path="/f").header("RateLimit-Remaining") is None
    quiet = gateway(targets=[origin.port], plugins=[{"rate_limit": {"limit": 9, "per": "1m", "headers": False}}])
    assert request(quiet.port).header("RateLimit-Limit") is None


def test_counters_survive_a_reload(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], plugins=[{"rate_limit": {"limit": 2, "per": "1h", "key": "ip"}}])
    assert statuses(gw.port, 2) == [200, 200]
    assert gw.reload()
    assert statuses(gw.port, 1) == [429]


def test_rate_limit_holds_across_workers(tmp_path: Path, origin: OriginHandle) -> None:
    """Two worker processes on one port share one counter table: 5 per minute means 5."""
    port = free_port()
    config = simple_config(port, [origin.port], plugins=[{"rate_limit": {"limit": 5, "per": "1m", "key": "ip"}}])
    proc = GatewayProcess(write_config(tmp_path / "workers.yaml", config), port, "--workers", "2")
    try:
        time.sleep(0.5)  # both workers listening
        codes = statuses(port, 14)
    finally:
        code, _, err = proc.stop()
    assert code == 0, err
    assert codes.count(200) == 5, codes
    assert codes.count(429) == 9


# --- ip_filter -----------------------------------------------------------------------------------


def test_deny_and_allow(gateway: Start, origin: OriginHandle) -> None:
    denied = gateway(targets=[origin.port], plugins=[{"ip_filter": {"deny": ["127.0.0.0/8"]}}])
    reply = request(denied.port)
    assert reply.status == 403
    assert reply.json()["error"] == "ip_forbidden"
    outside = gateway(targets=[origin.port], plugins=[{"ip_filter": {"allow": ["10.0.0.0/8", "::1/128"]}}])
    assert request(outside.port).status == 403
    inside = gateway(targets=[origin.port], plugins=[{"ip_filter": {"allow": ["127.0.0.1"], "deny": ["10.0.0.0/8"]}}])
    assert request(inside.port).status == 200
    assert origin.origin.requests == 1


def test_forwarded_for_believed_only_from_trusted_proxies(gateway: Start, origin: OriginHandle) -> None:
    config = {"trusted_proxies": ["127.0.0.1", "198.51.100.0/24"], "deny": ["203.0.113.0/24", "2001:db8::/32"]}
    gw = gateway(targets=[origin.port], plugins=[{"ip_filter": config}])
    assert request(gw.port, headers={"X-Forwarded-For": "192.0.2.1"}).status == 200
    assert request(gw.port, headers={"X-Forwarded-For": "203.0.113.7"}).status == 403
    assert request(gw.port, headers={"X-Forwarded-For": "2001:db8::5"}).status == 403
    # Two trusted hops are skipped from the right.
    assert request(gw.port, headers={"X-Forwarded-For": "203.0.113.7, 198.51.100.4"}).status == 403
    # The client wrote the left part itself: its own address is what the proxy appended.
    assert request(gw.port, headers={"X-Forwarded-For": "192.0.2.1, 203.0.113.7"}).status == 403
    assert request(gw.port, headers={"X-Forwarded-For": "203.0.113.7, 192.0.2.1"}).status == 200


def test_spoofed_forwarded_for_from_an_untrusted_client(gateway: Start, origin: OriginHandle) -> None:
    config = {"trusted_proxies": ["10.0.0.0/8"], "allow": ["192.0.2.0/24"]}
    gw = gateway(targets=[origin.port], plugins=[{"ip_filter": config}])
    reply = request(gw.port, headers={"X-Forwarded-For": "192.0.2.1"})
    assert reply.status == 403  # 127.0.0.1 is no trusted proxy: its X-Forwarded-For means nothing


def test_rate_limit_by_the_resolved_client(gateway: Start, origin: OriginHandle) -> None:
    plugins = [
        {"rate_limit": {"limit": 1, "per": "1h", "key": "ip"}},
        {"ip_filter": {"trusted_proxies": ["127.0.0.1"]}},
    ]
    gw = gateway(targets=[origin.port], plugins=plugins)
    assert statuses(gw.port, 2, headers={"X-Forwarded-For": "192.0.2.1"}) == [200, 429]
    assert statuses(gw.port, 2, headers={"X-Forwarded-For": "192.0.2.2"}) == [200, 429]


# --- body_limit ----------------------------------------------------------------------------------


def test_content_length_over_the_limit(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], plugins=[{"body_limit": {"max": "1KB"}}])
    ok = request(gw.port, "POST", "/", body=b"x" * 1024)
    assert ok.status == 200
    assert ok.json()["body_bytes"] == 1024
    reply = request(gw.port, "POST", "/", body=b"x" * 1025)
    assert reply.status == 413
    assert reply.json()["error"] == "body_too_large"
    assert origin.origin.requests == 1


def test_content_length_refused_before_the_body_is_sent(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], plugins=[{"body_limit": {"max": "1KB"}}])
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
    data = raw_exchange(gw.port, head, timeout=3.0, read_until_close=False)
    assert data.startswith(b"HTTP/1.1 413 ")


def test_chunked_body_over_the_limit_while_streaming(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], plugins=[{"body_limit": {"max": "1KB"}}])
    chunk = b"400\r\n" + b"y" * 1024 + b"\r\n"
    head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    small = raw_exchange(gw.port, head + chunk + b"0\r\n\r\n", timeout=3.0, read_until_close=False)
    assert split_responses(small)[0][0] == 200
    big = raw_exchange(gw.port, head + chunk + chunk + b"0\r\n\r\n", timeout=3.0)
    status, _, body = split_responses(big)[0]
    assert status == 413
    assert b"body_too_large" in body


def test_the_smallest_body_limit_wins(gateway: Start, origin: OriginHandle) -> None:
    routes = [{"name": "r", "match": {"path": "/"}, "upstream": "app", "plugins": [{"body_limit": {"max": 10}}]}]
    gw = gateway(targets=[origin.port], plugins=[{"body_limit": {"max": "1MB"}}], routes=routes)
    assert request(gw.port, "POST", "/", body=b"x" * 11).status == 413
