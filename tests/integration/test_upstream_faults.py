"""Upstream faults map to the contract's 502/503/504 JSON, and nothing is left behind."""

from __future__ import annotations

import http.client
import socket
import threading
import time

from support import CannedOrigin, free_port, raw_exchange, request


def _upstream(targets: list[str], **keys: object) -> dict[str, object]:
    return {"app": {"targets": [{"address": t} for t in targets], **keys}}


def test_connection_refused_is_502(gateway):
    gw = gateway(targets=[free_port()])
    reply = request(gw.port)
    assert reply.status == 502
    body = reply.json()
    assert body["error"] == "upstream_connect_failed"
    assert body["request_id"] == reply.header("X-Request-Id")


def test_reset_and_garbage_are_502(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port], upstreams=_upstream([origin.address], retries={"attempts": 0}))
    assert request(gw.port, path="/reset").status == 502
    assert request(gw.port, path="/garbage").status == 502
    # the gateway and the origin are fine afterwards
    assert request(gw.port, path="/plain").body == b"hello"


def test_malformed_status_line_is_502(gateway):
    canned = CannedOrigin(b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n")
    try:
        gw = gateway(targets=[canned.port])
        assert request(gw.port).status == 502
    finally:
        canned.stop()


def test_response_timeout_is_504(origins, gateway):
    origin = origins()
    gw = gateway(
        targets=[origin.port],
        upstreams=_upstream([origin.address], timeouts={"response": "200ms"}, retries={"attempts": 0}),
    )
    start = time.monotonic()
    reply = request(gw.port, path="/delay/2000")
    assert reply.status == 504
    assert reply.json()["error"] == "upstream_timeout"
    assert time.monotonic() - start < 1.5


def test_max_connections_gives_fast_503(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port], upstreams=_upstream([origin.address], max_connections=1))
    results: list[int] = []
    slow = threading.Thread(target=lambda: results.append(request(gw.port, path="/delay/600").status))
    slow.start()
    time.sleep(0.2)
    start = time.monotonic()
    over = request(gw.port, path="/plain")
    assert over.status == 503
    assert over.json()["error"] == "upstream_overloaded"
    assert time.monotonic() - start < 0.5
    slow.join()
    assert results == [200]


def test_upstream_closing_mid_body_cuts_the_client_connection(gateway):
    canned = CannedOrigin(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part", close=True)
    try:
        gw = gateway(targets=[canned.port])
        data = raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200")
        assert data.endswith(b"only-part")  # truncated, and the connection closed: never looks complete
    finally:
        canned.stop()


def test_upstream_connection_close_is_honoured(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    try:
        for _ in range(3):
            assert request(gw.port, path="/close", conn=conn).status == 200
    finally:
        conn.close()
    assert origin.call(lambda: origin.origin.connections) == 3


def test_stale_pooled_connection_is_retried_transparently(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port], upstreams=_upstream([origin.address], retries={"attempts": 0}))
    assert request(gw.port, path="/plain").status == 200
    # the origin drops its idle keep-alive connection; the gateway's pooled one is now stale
    origin.call(lambda: [conn.transport.close() for conn in list(origin.origin._conns)] and None)
    time.sleep(0.1)
    assert request(gw.port, path="/plain").status == 200


def test_no_connections_leak_after_faults(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port], upstreams=_upstream([origin.address], retries={"attempts": 0}))
    for path in ("/reset", "/garbage", "/plain", "/close") * 5:
        request(gw.port, path=path)
    time.sleep(0.2)
    stats = gw.call(_pool_stats(gw))
    assert stats["open"] <= 1
    assert gw.call(_client_connections(gw)) == 0


def _pool_stats(gw):
    async def run():
        (state,) = gw.gateway.registry.targets.values()
        return state.pool.statistics()

    return run()


def _client_connections(gw):
    async def run():
        return len(gw.gateway.connections)

    return run()


def test_client_leaving_never_causes_a_resend(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    assert request(gw.port, path="/plain").status == 200  # warm the pool: the next try reuses it
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"POST /delay/300 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        time.sleep(0.1)
    time.sleep(0.6)
    assert origin.call(lambda: origin.origin.requests) == 2


def test_a_client_that_leaves_before_its_answer_is_logged_as_499(origins, tmp_path):
    import json
    import socket
    import time

    from support import GatewayProcess, free_port, simple_config, write_config

    origin = origins()
    port = free_port()
    config = simple_config(port, [origin.port])
    config["log"] = {"access": True}
    gw = GatewayProcess(write_config(tmp_path / "gw.yaml", config), port)
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /delay/1000 HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.2)  # the request is at the upstream; the client goes away
        deadline = time.monotonic() + 10
        lines: list[dict] = []
        while not lines and time.monotonic() < deadline:
            lines = [json.loads(line) for line in gw.output()[0].splitlines() if line.startswith("{")]
            time.sleep(0.05)
    finally:
        gw.stop()
    assert [line["status"] for line in lines] == [499]
