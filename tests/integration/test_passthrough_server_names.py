"""Cross-feature review of tls_passthrough routing by odd server names: case, a trailing dot,
the longest names, an IP literal (which RFC 6066 forbids in SNI), each sent by a real TLS
client's ClientHello; PROXY v2 in front of one."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bastion.net.proxy_protocol import encode_v2
from l4_support import TcpOrigin, closed_soon
from support import GatewayThread, free_port, write_config


def client_hello(server_name: str) -> bytes:
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[int, TcpOrigin, TcpOrigin]]:
    exact, fallback = TcpOrigin(greeting=b"E"), TcpOrigin(greeting=b"F")
    port = free_port()
    config: dict[str, Any] = {
        "version": 1,
        "listeners": [
            {
                "name": "edge",
                "bind": f"127.0.0.1:{port}",
                "protocol": "tls_passthrough",
                "proxy_protocol": {"accept": True, "trusted": ["127.0.0.2/32"]},
                "sni_routes": [
                    {"hosts": ["db.example.com"], "upstream": "exact"},
                    {"hosts": ["*"], "upstream": "fallback"},
                ],
            }
        ],
        "upstreams": {
            "exact": {"targets": [{"address": exact.address}]},
            "fallback": {"targets": [{"address": fallback.address}]},
        },
        "log": {"access": False},
    }
    gw = GatewayThread(write_config(tmp_path / "gw.yaml", config), port)
    yield port, exact, fallback
    gw.stop()
    exact.kill()
    fallback.kill()


def routed(port: int, hello: bytes, source: str = "127.0.0.2", header: bytes | None = None) -> bytes:
    """The greeting of the origin the hello reached; b"" when the gateway closed instead."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as sock:
        sock.sendall((header if header is not None else encode_v2(("203.0.113.9", 5000), ("10.0.0.1", 443))) + hello)
        try:
            return sock.recv(1)
        except OSError:
            return b""


LONGEST = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253: the longest DNS name


@pytest.mark.parametrize(
    ("name", "expected"),
    [("DB.EXAMPLE.COM", b"E"), ("Db.Example.Com.", b"E"), ("x.db.example.com", b"F"), (LONGEST, b"F")],
)
def test_server_names_route_without_case_and_trailing_dot(setup: Any, name: str, expected: bytes) -> None:
    port, _, _ = setup
    assert routed(port, client_hello(name)) == expected


@pytest.mark.parametrize("extra", [1, 2], ids=["254", "255"])
def test_a_name_longer_than_dns_allows_is_closed_and_the_listener_lives(setup: Any, extra: int) -> None:
    port, exact, fallback = setup
    name = LONGEST + "b" * extra
    assert routed(port, client_hello(name)) == b""
    assert exact.accepted == 0 and fallback.accepted == 0
    assert routed(port, client_hello("db.example.com")) == b"E"


def test_an_ip_literal_as_server_name_goes_to_the_star_route_or_is_closed(setup: Any) -> None:
    port, exact, _ = setup
    placeholder = "abc.def.g"  # as long as 127.0.0.1: the lengths in the hello stay right
    hello = client_hello(placeholder).replace(placeholder.encode(), b"127.0.0.1")
    assert routed(port, hello) in (b"F", b"")
    assert exact.accepted == 0
    assert routed(port, client_hello("db.example.com")) == b"E"


def test_an_untrusted_peer_with_a_proxy_header_and_a_hello_is_closed(setup: Any) -> None:
    port, exact, fallback = setup
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.3", 0)) as sock:
        sock.sendall(encode_v2(("203.0.113.9", 5000), ("10.0.0.1", 443)) + client_hello("db.example.com"))
        assert closed_soon(sock, timeout=5)
    assert exact.accepted == 0 and fallback.accepted == 0
