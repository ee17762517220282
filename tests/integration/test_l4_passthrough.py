"""TLS passthrough listeners over real sockets: routed by SNI, relayed untouched, bad hellos closed."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from l4_support import TcpOrigin, access_lines, closed_soon, connect, recv_exactly, tls_echo, wait_for
from support import GatewayThread, free_port, write_config
from tls_support import Pki, served_names, tls_socket


class Setup:
    """Three TLS origins, each with its own certificate, behind one passthrough listener."""

    def __init__(self, tmp_path: Path, routes: list[dict[str, Any]], **listener: Any) -> None:
        self.pki = Pki(tmp_path)
        self.origins: dict[str, TcpOrigin] = {}
        upstreams = {}
        for name, host in (("exact", "db.example.com"), ("wild", "*.apps.example.com"), ("fallback", "default.test")):
            cert, key = self.pki.issue(name, host)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            origin = self.origins[name] = TcpOrigin(tls_echo(context))
            upstreams[name] = {"targets": [{"address": origin.address}]}
        self.port = free_port()
        self.log = tmp_path / "access.log"
        config = {
            "version": 1,
            "listeners": [
                {
                    "name": "edge",
                    "bind": f"127.0.0.1:{self.port}",
                    "protocol": "tls_passthrough",
                    "sni_routes": routes,
                    **listener,
                }
            ],
            "upstreams": upstreams,
            "log": {"access_file": str(self.log)},
        }
        self.gateway = GatewayThread(write_config(tmp_path / "gw.yaml", config), self.port)

    def names(self, server_name: str | None) -> list[str]:
        """Handshake through the gateway (the chain verified against the test CA), echo a few
        bytes, return the names of the certificate the client saw."""
        context = self.pki.client_context()
        context.check_hostname = False  # names are compared by the tests
        with tls_socket(self.port, server_name, context) as tls:
            tls.sendall(b"hello inside")
            assert recv_exactly(tls, 12) == b"hello inside"  # type: ignore[arg-type]
            return served_names(tls)

    def stop(self) -> None:
        self.gateway.stop()
        for origin in self.origins.values():
            origin.kill()


ALL_ROUTES = [
    {"hosts": ["db.example.com"], "upstream": "exact"},
    {"hosts": ["*.apps.example.com"], "upstream": "wild"},
    {"hosts": ["*"], "upstream": "fallback"},
]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Callable[..., Setup]]:
    started: list[Setup] = []

    def start(routes: list[dict[str, Any]] = ALL_ROUTES, **listener: Any) -> Setup:
        handle = Setup(tmp_path, routes, **listener)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


def client_hello(server_name: str | None) -> bytes:
    """The first flight of a real TLS client (its ClientHello records)."""
    context = ssl.create_default_context()
    if server_name is None:
        context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_each_server_name_reaches_its_own_origin_whose_certificate_the_client_sees(setup: Any) -> None:
    s = setup()
    assert s.names("db.example.com") == ["db.example.com"]
    assert s.names("x.apps.example.com") == ["*.apps.example.com"]  # wildcard route
    assert s.names("deep.x.apps.example.com") == ["*.apps.example.com"]  # any depth
    assert s.names("DB.Example.COM") == ["db.example.com"]  # names compare case-insensitively
    assert s.names("other.test") == ["default.test"]  # *
    assert s.origins["exact"].accepted == 2 and s.origins["wild"].accepted == 2
    lines = wait_for(lambda: len(access_lines(s.log)) == 5 and access_lines(s.log))
    assert [line["sni"] for line in lines] == [
        "db.example.com",
        "x.apps.example.com",
        "deep.x.apps.example.com",
        "db.example.com",
        "other.test",
    ]
    assert [line["upstream"] for line in lines] == ["exact", "wild", "wild", "exact", "fallback"]
    assert all(line["protocol"] == "tls_passthrough" and line["bytes_in"] > 500 for line in lines)


def test_a_hello_without_sni_goes_to_the_star_route(setup: Any) -> None:
    s = setup()
    assert s.names(None) == ["default.test"]


def test_without_a_star_route_an_unknown_name_or_no_sni_is_closed(setup: Any) -> None:
    s = setup(routes=ALL_ROUTES[:2])
    for name in ("other.test", None):
        with connect(s.port) as sock:
            sock.sendall(client_hello(name))
            assert closed_soon(sock)
    lines = wait_for(lambda: len(access_lines(s.log)) == 2 and access_lines(s.log))
    assert [line["close_reason"] for line in lines] == ["no_route", "no_route"]
    assert sum(origin.accepted for origin in s.origins.values()) == 0


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: db.example.com\r\n\r\n",  # not TLS
        b"\x16\x03\x01\x00\x00",  # an empty record
        b"\x16\x03\x01\x40\x01" + b"\x01",  # a record over 16 KB
        b"\x16\x03\x01\x00\x08\x02\x00\x00\x04\x03\x03\x00\x00",  # a ServerHello first
        b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00",  # a ClientHello too short
        b"\x16\x03\x01\x00\x04\x01\x01\x00\x00",  # a ClientHello that claims 64 KB
        b"\x80\x2e\x01\x03\x01",  # an SSLv2 hello
    ],
)
def test_garbage_and_malformed_hellos_are_closed(setup: Any, data: bytes) -> None:
    s = setup()
    with connect(s.port) as sock:
        sock.sendall(data)
        assert closed_soon(sock)
    [line] = wait_for(lambda: access_lines(s.log))
    assert line["close_reason"] == "bad_hello" and line["upstream"] is None
    assert sum(origin.accepted for origin in s.origins.values()) == 0


def test_a_hello_that_never_ends_is_closed_at_the_size_bound(setup: Any) -> None:
    s = setup()
    with connect(s.port) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x04\x01\x00\x3f\xff")  # a 16 KB hello announced...
        try:
            for _ in range(8000):  # ... then sent in 1-byte records: more bytes than the bound
                sock.sendall(b"\x16\x03\x01\x00\x01\x00" * 10)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert closed_soon(sock)
    [line] = wait_for(lambda: access_lines(s.log))
    assert line["close_reason"] == "bad_hello" and "no complete hello" in line["error"]


def test_a_hello_arriving_in_pieces_is_parsed_about_once_per_record(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bastion.l4.clienthello import HelloReader

    calls: list[int] = []
    real = HelloReader.feed

    def counted(self: HelloReader, data: bytes) -> Any:
        calls.append(len(data))
        return real(self, data)

    monkeypatch.setattr(HelloReader, "feed", counted)
    s = setup()
    hello = client_hello("db.example.com")
    with connect(s.port) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(hello), 25):
            sock.sendall(hello[start : start + 25])
            time.sleep(0.005)  # separate reads on the gateway's side
        wait_for(lambda: s.origins["exact"].accepted == 1)
    assert len(calls) <= 3, calls  # the record header says how many bytes to wait for


def test_a_slow_hello_is_closed_at_the_header_timeout(setup: Any) -> None:
    s = setup(timeouts={"header": "500ms"})
    hello = client_hello("db.example.com")
    with connect(s.port) as sock:
        sock.sendall(hello[:20])
        started = time.monotonic()
        assert closed_soon(sock, timeout=10)
        assert time.monotonic() - started >= 0.3
    [line] = wait_for(lambda: access_lines(s.log))
    assert line["close_reason"] == "hello_timeout"


def test_a_hello_sent_byte_by_byte_is_routed(setup: Any) -> None:
    s = setup()
    context = s.pki.client_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="x.apps.example.com")
    with connect(s.port) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        for byte in outgoing.read():
            sock.sendall(bytes([byte]))
        while True:  # finish the handshake over the socket with the origin
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, "closed during the handshake"
                incoming.write(data)
        sock.sendall(outgoing.read())
        tls.write(b"ok?")
        sock.sendall(outgoing.read())
        while True:
            try:
                assert tls.read(3) == b"ok?"
                break
            except ssl.SSLWantReadError:
                incoming.write(sock.recv(65536))
        assert served_names_of(tls) == ["*.apps.example.com"]


def served_names_of(tls: ssl.SSLObject) -> list[str]:
    class _Peer:
        def getpeercert(self, binary_form: bool) -> bytes | None:
            return tls.getpeercert(binary_form=True)

    return served_names(_Peer())


def test_a_proxy_protocol_header_in_front_of_the_hello_names_the_client(setup: Any) -> None:
    s = setup(proxy_protocol={"accept": True, "trusted": ["127.0.0.1/32"]})
    with connect(s.port) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.9 198.51.100.1 41000 443\r\n")
        context = s.pki.client_context()
        with context.wrap_socket(sock, server_hostname="db.example.com") as tls:
            tls.sendall(b"hi")
            assert recv_exactly(tls, 2) == b"hi"  # type: ignore[arg-type]
            assert served_names(tls) == ["db.example.com"]
    [line] = wait_for(lambda: access_lines(s.log))
    assert line["client"] == "203.0.113.9" and line["sni"] == "db.example.com"


def test_idle_hello_holders_are_capped_then_timed_out(setup: Any) -> None:
    s = setup(limits={"max_connections": 2}, timeouts={"header": "500ms"})
    holders = [connect(s.port), connect(s.port)]
    try:
        for sock in holders:
            sock.sendall(b"\x16")  # one byte of a record header, then nothing
        with connect(s.port) as third:
            assert closed_soon(third, timeout=5)  # the listener is full
        for sock in holders:
            assert closed_soon(sock, timeout=10)  # hello_timeout frees the places
        assert s.names("db.example.com") == ["db.example.com"]
    finally:
        for sock in holders:
            sock.close()
    reasons = [line["close_reason"] for line in wait_for(lambda: len(access_lines(s.log)) == 4 and access_lines(s.log))]
    assert sorted(reasons[:3]) == ["hello_timeout", "hello_timeout", "over_limit"]
    assert reasons[3] in ("client_closed", "upstream_closed")  # the full TLS exchange at the end
