"""WebSocket through the gateway: a route with `websocket: true`, a real `websockets` origin and client.

The data-plane tests run against two fronts: the gateway, and `RelayFront` (ws_support.py), a
bare proxy over the same `bastion.net.relay` that the gateway uses after a 101. The second
shows that the tests and the relay are right on their own; the first that the gateway is.

"""

from __future__ import annotations

import json
import signal
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from bastion.config.types import parse_duration
from support import GatewayProcess, GatewayThread, free_port, request, simple_config, write_config
from ws_support import BLOCK, MIB, RelayFront, WsOrigin, wait_steady, wait_until, ws_connect

# What a slow reader may cost in this process (gateway, origin and client together) while the
# other side tries to push 64 MiB through; without backpressure most of it would pile up.
MEMORY_BOUND = 24 * MIB
FLOOD = 64

StartFront = Callable[..., tuple[int, WsOrigin]]
StartOrigin = Callable[..., WsOrigin]
StartGateway = Callable[..., GatewayThread]


def ws_route(**extra: Any) -> dict[str, Any]:
    return {"name": "chat", "match": {"path": "/"}, "upstream": "app", "websocket": True, **extra}


@pytest.fixture(params=["gateway", "relay"])
def front(request: pytest.FixtureRequest, gateway: StartGateway, ws_origin: StartOrigin) -> Iterator[StartFront]:
    """Factory: `front(idle_timeout="300ms")` -> (port to connect to, the origin behind it)."""
    relays: list[RelayFront] = []

    def start(idle_timeout: str | None = None, **origin_options: Any) -> tuple[int, WsOrigin]:
        origin = ws_origin(**origin_options)
        if request.param == "gateway":
            extra = {"websocket_idle_timeout": idle_timeout} if idle_timeout else {}
            return gateway(targets=[origin.port], routes=[ws_route(**extra)]).port, origin
        relay = RelayFront(origin.port, idle_timeout=parse_duration(idle_timeout) if idle_timeout else None)
        relays.append(relay)
        return relay.port, origin

    yield start
    for relay in relays:
        relay.stop()


# --- the data plane (both fronts) --------------------------------------------------------------


def test_text_and_binary_echo(front: StartFront) -> None:
    port, origin = front()
    with ws_connect(port, "/echo") as ws:
        ws.send("hello, ünïcode")
        assert ws.recv(timeout=5) == "hello, ünïcode"
        ws.send(b"\x00\x01\xfe\xff")
        assert ws.recv(timeout=5) == b"\x00\x01\xfe\xff"
        for n in range(20):  # many small frames, back to back
            ws.send(f"message {n}")
        assert [ws.recv(timeout=5) for _ in range(20)] == [f"message {n}" for n in range(20)]
    path, headers = origin.requests[-1]
    assert path == "/echo"
    assert headers["Upgrade"].lower() == "websocket"


def test_ping_gets_a_pong(front: StartFront) -> None:
    port, _ = front()
    with ws_connect(port) as ws:
        assert ws.ping(b"are you there").wait(5), "no pong came back through the front"
        ws.send("after the ping")
        assert ws.recv(timeout=5) == "after the ping"


def test_one_mib_messages_both_ways(front: StartFront) -> None:
    port, _ = front()
    with ws_connect(port, "/big") as ws:
        assert ws.recv(timeout=10) == BLOCK  # from the origin
        ws.send(BLOCK)  # to the origin, and back
        assert ws.recv(timeout=10) == BLOCK
        text = "é" * (MIB // 2)
        ws.send(text)
        assert ws.recv(timeout=10) == text


def test_a_close_code_from_the_client_reaches_the_origin(front: StartFront) -> None:
    port, origin = front()
    with ws_connect(port) as ws:
        ws.send("x")
        assert ws.recv(timeout=5) == "x"
        ws.close(4001, "client says bye")
    wait_until(lambda: bool(origin.closes))
    assert origin.closes == [(4001, "client says bye")]


def test_a_close_code_from_the_origin_reaches_the_client(front: StartFront) -> None:
    port, _ = front()
    with ws_connect(port, "/close/4002") as ws, pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=5)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4002, "origin closes")


def test_a_slow_origin_holds_the_client_back(front: StartFront) -> None:
    port, origin = front()
    sent = [0]
    with ws_connect(port, "/slow") as ws:

        def send_all() -> None:
            for _ in range(FLOOD):
                ws.send(BLOCK)
                sent[0] += 1

        tracemalloc.start()
        try:
            sender = threading.Thread(target=send_all, daemon=True)
            sender.start()
            held = wait_steady(lambda: sent[0])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert held < FLOOD, "the client sent everything to an origin that reads nothing"
        assert peak < MEMORY_BOUND, f"{peak / MIB:.0f} MiB held for an origin that does not read"
        origin.gate.set()  # the origin reads now: everything arrives
        sender.join(60)
        assert sent[0] == FLOOD
        ws.send("done")
        assert ws.recv(timeout=30) == str(FLOOD * MIB)


def test_a_slow_client_holds_the_origin_back(front: StartFront) -> None:
    port, origin = front()
    with ws_connect(port, f"/flood/{FLOOD}", max_queue=1) as ws:
        tracemalloc.start()
        try:
            wait_until(lambda: origin.flood_sent > 0)
            held = wait_steady(lambda: origin.flood_sent)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert held < FLOOD, "the origin sent everything to a client that reads nothing"
        assert peak < MEMORY_BOUND, f"{peak / MIB:.0f} MiB held for a client that does not read"
        for _ in range(FLOOD):
            assert ws.recv(timeout=30) == BLOCK
    assert origin.flood_sent == FLOOD


def test_the_idle_timeout_closes_a_quiet_websocket(front: StartFront) -> None:
    port, origin = front(idle_timeout="300ms")
    with ws_connect(port) as ws:
        ws.send("one message, then silence")
        assert ws.recv(timeout=5) == "one message, then silence"
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=15)
    assert info.value.rcvd is None  # the connection was cut, not closed with a frame
    wait_until(lambda: bool(origin.closes))
    assert origin.closes[0][0] == 1006  # the origin too: no close frame, the TCP connection ended


# --- the reference front's own counts (the numbers the access log test expects) ----------------


def test_the_relay_counts_the_frames_after_the_handshake(ws_origin: StartOrigin) -> None:
    origin = ws_origin()
    relay = RelayFront(origin.port)
    try:
        with ws_connect(relay.port) as ws:
            ws.send("hello")
            assert ws.recv(timeout=5) == "hello"
        wait_until(lambda: bool(relay.stats))
    finally:
        relay.stop()
    (stats,) = relay.stats
    # in: "hello" masked (2 + 4 + 5) and the close (2 + 4 + 2); out: "hello" (2 + 5), close (2 + 2)
    assert (stats.bytes_in, stats.bytes_out) == (19, 11)
    assert stats.reason == "upstream_closed"  # the server ends the TCP connection (RFC 6455 7.1.1)


# --- the gateway: handshake, routes, plugins -------------------------------------------------


def key_auth_gateway(gateway: StartGateway, origin: WsOrigin) -> GatewayThread:
    return gateway(
        targets=[origin.port],
        routes=[ws_route(plugins=[{"key_auth": {}}])],
        consumers=[{"name": "alice", "credentials": {"key_auth": [{"key": "alice-key"}]}}],
    )


def test_a_handshake_without_a_key_is_refused_and_never_upgraded(gateway: StartGateway, ws_origin: StartOrigin) -> None:
    origin = ws_origin()
    gw = key_auth_gateway(gateway, origin)
    with pytest.raises(InvalidStatus) as info:
        ws_connect(gw.port)
    response = info.value.response
    assert response.status_code == 401
    assert json.loads(response.body or b"")["error"] == "missing_credentials"
    assert origin.requests == []  # the origin never saw the handshake


def test_a_handshake_with_a_key_upgrades_and_the_origin_sees_the_consumer(
    gateway: StartGateway, ws_origin: StartOrigin
) -> None:
    origin = ws_origin()
    gw = key_auth_gateway(gateway, origin)
    with ws_connect(gw.port, "/echo", headers={"X-Api-Key": "alice-key", "X-Consumer": "mallory"}) as ws:
        ws.send("hi")
        assert ws.recv(timeout=5) == "hi"
    _, headers = origin.requests[-1]
    assert headers.get_all("X-Consumer") == ["alice"]  # the client's own X-Consumer is dropped
    assert headers["X-Forwarded-For"] == "127.0.0.1"


def test_a_refused_handshake_reaches_the_client_as_the_origin_sent_it(
    gateway: StartGateway, ws_origin: StartOrigin
) -> None:
    origin = ws_origin()
    gw = gateway(targets=[origin.port], routes=[ws_route()])
    with pytest.raises(InvalidStatus) as info:
        ws_connect(gw.port, "/reject")
    response = info.value.response
    assert response.status_code == 403
    assert response.headers["X-Origin-Says"] == "no"
    assert b"origin refuses the upgrade" in (response.body or b"")


def test_an_upgrade_on_a_route_without_websocket_is_a_plain_request(
    gateway: StartGateway, ws_origin: StartOrigin
) -> None:
    origin = ws_origin()
    gw = gateway(targets=[origin.port])  # the route does not set websocket: true
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    reply = request(gw.port, "GET", "/chat", headers=headers)
    assert reply.status == 200
    assert reply.body.startswith(b"plain http")
    (path, seen), *_ = origin.plain_requests
    assert path == "/chat"
    assert "Upgrade" not in seen
    assert "upgrade" not in seen.get("Connection", "").lower()
    assert origin.open_connections == 0
    with pytest.raises(InvalidStatus) as info:  # what a WebSocket client makes of it
        ws_connect(gw.port, "/chat")
    assert info.value.response.status_code == 200


def test_a_reload_leaves_an_open_websocket_running(gateway: StartGateway, ws_origin: StartOrigin) -> None:
    origin = ws_origin()
    gw = gateway(targets=[origin.port], routes=[ws_route()])
    with ws_connect(gw.port) as ws:
        ws.send("before the reload")
        assert ws.recv(timeout=5) == "before the reload"
        write_config(gw.config_path, simple_config(gw.port, [origin.port]))  # no websocket route any more
        assert gw.reload()
        ws.send("after the reload")
        assert ws.recv(timeout=5) == "after the reload"
        with pytest.raises(InvalidStatus):  # new handshakes get the new config
            ws_connect(gw.port)
        ws.send("still here")
        assert ws.recv(timeout=5) == "still here"


# --- the gateway as a process: access log, drain --------------------------------------------


def ws_process(origin: WsOrigin, tmp_path: Path, **extra: Any) -> GatewayProcess:
    port = free_port()
    config = simple_config(port, [origin.port], routes=[ws_route()], **extra)
    config["log"] = {"access": True}
    return GatewayProcess(write_config(tmp_path / "gw.yaml", config), port)


def access_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_one_access_log_line_at_close(ws_origin: StartOrigin, tmp_path: Path) -> None:
    origin = ws_origin()
    gw = ws_process(origin, tmp_path)
    try:
        with ws_connect(gw.port, "/echo") as ws:
            ws.send("hello")
            assert ws.recv(timeout=5) == "hello"
            assert access_lines(gw.output()[0]) == [], "no line while the WebSocket is open"
        wait_until(lambda: bool(access_lines(gw.output()[0])))
    finally:
        code, out, err = gw.stop()
    assert code == 0, err
    (line,) = access_lines(out)
    assert (line["method"], line["path"], line["route"], line["status"]) == ("GET", "/echo", "chat", 101)
    assert line["target"] == origin.address
    assert (line["bytes_in"], line["bytes_out"]) == (19, 11)  # the frames relayed after the 101
    assert line["close_reason"] == "upstream_closed"
    assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] > 0


def test_sigterm_lets_an_open_websocket_run_until_drain_timeout_then_closes_it(
    ws_origin: StartOrigin, tmp_path: Path
) -> None:
    origin = ws_origin()
    gw = ws_process(origin, tmp_path, drain_timeout="2s")
    try:
        with ws_connect(gw.port) as ws:
            ws.send("before")
            assert ws.recv(timeout=5) == "before"
            gw.signal(signal.SIGTERM)
            ws.send("during the drain")
            assert ws.recv(timeout=5) == "during the drain"
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=15)  # well before the 30 s default: the configured 2 s
        assert gw.proc.wait(15) == 0
    finally:
        code, out, err = gw.stop()
    assert code == 0, err
    (line,) = access_lines(out)
    assert line["status"] == 101
    assert line["close_reason"] == "shutdown"
    wait_until(lambda: bool(origin.closes))
    assert origin.closes[0][0] == 1006  # the origin's connection was ended too


def test_wss_through_a_tls_listener(gateway: StartGateway, ws_origin: StartOrigin, tmp_path: Path) -> None:
    from tls_support import Pki

    pki = Pki(tmp_path)
    cert, key = pki.issue("gw", "localhost")
    origin = ws_origin()
    config = simple_config(free_port(), [origin.port], routes=[ws_route()])
    config["listeners"][0].update(
        {"bind": "127.0.0.1:PORT", "protocol": "https", "tls": {"certificates": [{"cert": cert, "key": key}]}}
    )
    gw = gateway(config)
    context = pki.client_context()
    with connect(
        f"wss://localhost:{gw.port}/echo", ssl=context, compression=None, ping_interval=None, open_timeout=5
    ) as ws:
        ws.send("over tls")
        assert ws.recv(timeout=5) == "over tls"
        ws.send(b"\x00" * MIB)
        assert ws.recv(timeout=10) == b"\x00" * MIB
    assert origin.requests[-1][0] == "/echo"


def test_a_closed_websocket_gives_its_upstream_connection_slot_back(
    gateway: StartGateway, ws_origin: StartOrigin
) -> None:
    origin = ws_origin()
    config = simple_config(free_port(), [origin.port], routes=[ws_route()])
    config["listeners"][0]["bind"] = "127.0.0.1:PORT"
    config["upstreams"]["app"]["max_connections"] = 1  # no queue: a leaked slot is a 503
    gw = gateway(config)
    for n in range(3):
        with ws_connect(gw.port) as ws:
            ws.send(f"round {n}")
            assert ws.recv(timeout=5) == f"round {n}"
        wait_until(lambda: origin.open_connections == 0)


def test_frames_sent_right_behind_the_handshake_are_not_lost(gateway: StartGateway, ws_origin: StartOrigin) -> None:
    import socket

    origin = ws_origin()
    gw = gateway(targets=[origin.port], routes=[ws_route()])
    handshake = (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    mask = b"\x01\x02\x03\x04"
    frame = b"\x81\x82" + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"hi"))  # masked text "hi"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(handshake + frame)  # one write: the frame arrives with the Upgrade request
        received = b""
        while b"\x81\x02hi" not in received:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    assert received.startswith(b"HTTP/1.1 101 ")
