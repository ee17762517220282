"""TCP listeners end to end over real sockets: relay, half-close, failover, limits, logs."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from l4_support import (
    TcpOrigin,
    access_lines,
    closed_soon,
    connect,
    l4_config,
    recv_exactly,
    recv_until_close,
    sink,
    wait_for,
)
from support import GatewayThread, free_port, write_config


@pytest.fixture
def tcp_origin() -> Iterator[Callable[..., TcpOrigin]]:
    started: list[TcpOrigin] = []

    def start(*args: Any, **kwargs: Any) -> TcpOrigin:
        origin = TcpOrigin(*args, **kwargs)
        started.append(origin)
        return origin

    yield start
    for origin in started:
        origin.kill()
    errors = [error for origin in started for error in origin.errors]
    assert not errors, f"an origin's handler raised: {errors!r}"


@pytest.fixture
def l4_gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayThread]]:
    """Factory: `l4_gateway(targets, listener={...}, **upstream)`; access log in tmp_path/access.log."""
    started: list[GatewayThread] = []

    def start(targets: list[str], listener: dict[str, Any] | None = None, **upstream: Any) -> GatewayThread:
        port = free_port()
        config = l4_config(port, targets, listener, **upstream)
        config["log"] = {"access_file": str(tmp_path / "access.log")}
        handle = GatewayThread(write_config(tmp_path / "gw.yaml", config), port)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


def closed_port() -> str:
    return f"127.0.0.1:{free_port()}"


def log_lines(tmp_path: Path, count: int = 1) -> list[dict[str, Any]]:
    return wait_for(lambda: (lines := access_lines(tmp_path / "access.log")) and len(lines) >= count and lines)


def test_bytes_are_relayed_both_ways_and_the_connection_is_logged(
    tcp_origin: Any, l4_gateway: Any, tmp_path: Path
) -> None:
    origin = tcp_origin(greeting=b"hello from a\n")
    gw = l4_gateway([origin.address])
    with connect(gw.port) as sock:
        assert recv_exactly(sock, 13) == b"hello from a\n"  # the target may speak first
        sock.sendall(b"ping" * 1000)
        assert recv_exactly(sock, 4000) == b"ping" * 1000
    [line] = log_lines(tmp_path)
    assert line["listener"] == "db" and line["protocol"] == "tcp"
    assert line["upstream"] == "db" and line["target"] == origin.address
    assert line["client"] == "127.0.0.1" and line["client_port"] > 0
    assert line["bytes_in"] == 4000 and line["bytes_out"] == 4013
    assert line["close_reason"] == "client_closed" and line["duration_ms"] >= 0


def test_a_client_half_close_reaches_the_target_and_the_answer_still_comes(tcp_origin: Any, l4_gateway: Any) -> None:
    counted: list[int] = []
    origin = tcp_origin(sink(counted))
    gw = l4_gateway([origin.address])
    with connect(gw.port) as sock:
        sock.sendall(b"x" * 300_000)
        sock.shutdown(socket.SHUT_WR)  # the target reads to EOF, then answers
        assert recv_until_close(sock) == b"300000\n"
    assert counted == [300_000]


def test_a_target_half_close_reaches_the_client_which_can_still_send(tcp_origin: Any, l4_gateway: Any) -> None:
    received: list[bytes] = []

    def says_bye_first(origin: TcpOrigin, conn: socket.socket) -> None:
        conn.sendall(b"bye")
        conn.shutdown(socket.SHUT_WR)
        received.append(recv_until_close(conn))

    origin = tcp_origin(says_bye_first)
    gw = l4_gateway([origin.address])
    with connect(gw.port) as sock:
        assert recv_until_close(sock) == b"bye"  # EOF from the target crossed over
        sock.sendall(b"still talking")
        sock.shutdown(socket.SHUT_WR)
        wait_for(lambda: received)
    assert received == [b"still talking"]


def test_a_refused_target_fails_over_to_the_next(tcp_origin: Any, l4_gateway: Any, tmp_path: Path) -> None:
    origin = tcp_origin(greeting=b"b\n")
    gw = l4_gateway([closed_port(), origin.address])
    for _ in range(4):  # round robin starts on either: every connection ends on b
        with connect(gw.port) as sock:
            assert recv_exactly(sock, 2) == b"b\n"
    lines = log_lines(tmp_path, 4)
    assert {line["target"] for line in lines} == {origin.address}


def test_every_target_refusing_closes_the_client(l4_gateway: Any, tmp_path: Path) -> None:
    gw = l4_gateway([closed_port(), closed_port()])
    with connect(gw.port) as sock:
        assert closed_soon(sock)
    [line] = log_lines(tmp_path)
    assert line["close_reason"] == "connect_failed" and line["target"] is None
    assert "error" in line


@pytest.fixture
def silent_target() -> Iterator[str]:
    """A listener whose accept queue is full: it drops new SYNs, so connects to it hang."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(silent.getsockname())
        fillers.append(filler)
    time.sleep(0.2)
    yield f"127.0.0.1:{silent.getsockname()[1]}"
    for filler in fillers:
        filler.close()
    silent.close()


def test_a_target_that_does_not_answer_the_connect_times_out_and_fails_over(
    tcp_origin: Any, l4_gateway: Any, tmp_path: Path, silent_target: str
) -> None:
    origin = tcp_origin(greeting=b"b\n")
    gw = l4_gateway([silent_target, origin.address], timeouts={"connect": "300ms"})
    for _ in range(2):
        with connect(gw.port) as sock:
            assert recv_exactly(sock, 2) == b"b\n"
    assert {line["target"] for line in log_lines(tmp_path, 2)} == {origin.address}
    stats = gw.gateway.snapshot.upstreams["db"].statistics()
    assert stats["targets"][0]["failures"] >= 1  # the timed-out connect counted against it


def test_what_a_client_sends_and_its_half_close_while_connecting_reach_the_target(
    tcp_origin: Any, l4_gateway: Any, silent_target: str
) -> None:
    counted: list[int] = []
    origin = tcp_origin(sink(counted))
    gw = l4_gateway([silent_target, origin.address], timeouts={"connect": "500ms"}, balance="random")
    for _ in range(3):  # random: some of these wait on the silent target first
        with connect(gw.port) as sock:
            sock.sendall(b"early bytes")
            sock.shutdown(socket.SHUT_WR)  # before any target is connected
            assert recv_until_close(sock) == b"11\n"
    assert counted == [11, 11, 11]


def test_a_target_killed_mid_stream_closes_the_client(tcp_origin: Any, l4_gateway: Any, tmp_path: Path) -> None:
    origin = tcp_origin()
    gw = l4_gateway([origin.address])
    with connect(gw.port) as sock:
        sock.sendall(b"abc")
        assert recv_exactly(sock, 3) == b"abc"
        origin.kill()
        assert closed_soon(sock)
    [line] = log_lines(tmp_path)
    assert line["close_reason"] in ("upstream_closed", "error")
    assert line["bytes_in"] == 3 and line["bytes_out"] == 3


def test_consistent_hash_on_ip_keeps_a_client_on_one_target(tcp_origin: Any, l4_gateway: Any) -> None:
    origins = [tcp_origin(greeting=b"%d\n" % i) for i in range(4)]
    gw = l4_gateway([o.address for o in origins], balance="consistent_hash", hash_on="ip")
    homes: dict[str, set[bytes]] = {}
    for last in range(2, 14):  # every 127.x.y.z is loopback: twelve client addresses
        client = f"127.0.0.{last}"
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10, source_address=(client, 0)) as sock:
                homes.setdefault(client, set()).add(recv_exactly(sock, 2))
    assert all(len(seen) == 1 for seen in homes.values())  # each client stays on its target
    assert len(set().union(*homes.values())) > 1  # and the clients spread over the targets


def test_round_robin_spreads_connections(tcp_origin: Any, l4_gateway: Any) -> None:
    origins = [tcp_origin(greeting=b"%d\n" % i) for i in range(2)]
    gw = l4_gateway([o.address for o in origins])
    seen = []
    for _ in range(4):
        with connect(gw.port) as sock:
            seen.append(recv_exactly(sock, 2))
    assert sorted(seen) == [b"0\n", b"0\n", b"1\n", b"1\n"]


def test_the_listener_connection_limit_closes_extra_connections_at_once(
    tcp_origin: Any, l4_gateway: Any, tmp_path: Path
) -> None:
    origin = tcp_origin()
    gw = l4_gateway([origin.address], listener={"limits": {"max_connections": 2}})
    first, second = connect(gw.port), connect(gw.port)
    try:
        for sock in (first, second):
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
        with connect(gw.port) as third:
            assert closed_soon(third, timeout=5)
        assert [line["close_reason"] for line in log_lines(tmp_path)] == ["over_limit"]
        first.close()
        wait_for(lambda: len(access_lines(tmp_path / "access.log")) == 2)
        with connect(gw.port) as fourth:  # a place is free again
            fourth.sendall(b"y")
            assert recv_exactly(fourth, 1) == b"y"
    finally:
        first.close()
        second.close()


def test_the_per_target_cap_sends_connections_elsewhere_then_refuses(
    tcp_origin: Any, l4_gateway: Any, tmp_path: Path
) -> None:
    origins = [tcp_origin(greeting=b"%d\n" % i) for i in range(2)]
    gw = l4_gateway([o.address for o in origins], max_connections=1, balance="consistent_hash")
    first, second = connect(gw.port), connect(gw.port)
    try:
        assert {recv_exactly(first, 2), recv_exactly(second, 2)} == {b"0\n", b"1\n"}  # hash or not: no room
        with connect(gw.port) as third:
            assert closed_soon(third, timeout=5)
        assert log_lines(tmp_path)[0]["close_reason"] == "targets_full"
    finally:
        first.close()
        second.close()


def test_a_tcp_health_check_marks_a_dead_target_down_and_traffic_avoids_it(tcp_origin: Any, l4_gateway: Any) -> None:
    origin = tcp_origin(greeting=b"live\n")
    dead = closed_port()
    check = {"active": {"type": "tcp", "interval": "100ms", "timeout": "200ms", "unhealthy": 1}}
    gw = l4_gateway([dead, origin.address], health_check=check)
    targets = gw.gateway.snapshot.upstreams["db"].targets
    wait_for(lambda: not targets[0].healthy)
    assert targets[1].healthy
    tries = targets[0].requests
    for _ in range(4):
        with connect(gw.port) as sock:
            assert recv_exactly(sock, 5) == b"live\n"
    assert targets[0].requests == tries  # never tried


def test_an_idle_connection_is_closed_after_the_idle_timeout(tcp_origin: Any, l4_gateway: Any, tmp_path: Path) -> None:
    origin = tcp_origin()
    gw = l4_gateway([origin.address], listener={"timeouts": {"idle": "300ms"}})
    with connect(gw.port) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        assert closed_soon(sock, timeout=10)
    assert log_lines(tmp_path)[0]["close_reason"] == "idle_timeout"


def test_metrics_count_l4_connections_and_bytes(tcp_origin: Any, l4_gateway: Any) -> None:
    origin = tcp_origin()
    gw = l4_gateway([origin.address])
    with connect(gw.port) as sock:
        sock.sendall(b"12345")
        assert recv_exactly(sock, 5) == b"12345"
        assert 'bastion_connections_active{listener="db"} 1.0' in gw.call(_metrics(gw))
    wait_for(lambda: gw.gateway.metrics.l4_connections)
    text = gw.call(_metrics(gw))
    assert 'bastion_connections_active{listener="db"} 0.0' in text
    assert 'bastion_l4_connections_total{listener="db",result="client_closed"} 1.0' in text
    assert 'bastion_l4_bytes_total{direction="in",listener="db"} 5.0' in text
    assert 'bastion_l4_bytes_total{direction="out",listener="db"} 5.0' in text


async def _metrics(gw: GatewayThread) -> str:
    from bastion.admin.report import merge_reports, process_report
    from bastion.observability.exposition import render

    return render(merge_reports([process_report(gw.gateway)], 1)).decode()


def test_a_target_that_greets_and_closes_at_once_is_relayed_whole(tcp_origin: Any, l4_gateway: Any) -> None:
    def greet_and_go(origin: TcpOrigin, conn: socket.socket) -> None:
        conn.sendall(b"busy, bye\n")

    origin = tcp_origin(greet_and_go)
    gw = l4_gateway([origin.address])
    for _ in range(5):
        with connect(gw.port) as sock:
            assert recv_until_close(sock) == b"busy, bye\n"


def test_clients_that_leave_at_once_give_every_place_back(tcp_origin: Any, l4_gateway: Any, tmp_path: Path) -> None:
    origin = tcp_origin()
    gw = l4_gateway([origin.address], listener={"limits": {"max_connections": 5}}, max_connections=5)
    for _ in range(40):  # some leave before the target is connected, some after
        sock = connect(gw.port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # a reset
    target = gw.gateway.snapshot.upstreams["db"].targets[0]
    wait_for(lambda: len(access_lines(tmp_path / "access.log")) == 40)
    assert target.in_flight == 0 and gw.gateway.l4.open.get("db", 0) == 0
    assert not gw.gateway.connections
    with connect(gw.port) as sock:  # and the limits still admit new ones
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"


def test_an_open_connection_outlives_a_reload_that_removes_its_target(
    tcp_origin: Any, l4_gateway: Any, tmp_path: Path
) -> None:
    a, b = tcp_origin(greeting=b"a\n"), tcp_origin(greeting=b"b\n")
    gw = l4_gateway([a.address])
    with connect(gw.port) as old:
        assert recv_exactly(old, 2) == b"a\n"
        config = l4_config(gw.port, [b.address])
        config["log"] = {"access_file": str(tmp_path / "access.log")}
        write_config(gw.config_path, config)
        assert gw.reload()
        old.sendall(b"ping")
        assert recv_exactly(old, 4) == b"ping"
        with connect(gw.port) as new:
            assert recv_exactly(new, 2) == b"b\n"
    lines = log_lines(tmp_path, 2)
    assert {line["target"] for line in lines} == {a.address, b.address}


def test_a_listener_can_turn_from_tcp_to_passthrough_on_reload(tcp_origin: Any, l4_gateway: Any) -> None:
    origin = tcp_origin(greeting=b"a\n")
    gw = l4_gateway([origin.address])
    config = l4_config(gw.port, [origin.address])
    listener = config["listeners"][0]
    del listener["upstream"]
    listener.update(protocol="tls_passthrough", sni_routes=[{"hosts": ["*"], "upstream": "db"}])
    write_config(gw.config_path, config)
    assert gw.reload()
    with connect(gw.port) as sock:
        sock.sendall(b"not a hello\r\n\r\n")
        assert closed_soon(sock)  # now it wants a ClientHello first
    assert origin.accepted == 0


def test_http_health_checks_work_for_l4_upstreams_too(tcp_origin: Any, l4_gateway: Any) -> None:
    from support import CannedOrigin

    live = CannedOrigin(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlive")
    try:
        check = {"active": {"type": "http", "path": "/healthz", "interval": "100ms", "unhealthy": 1}}
        gw = l4_gateway([closed_port(), f"127.0.0.1:{live.port}"], health_check=check)
        targets = gw.gateway.snapshot.upstreams["db"].targets
        wait_for(lambda: not targets[0].healthy and live.received)
        tries = targets[0].requests
        for _ in range(3):
            with connect(gw.port) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: db\r\n\r\n")
                assert recv_exactly(sock, 42).endswith(b"live")
        assert targets[0].requests == tries
    finally:
        live.stop()


def test_a_target_drained_through_the_admin_api_gets_no_new_connections(tcp_origin: Any, tmp_path: Path) -> None:
    from support import request

    a, b = tcp_origin(greeting=b"a\n"), tcp_origin(greeting=b"b\n")
    port, admin = free_port(), free_port()
    config = l4_config(port, [a.address, b.address])
    config["admin"] = {"bind": f"127.0.0.1:{admin}"}
    gw = GatewayThread(write_config(tmp_path / "gw.yaml", config), port)
    try:
        with connect(port) as first:
            home = recv_exactly(first, 2)
            drained = a.address if home == b"a\n" else b.address
            assert request(admin, "POST", f"/upstreams/db/targets/{drained}/drain").status == 200
            for _ in range(4):
                with connect(port) as sock:
                    assert recv_exactly(sock, 2) != home
            first.sendall(b"x")  # the drained target's open connection runs on
            assert recv_exactly(first, 1) == b"x"
    finally:
        gw.stop()


def test_refused_connects_eject_a_target_passively(tcp_origin: Any, l4_gateway: Any) -> None:
    origin = tcp_origin(greeting=b"b\n")
    check = {"passive": {"max_failures": 2, "ejection": "1m"}}
    gw = l4_gateway([closed_port(), origin.address], health_check=check)
    dead = gw.gateway.snapshot.upstreams["db"].targets[0]
    for _ in range(8):
        with connect(gw.port) as sock:
            assert recv_exactly(sock, 2) == b"b\n"
    assert dead.requests == 2 and dead.ejections == 1  # tried twice, then left alone


def test_a_client_sending_megabytes_while_the_connect_is_pending_is_held_back_then_relayed(
    tcp_origin: Any, l4_gateway: Any, silent_target: str
) -> None:
    import threading

    from bastion.l4.conn import HOLD_LIMIT, L4Connection

    counted: list[int] = []
    origin = tcp_origin(sink(counted))
    gw = l4_gateway([silent_target, origin.address], timeouts={"connect": "1s"})
    payload = bytes(range(256)) * 32768  # 8 MB, more than the sockets' buffers take
    with connect(gw.port) as sock:  # round robin starts on the silent target: a 1 s wait
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        held = 0
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            waiting = [c for c in list(gw.gateway.connections) if isinstance(c, L4Connection) and c.relay is None]
            held = max([held, *(len(c.pending) for c in waiting)])
            time.sleep(0.01)
        assert recv_until_close(sock) == b"%d\n" % len(payload)
        sender.join(10)
    assert counted == [len(payload)]
    assert 0 < held <= HOLD_LIMIT + 256 * 1024  # one read past the limit at most


def test_a_target_that_stops_reading_holds_the_client_back(tcp_origin: Any, l4_gateway: Any) -> None:
    import threading

    from bastion.l4.conn import L4Connection

    release = threading.Event()

    def never_reads(origin: TcpOrigin, conn: socket.socket) -> None:
        release.wait(20)

    origin = tcp_origin(never_reads)
    gw = l4_gateway([origin.address])
    sent = [0]

    def send_all(sock: socket.socket) -> None:
        block = bytes(1 << 20)
        with contextlib.suppress(OSError):
            for _ in range(64):  # 64 MB: far more than the sockets' buffers hold
                sock.sendall(block)
                sent[0] += len(block)

    with connect(gw.port, timeout=30) as sock:
        sender = threading.Thread(target=send_all, args=(sock,), daemon=True)
        sender.start()
        time.sleep(1.5)
        relays = [c.relay for c in list(gw.gateway.connections) if isinstance(c, L4Connection) and c.relay]
        assert len(relays) == 1
        relay = relays[0]
        assert relay.upstream.transport.get_write_buffer_size() <= 512 * 1024  # held, not buffered
        assert sender.is_alive() and sent[0] < 48 << 20  # the client is blocked, not the gateway's memory
        assert relay.statistics()["client_reading"] is False
        release.set()
        sock.close()
        sender.join(10)
