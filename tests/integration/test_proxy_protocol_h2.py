"""Cross-feature review: the PROXY protocol in front of HTTP/2 (h2c by prior knowledge, h2 by
ALPN) and in front of TLS passthrough; the proxied address is the one the origin sees."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest

from bastion.demo.origin import OriginHandle
from bastion.net.proxy_protocol import encode_v1, encode_v2
from support import GatewayThread, free_port, write_config
from tls_support import Pki

CLIENT = ("203.0.113.7", 40001)
SERVER = ("10.0.0.1", 80)


def config(port: int, origin: OriginHandle, **listener: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": [
            {
                "name": "web",
                "bind": f"127.0.0.1:{port}",
                "proxy_protocol": {"accept": True, "trusted": ["127.0.0.0/8"]},
                "timeouts": {"header": "2s"},
                **listener,
            }
        ],
        "upstreams": {"app": {"targets": [{"address": origin.address}]}},
        "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "app"}],
        "log": {"access": False},
    }


@pytest.fixture
def origin(origins: Callable[..., OriginHandle]) -> OriginHandle:
    return origins("a")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], GatewayThread]]:
    started: list[GatewayThread] = []

    def run(cfg: dict[str, Any]) -> GatewayThread:
        port = int(cfg["listeners"][0]["bind"].rpartition(":")[2])
        handle = GatewayThread(write_config(tmp_path / f"gw{len(started)}.yaml", cfg), port)
        started.append(handle)
        return handle

    yield run
    for handle in started:
        handle.stop()


def h2_get(sock: socket.socket | ssl.SSLSocket, prefix: bytes = b"", split: int | None = None) -> dict[str, Any]:
    """Send `prefix` (a PROXY header) then an HTTP/2 GET /echo; `split`: the first `split`
    bytes of all that go alone, the rest in one later write."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/echo"), (b":authority", b"a.com")],
        end_stream=True,
    )
    data = prefix + conn.data_to_send()
    if split is not None:
        sock.sendall(data[:split])
        time.sleep(0.05)
        data = data[split:]
    sock.sendall(data)
    body = b""
    status = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        assert chunk, "closed before the answer"
        for event in conn.receive_data(chunk):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, 1)
            elif isinstance(event, h2.events.StreamEnded):
                assert status == 200, body
                result: dict[str, Any] = json.loads(body)
                return result
        sock.sendall(conn.data_to_send())
    raise AssertionError("no answer")


@pytest.mark.parametrize("encode", [encode_v1, encode_v2], ids=["v1", "v2"])
def test_h2c_after_a_proxy_header_reaches_the_origin_as_the_proxied_client(
    start: Callable[..., GatewayThread], origin: OriginHandle, encode: Callable[..., bytes]
) -> None:
    gw = start(config(free_port(), origin, http2="prior_knowledge"))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        seen = h2_get(sock, encode(CLIENT, SERVER))
    assert seen["headers"]["x-forwarded-for"] == "203.0.113.7"


@pytest.mark.parametrize("encode", [encode_v1, encode_v2], ids=["v1", "v2"])
def test_the_last_byte_of_the_proxy_header_and_the_preface_in_one_read(
    start: Callable[..., GatewayThread], origin: OriginHandle, encode: Callable[..., bytes]
) -> None:
    gw = start(config(free_port(), origin, http2="prior_knowledge"))
    header = encode(CLIENT, SERVER)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        seen = h2_get(sock, header, split=len(header) - 1)
    assert seen["headers"]["x-forwarded-for"] == "203.0.113.7"


def test_h2c_preface_split_after_the_proxy_header(start: Callable[..., GatewayThread], origin: OriginHandle) -> None:
    """The header, then the preface in two reads: the sniffer must still pick HTTP/2."""
    gw = start(config(free_port(), origin, http2="prior_knowledge"))
    header = encode_v2(CLIENT, SERVER)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        seen = h2_get(sock, header, split=len(header) + 5)
    assert seen["headers"]["x-forwarded-for"] == "203.0.113.7"


def test_h2_by_alpn_after_a_proxy_header(
    start: Callable[..., GatewayThread], origin: OriginHandle, tmp_path: Path
) -> None:
    pki = Pki(tmp_path)
    cert, key = pki.issue("a", "a.example.com")
    gw = start(config(free_port(), origin, protocol="https", tls={"certificates": [{"cert": cert, "key": key}]}))
    context = pki.client_context()
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as raw:
        raw.sendall(encode_v2(CLIENT, ("10.0.0.1", 443)))
        with context.wrap_socket(raw, server_hostname="a.example.com") as tls:
            assert tls.selected_alpn_protocol() == "h2"
            seen = h2_get(tls)
    assert seen["headers"]["x-forwarded-for"] == "203.0.113.7"
    assert seen["headers"]["x-forwarded-proto"] == "https"


def test_an_untrusted_peer_sending_the_h2_preface_is_closed(
    start: Callable[..., GatewayThread], origin: OriginHandle
) -> None:
    cfg = config(free_port(), origin, http2="prior_knowledge")
    cfg["listeners"][0]["proxy_protocol"]["trusted"] = ["10.0.0.0/8"]
    gw = start(cfg)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        sock.settimeout(5)
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
    assert data == b""


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_h2c_through_a_tcp_listener_that_sends_proxy_to_an_h2c_listener(
    tmp_path: Path, origin: OriginHandle, version: str
) -> None:
    """tcp :front (send_proxy_protocol) -> h2c :back (accept) -> origin: the front writes the
    header and the client's first bytes (the preface) as they come; the origin must see the
    client's address (127.0.0.3), not the front's."""
    front, back = free_port(), free_port()
    cfg = config(back, origin, http2="prior_knowledge")
    cfg["listeners"].insert(0, {"name": "front", "bind": f"127.0.0.1:{front}", "protocol": "tcp", "upstream": "back"})
    cfg["upstreams"]["back"] = {"targets": [{"address": f"127.0.0.1:{back}"}], "send_proxy_protocol": version}
    gw = GatewayThread(write_config(tmp_path / "gw.yaml", cfg), front)
    try:
        with socket.create_connection(("127.0.0.1", front), timeout=5, source_address=("127.0.0.3", 0)) as sock:
            seen = h2_get(sock)
    finally:
        gw.stop()
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.3"


def test_http1_after_a_proxy_header_on_a_prior_knowledge_listener(
    start: Callable[..., GatewayThread], origin: OriginHandle
) -> None:
    """The sniffer hands HTTP/1.1 to H1Server: the proxied address must go along."""
    gw = start(config(free_port(), origin, http2="prior_knowledge"))
    header = encode_v1(CLIENT, SERVER)
    get = b"GET /echo HTTP/1.1\r\nHost: a.com\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(header + b"G")  # one byte: the sniffer cannot tell yet
        time.sleep(0.05)
        sock.sendall(get[1:])
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    body = json.loads(data.partition(b"\r\n\r\n")[2])
    assert body["headers"]["x-forwarded-for"] == "203.0.113.7"
