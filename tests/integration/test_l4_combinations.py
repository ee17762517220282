"""Cross-feature review of L4 listeners: the connection limit with the PROXY protocol
(untrusted peers, bad headers and timeouts give their place back), and a UDP listener at its
session limit across a reload that changes the upstream."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bastion.net.proxy_protocol import encode_v2
from l4_support import TcpOrigin, closed_soon, connect, l4_config, recv_exactly, wait_for
from support import GatewayThread, free_port, write_config
from udp_support import DnsClient, DnsServer

CLIENT = ("203.0.113.7", 40001)


@pytest.fixture
def origin() -> Iterator[TcpOrigin]:
    handle = TcpOrigin()
    yield handle
    handle.kill()


def start(tmp_path: Path, config: dict[str, Any]) -> GatewayThread:
    port = int(config["listeners"][0]["bind"].rpartition(":")[2])
    return GatewayThread(write_config(tmp_path / "gw.yaml", config), port)


def echo_through(port: int, header: bytes) -> bool:
    with connect(port) as sock:
        sock.sendall(header + b"hi")
        try:
            return recv_exactly(sock, 2) == b"hi"
        except (AssertionError, OSError):
            return False


@pytest.mark.parametrize("trusted", [["10.0.0.0/8"], ["127.0.0.0/8"]], ids=["untrusted", "trusted-bad-header"])
def test_refused_proxy_connections_give_their_place_back(tmp_path: Path, origin: TcpOrigin, trusted: list[str]) -> None:
    port = free_port()
    listener = {
        "limits": {"max_connections": 2},
        "proxy_protocol": {"accept": True, "trusted": trusted},
        "timeouts": {"header": "1s"},
    }
    gw = start(tmp_path, l4_config(port, [origin.address], listener))
    try:
        for _ in range(20):
            with connect(port) as sock:
                sock.sendall(b"GARBAGE NOT A PROXY HEADER\r\n")
                assert closed_soon(sock, timeout=5)
        assert origin.accepted == 0
        if trusted == ["127.0.0.0/8"]:
            wait_for(lambda: echo_through(port, encode_v2(CLIENT, ("10.0.0.1", 5432))), timeout=5)
            first, second = connect(port), connect(port)
            try:
                for sock in (first, second):
                    sock.sendall(encode_v2(CLIENT, ("10.0.0.1", 5432)) + b"x")
                    assert recv_exactly(sock, 1) == b"x"
                with connect(port) as third:
                    assert closed_soon(third, timeout=5)
            finally:
                first.close()
                second.close()
    finally:
        gw.stop()


def test_silent_proxy_connections_time_out_and_free_the_listener(tmp_path: Path, origin: TcpOrigin) -> None:
    port = free_port()
    listener = {
        "limits": {"max_connections": 2},
        "proxy_protocol": {"accept": True, "trusted": ["127.0.0.0/8"]},
        "timeouts": {"header": "300ms"},
    }
    gw = start(tmp_path, l4_config(port, [origin.address], listener))
    try:
        silent = [connect(port) for _ in range(2)]
        try:
            for sock in silent:
                assert closed_soon(sock, timeout=5)
        finally:
            for sock in silent:
                sock.close()
        wait_for(lambda: echo_through(port, encode_v2(CLIENT, ("10.0.0.1", 5432))), timeout=5)
    finally:
        gw.stop()


def test_udp_at_its_session_limit_across_a_reload_that_changes_the_upstream(tmp_path: Path) -> None:
    from udp_support import tcp_and_udp_port

    old, new = DnsServer("10.0.0.1"), DnsServer("10.0.0.2")
    port = tcp_and_udp_port()
    config = {
        "version": 1,
        "listeners": [
            {
                "name": "dns",
                "bind": f"127.0.0.1:{port}",
                "protocol": "udp",
                "upstream": "dns",
                "udp": {"max_sessions": 5},
            }
        ],
        "upstreams": {"dns": {"targets": [{"address": old.address}]}},
        "log": {"access": False},
    }
    path = write_config(tmp_path / "gw.yaml", config)
    gw = GatewayThread(path, port)
    clients = [DnsClient(port) for _ in range(12)]
    try:
        assert all(c.resolve(attempts=3) == "10.0.0.1" for c in clients)
        config["upstreams"]["dns"]["targets"] = [{"address": new.address}]
        write_config(path, config)
        assert gw.reload()
        # Every client, old session or new (evicting others), reaches the new target within a
        # second or two: sessions whose target left move.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answers = [c.resolve(attempts=2) for c in clients]
            if all(a == "10.0.0.2" for a in answers):
                break
        assert all(a == "10.0.0.2" for a in answers), answers
    finally:
        for c in clients:
            c.close()
        gw.stop()
        old.stop()
        new.stop()


def test_a_reload_that_turns_an_http_listener_into_tcp_ends_its_http2_connections(
    tmp_path: Path, origin: TcpOrigin, origins: Any
) -> None:
    """Same bind, http -> tcp: new connections are relayed, and the open HTTP/2 connection is
    told to go (GOAWAY) instead of serving HTTP on what is now a tcp listener for ever."""
    from h2_support import RawH2

    web = origins("web")
    port = free_port()
    config: dict[str, Any] = {
        "version": 1,
        "listeners": [{"name": "front", "bind": f"127.0.0.1:{port}", "http2": "prior_knowledge"}],
        "upstreams": {"app": {"targets": [{"address": web.address}]}, "db": {"targets": [{"address": origin.address}]}},
        "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "app"}],
        "log": {"access": False},
    }
    gw = start(tmp_path, config)
    try:
        with RawH2(port) as client:
            assert client.response(client.request("/echo"))[0] == 200
            config["listeners"] = [{"name": "front", "bind": f"127.0.0.1:{port}", "protocol": "tcp", "upstream": "db"}]
            write_config(gw.config_path, config)
            assert gw.reload()
            assert echo_through(port, b"")
            client.until(client.goaway)
            client.wait_closed()
    finally:
        gw.stop()


def test_a_largest_datagram_with_a_proxy_v2_header_does_not_break_the_session(tmp_path: Path) -> None:
    """65507 bytes (the most IPv4 UDP carries) plus the 28-byte PROXY v2 header cannot be sent
    to the target: that datagram is lost, the session and the listener go on."""
    from udp_support import tcp_and_udp_port

    server = DnsServer("10.9.9.9", proxy_v2=True)
    port = tcp_and_udp_port()
    config = {
        "version": 1,
        "listeners": [{"name": "dns", "bind": f"127.0.0.1:{port}", "protocol": "udp", "upstream": "dns"}],
        "upstreams": {"dns": {"targets": [{"address": server.address}], "send_proxy_protocol": "v2"}},
        "log": {"access": False},
    }
    gw = GatewayThread(write_config(tmp_path / "gw.yaml", config), port)
    client = DnsClient(port)
    try:
        assert client.resolve(attempts=3) == "10.9.9.9"
        client.sock.send(b"\x00" * 65507)
        assert client.resolve(attempts=3) == "10.9.9.9"
        other = DnsClient(port)
        try:
            assert other.resolve(attempts=3) == "10.9.9.9"
        finally:
            other.close()
    finally:
        client.close()
        gw.stop()
        server.stop()
