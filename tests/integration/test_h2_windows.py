"""Cross-feature review: HTTP/2 request bodies the gateway refuses (a plugin's early answer,
no route, an auth failure) still give their flow-control window back, so the connection's
window is not eaten away and later uploads on it go through."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h2.events
import h2.exceptions
import pytest

from adversary import wait_until
from bastion.demo.origin import OriginHandle
from h2_support import RawH2
from support import GatewayThread, free_port, request


@pytest.fixture
def origin(origins: Callable[..., OriginHandle]) -> OriginHandle:
    return origins("a")


def config(origin: OriginHandle) -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": [
            {
                "name": "web",
                "bind": "127.0.0.1:PORT",
                "http2": "prior_knowledge",
                "limits": {"h2_connection_window": "256KB", "h2_initial_window_size": "64KB"},
            }
        ],
        "upstreams": {"app": {"targets": [{"address": origin.address}]}},
        "routes": [
            {
                "name": "small",
                "match": {"path": "/small/"},
                "upstream": "app",
                "plugins": [{"body_limit": {"max": "1KB"}}],
            },
            {"name": "auth", "match": {"path": "/auth/"}, "upstream": "app", "plugins": [{"key_auth": {}}]},
            {"name": "open", "match": {"path": "/open/"}, "upstream": "app"},
        ],
        "consumers": [{"name": "c", "credentials": {"key_auth": [{"key": "x" * 24}]}}],
        "log": {"access": False},
    }


def upload(client: RawH2, path: str, size: int) -> int:
    """POST `size` bytes as fast as the windows allow; the status (0: the stream was reset)."""
    stream = client.request(path, "POST", extra=[(b"content-length", str(size).encode())], end=False)
    left = size
    while left:
        ended = client.of(h2.events.StreamEnded, stream) or client.of(h2.events.StreamReset, stream)
        if ended:
            break
        window = min(client.conn.local_flow_control_window(stream), client.conn.max_outbound_frame_size, left)
        if window <= 0:
            client.read(0.05)
            continue
        try:
            client.conn.send_data(stream, b"u" * window, end_stream=window == left)
        except h2.exceptions.StreamClosedError:
            break
        client.flush()
        left -= window
        client.read(0.001)
    client.until(lambda: client.of(h2.events.StreamEnded, stream) or client.of(h2.events.StreamReset, stream))
    heads = client.of(h2.events.ResponseReceived, stream)
    return int(dict(heads[0].headers)[b":status"]) if heads else 0


@pytest.mark.parametrize("path", ["/small/x", "/auth/x", "/nowhere"])
def test_refused_uploads_give_the_connection_window_back(
    gateway: Callable[..., GatewayThread], origin: OriginHandle, path: str
) -> None:
    gw = gateway(config(origin))
    with RawH2(gw.port, timeout=10) as client:
        for _ in range(8):  # 8 x 100 KB refused: three times the connection window
            status = upload(client, path, 100_000)
            assert status in (0, 401, 404, 413)
        assert upload(client, "/open/echo", 300_000) == 200


def test_many_streams_into_a_one_connection_upstream_with_a_queue_then_the_client_leaves(
    gateway: Callable[..., GatewayThread], origin: OriginHandle
) -> None:
    """One HTTP/2 connection multiplexes 20 requests onto an upstream that takes one at a
    time: 5 wait in the queue, 14 are refused; the client then goes away with 6 open.
    Nothing stays counted: in_flight and the queue fall back to 0, the next client is served."""
    admin = free_port()
    config_ = config(origin)
    config_["upstreams"]["app"].update({"max_connections": 1, "queue": {"size": 5, "timeout": "10s"}})
    config_["admin"] = {"bind": f"127.0.0.1:{admin}"}
    config_["routes"].append({"name": "delay", "match": {"path": "/delay/"}, "upstream": "app"})
    gw = gateway(config_)
    client = RawH2(gw.port, timeout=10)
    for _ in range(20):
        client.request("/delay/2000")
    refused = lambda: [e for e in client.of(h2.events.ResponseReceived) if dict(e.headers)[b":status"] == b"503"]  # noqa: E731
    client.until(lambda: len(refused()) == 14)

    def upstream() -> dict[str, Any]:
        (found,) = [u for u in request(admin, path="/upstreams").json()["upstreams"] if u["name"] == "app"]
        return dict(found)

    assert upstream()["targets"][0]["in_flight"] >= 1
    client.close()
    # Well before the queue's 10 s timeout: the waiters of a client that left are dropped.
    wait_until(
        lambda: (upstream()["targets"][0]["in_flight"], upstream().get("queue_waiting", 0)) == (0, 0),
        timeout=5,
        what="in_flight and the queue back to 0",
    )
    with RawH2(gw.port, timeout=10) as again:
        assert again.response(again.request("/open/echo"))[0] == 200
