"""`send_proxy_protocol` on tcp and tls_passthrough upstreams: the target learns the client."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Any

import pytest

from bastion.net.proxy_protocol import parse
from l4_support import TcpOrigin, access_lines, connect, l4_config, recv_exactly, wait_for
from support import GatewayThread, free_port, write_config


def recording(seen: list[bytes]) -> Any:
    """An origin that keeps the first 200 bytes it gets, then echoes 'ok'."""

    def handle(origin: TcpOrigin, conn: socket.socket) -> None:
        data = b""
        while b"hello" not in data:
            more = conn.recv(200)
            if not more:
                break
            data += more
        seen.append(data)
        conn.sendall(b"ok")

    return handle


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_target_gets_a_header_naming_the_client_then_its_bytes(tmp_path: Path, version: str) -> None:
    seen: list[bytes] = []
    origin = TcpOrigin(recording(seen))
    port = free_port()
    config = l4_config(port, [origin.address], send_proxy_protocol=version)
    config["log"] = {"access_file": str(tmp_path / "access.log")}
    gw = GatewayThread(write_config(tmp_path / "gw.yaml", config), port)
    try:
        with connect(port) as sock:
            sock.sendall(b"hello")
            assert recv_exactly(sock, 2) == b"ok"
            client_port = sock.getsockname()[1]
        [data] = seen
        header = parse(data)
        assert header is not None and header.version == int(version[1])
        assert header.source == ("127.0.0.1", client_port)
        assert header.destination == ("127.0.0.1", port)
        assert data[header.length :] == b"hello"
        if version == "v1":
            assert data == b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\nhello" % (client_port, port)
        [line] = wait_for(lambda: access_lines(tmp_path / "access.log"))
        assert line["bytes_in"] == 5  # the header is the gateway's, not the client's
    finally:
        gw.stop()
        origin.kill()


def test_a_client_named_by_a_front_balancer_is_passed_on(tmp_path: Path) -> None:
    seen: list[bytes] = []
    origin = TcpOrigin(recording(seen))
    port = free_port()
    listener = {"proxy_protocol": {"accept": True, "trusted": ["127.0.0.1/32"]}}
    config = l4_config(port, [origin.address], listener=listener, send_proxy_protocol="v2")
    config["log"] = {"access_file": str(tmp_path / "access.log")}
    gw = GatewayThread(write_config(tmp_path / "gw.yaml", config), port)
    try:
        with connect(port) as sock:
            sock.sendall(b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 5432\r\nhello")
            assert recv_exactly(sock, 2) == b"ok"
        header = parse(seen[0])
        assert header is not None and header.source == ("203.0.113.7", 40000)
        assert seen[0][header.length :] == b"hello"
        [line] = wait_for(lambda: access_lines(tmp_path / "access.log"))
        assert line["client"] == "203.0.113.7" and line["client_port"] == 40000
    finally:
        gw.stop()
        origin.kill()


def test_passthrough_sends_the_header_before_the_client_hello(tmp_path: Path) -> None:
    seen: list[bytes] = []

    def first_bytes(origin: TcpOrigin, conn: socket.socket) -> None:
        data = b""
        while len(data) < 40:
            more = conn.recv(4096)
            if not more:
                break
            data += more
        seen.append(data)

    origin = TcpOrigin(first_bytes)
    port = free_port()
    config = {
        "version": 1,
        "listeners": [
            {
                "name": "edge",
                "bind": f"127.0.0.1:{port}",
                "protocol": "tls_passthrough",
                "sni_routes": [{"hosts": ["*"], "upstream": "tls"}],
            }
        ],
        "upstreams": {"tls": {"targets": [{"address": origin.address}], "send_proxy_protocol": "v2"}},
        "log": {"access": False},
    }
    gw = GatewayThread(write_config(tmp_path / "gw.yaml", config), port)
    try:
        import ssl

        context = ssl.create_default_context()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="db.example.com")
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        with connect(port) as sock:
            sock.sendall(hello)
            wait_for(lambda: seen)
        header = parse(seen[0])
        assert header is not None and header.source is not None and header.source[0] == "127.0.0.1"
        assert seen[0][header.length :] == hello[: len(seen[0]) - header.length]
        assert seen[0][header.length] == 0x16  # the hello follows, untouched
    finally:
        gw.stop()
        origin.kill()
