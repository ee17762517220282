"""PROXY protocol on tcp listeners: the header is read (and not relayed), its client is the
connection's client in the access log; with tls on the listener the header comes first."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bastion.net.proxy_protocol import encode_v1, encode_v2
from l4_support import TcpOrigin, access_lines, connect, l4_config, recv_exactly, tls_echo, wait_for
from support import GatewayThread, free_port, split_responses, write_config
from tls_support import Pki

CLIENT = ("203.0.113.7", 40001)
PROXY = {"proxy_protocol": {"accept": True, "trusted": ["127.0.0.1/32"]}}


@pytest.fixture
def origin() -> Iterator[TcpOrigin]:
    handle = TcpOrigin()  # echo
    yield handle
    handle.kill()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayThread]]:
    started: list[GatewayThread] = []

    def start(targets: list[str], listener: dict[str, Any]) -> GatewayThread:
        port = free_port()
        config = l4_config(port, targets, listener)
        config["log"] = {"access_file": str(tmp_path / "access.log")}
        handle = GatewayThread(write_config(tmp_path / "gw.yaml", config), port)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.mark.parametrize("encode", [encode_v1, encode_v2], ids=["v1", "v2"])
def test_tcp_listener_reads_the_header_and_logs_the_proxied_client(
    origin: TcpOrigin, gateway: Callable[..., GatewayThread], tmp_path: Path, encode: Callable[..., bytes]
) -> None:
    gw = gateway([origin.address], PROXY)
    with connect(gw.port) as sock:
        sock.sendall(encode(CLIENT, ("10.0.0.1", 5432)) + b"ping")
        assert recv_exactly(sock, 4) == b"ping"  # the echo saw only what followed the header
        sock.sendall(b"pong")
        assert recv_exactly(sock, 4) == b"pong"
    [line] = wait_for(lambda: access_lines(tmp_path / "access.log"))
    assert line["client"] == "203.0.113.7" and line["client_port"] == 40001
    assert line["bytes_in"] == 8


def test_tcp_listener_refuses_a_bad_header_before_connecting(
    origin: TcpOrigin, gateway: Callable[..., GatewayThread]
) -> None:
    gw = gateway([origin.address], PROXY)
    with connect(gw.port) as sock:
        sock.sendall(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\nping")
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(10) == b""
    assert origin.accepted == 0
    assert gw.gateway.metrics.proxy_stats("db").invalid == 1


def test_tcp_listener_with_tls_reads_the_header_before_the_handshake(
    origin: TcpOrigin, gateway: Callable[..., GatewayThread], tmp_path: Path
) -> None:
    pki = Pki(tmp_path)
    cert, key = pki.issue("db", "db.example.com")
    gw = gateway([origin.address], {**PROXY, "tls": {"certificates": [{"cert": cert, "key": key}]}})
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as raw:
        raw.sendall(encode_v2(CLIENT, ("10.0.0.1", 5432)))
        with pki.client_context().wrap_socket(raw, server_hostname="db.example.com") as tls:
            tls.sendall(b"ping")
            assert recv_exactly(tls, 4) == b"ping"
    [line] = wait_for(lambda: access_lines(tmp_path / "access.log"))
    assert line["client"] == "203.0.113.7"


def test_tcp_listener_with_tls_without_header_is_closed(
    origin: TcpOrigin, gateway: Callable[..., GatewayThread], tmp_path: Path
) -> None:
    pki = Pki(tmp_path)
    cert, key = pki.issue("db", "db.example.com")
    gw = gateway([origin.address], {**PROXY, "tls": {"certificates": [{"cert": cert, "key": key}]}})
    with (
        pytest.raises((ssl.SSLError, OSError)),
        socket.create_connection(("127.0.0.1", gw.port), timeout=5) as raw,
        pki.client_context().wrap_socket(raw, server_hostname="db.example.com"),
    ):
        pass
    assert origin.accepted == 0


def test_tls_passthrough_reads_the_header_then_routes_the_hello_by_sni(tmp_path: Path) -> None:
    """The ClientHello sent right behind the header (one write) still picks the route."""
    pki = Pki(tmp_path)
    cert, key = pki.issue("db", "db.example.com")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    origin = TcpOrigin(tls_echo(context))
    port = free_port()
    config = {
        "version": 1,
        "listeners": [
            {
                "name": "edge",
                "bind": f"127.0.0.1:{port}",
                "protocol": "tls_passthrough",
                "sni_routes": [{"hosts": ["db.example.com"], "upstream": "db"}],
                **PROXY,
            }
        ],
        "upstreams": {"db": {"targets": [{"address": origin.address}]}},
        "log": {"access_file": str(tmp_path / "access.log")},
    }
    gw = GatewayThread(write_config(tmp_path / "gw.yaml", config), port)
    try:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = pki.client_context().wrap_bio(incoming, outgoing, server_hostname="db.example.com")
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(encode_v2(CLIENT, ("10.0.0.1", 443)) + outgoing.read())
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    data = sock.recv(65536)
                    assert data, "closed during the handshake"
                    incoming.write(data)
                    sock.sendall(outgoing.read())
            sock.sendall(outgoing.read())
            tls.write(b"hello")
            sock.sendall(outgoing.read())
            received = b""
            while len(received) < 5:
                incoming.write(sock.recv(65536))
                with contextlib.suppress(ssl.SSLWantReadError):
                    received += tls.read(65536)
        assert received == b"hello"
        [line] = wait_for(lambda: access_lines(tmp_path / "access.log"))
        assert line["client"] == "203.0.113.7"
    finally:
        gw.stop()
        origin.kill()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_tcp_listener_sending_proxy_to_an_http_listener_accepting_it(
    tmp_path: Path, origins: Callable[..., Any], version: str
) -> None:
    """Both halves in one gateway: tcp :front (send_proxy_protocol) -> http :back (accept) ->
    origin. The client connects from 127.0.0.3; the origin must see it, not 127.0.0.1."""
    origin = origins("a")
    front, back = free_port(), free_port()
    config = {
        "version": 1,
        "listeners": [
            {"name": "front", "bind": f"127.0.0.1:{front}", "protocol": "tcp", "upstream": "back"},
            {"name": "back", "bind": f"127.0.0.1:{back}", **PROXY},
        ],
        "upstreams": {
            "back": {"targets": [{"address": f"127.0.0.1:{back}"}], "send_proxy_protocol": version},
            "app": {"targets": [{"address": origin.address}]},
        },
        "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "app"}],
        "log": {"access": False},
    }
    gw = GatewayThread(write_config(tmp_path / "gw.yaml", config), front)
    try:
        with socket.create_connection(("127.0.0.1", front), timeout=10, source_address=("127.0.0.3", 0)) as sock:
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    finally:
        gw.stop()
    [(status, _, body)] = split_responses(data)
    assert status == 200
    assert json.loads(body)["headers"]["x-forwarded-for"] == "127.0.0.3"
