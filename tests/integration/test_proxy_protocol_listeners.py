"""PROXY protocol on listeners, over real sockets: the header's client address reaches
X-Forwarded-For, ip_filter, rate limits and the access log; untrusted peers and bad headers
are closed before anything reaches the origin; https listeners read the header before TLS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lb_support import wait_for

import support
from bastion.demo.origin import OriginHandle
from bastion.net.proxy_protocol import V2_SIGNATURE, encode_v1, encode_v2, encode_v2_local
from support import GatewayThread, free_port, split_responses, write_config
from tls_support import Pki

GET = b"GET /echo HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
CLIENT = ("203.0.113.7", 40001)
CLIENT6 = ("2001:db8::7", 40002)


def config(port: int, origin: OriginHandle, trusted: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    listener: dict[str, Any] = {
        "name": "web",
        "bind": f"127.0.0.1:{port}",
        "proxy_protocol": {"accept": True, "trusted": trusted or ["127.0.0.0/8"]},
        "timeouts": {"header": "1s"},
    }
    listener.update(extra.pop("listener", {}))
    result: dict[str, Any] = {
        "version": 1,
        "listeners": [listener],
        "upstreams": {"app": {"targets": [{"address": origin.address}]}},
        "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "app"}],
        "log": {"access": False},
    }
    result.update(extra)
    return result


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


def exchange(port: int, *parts: bytes, pause: float = 0.0, timeout: float = 5.0) -> bytes:
    """Send `parts` (pausing between them), read until the gateway closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for part in parts:
            sock.sendall(part)
            if pause:
                time.sleep(pause)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def echoed(data: bytes) -> dict[str, Any]:
    responses = split_responses(data)
    assert len(responses) == 1, data
    status, _, body = responses[0]
    assert status == 200, data
    result: dict[str, Any] = json.loads(body)
    return result


@pytest.mark.parametrize(
    "header",
    [encode_v1(CLIENT, ("10.0.0.1", 80)), encode_v2(CLIENT, ("10.0.0.1", 80))],
    ids=["v1", "v2"],
)
def test_proxied_client_reaches_forwarded_headers(
    start: Callable[..., GatewayThread], origin: OriginHandle, header: bytes
) -> None:
    gw = start(config(free_port(), origin))
    seen = echoed(exchange(gw.port, header + GET))["headers"]
    assert seen["x-forwarded-for"] == "203.0.113.7"
    assert seen["x-real-ip"] == "203.0.113.7"
    assert gw.gateway.metrics.proxy_stats("web").accepted == 1


def test_ipv6_client_over_v1_and_v2(start: Callable[..., GatewayThread], origin: OriginHandle) -> None:
    gw = start(config(free_port(), origin))
    for header in (encode_v1(CLIENT6, ("2001:db8::1", 80)), encode_v2(CLIENT6, ("2001:db8::1", 80))):
        assert echoed(exchange(gw.port, header + GET))["headers"]["x-forwarded-for"] == "2001:db8::7"


def test_header_and_request_split_byte_by_byte(start: Callable[..., GatewayThread], origin: OriginHandle) -> None:
    gw = start(config(free_port(), origin))
    data = encode_v2(CLIENT, ("10.0.0.1", 80)) + GET
    parts = [data[i : i + 1] for i in range(len(data))]
    assert echoed(exchange(gw.port, *parts, pause=0.002))["headers"]["x-forwarded-for"] == "203.0.113.7"


def test_header_alone_then_the_request(start: Callable[..., GatewayThread], origin: OriginHandle) -> None:
    gw = start(config(free_port(), origin))
    header = encode_v1(CLIENT, ("10.0.0.1", 80))
    assert echoed(exchange(gw.port, header, GET, pause=0.05))["headers"]["x-forwarded-for"] == "203.0.113.7"


def test_keep_alive_requests_keep_the_proxied_client(start: Callable[..., GatewayThread], origin: OriginHandle) -> None:
    gw = start(config(free_port(), origin))
    keep = b"GET /echo HTTP/1.1\r\nHost: example.com\r\n\r\n"
    data = exchange(gw.port, encode_v1(CLIENT, ("10.0.0.1", 80)) + keep + GET)
    responses = split_responses(data)
    assert [json.loads(body)["headers"]["x-forwarded-for"] for _, _, body in responses] == ["203.0.113.7"] * 2


def test_local_and_unknown_keep_the_socket_peer(start: Callable[..., GatewayThread], origin: OriginHandle) -> None:
    gw = start(config(free_port(), origin))
    for header in (encode_v2_local(), b"PROXY UNKNOWN\r\n"):
        assert echoed(exchange(gw.port, header + GET))["headers"]["x-forwarded-for"] == "127.0.0.1"


def test_untrusted_peer_is_closed_unread(start: Callable[..., GatewayThread], origin: OriginHandle) -> None:
    gw = start(config(free_port(), origin, trusted=["192.0.2.0/24"]))
    assert exchange(gw.port, encode_v1(CLIENT, ("10.0.0.1", 80)) + GET) == b""
    assert exchange(gw.port, GET) == b""
    assert origin.origin.requests == 0
    assert gw.gateway.metrics.proxy_stats("web").untrusted == 2


BAD_HEADERS = {
    "bad v2 signature": V2_SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x0c" + bytes(12),
    "v1 too long": b"PROXY UNKNOWN " + b"a" * 120 + b"\r\n",
    "bad v1 address": b"PROXY TCP4 203.0.113.300 10.0.0.1 1 2\r\n",
    "bad v1 port": b"PROXY TCP4 203.0.113.7 10.0.0.1 70000 2\r\n",
    "no header": b"",
    "v2 bad family": V2_SIGNATURE + b"\x21\x51\x00\x0c" + bytes(12),
    "v2 over the size bound": V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 8000) + bytes(12),
}


@pytest.mark.parametrize("name", sorted(BAD_HEADERS))
def test_bad_header_closes_without_reaching_the_origin(
    start: Callable[..., GatewayThread], origin: OriginHandle, name: str
) -> None:
    gw = start(config(free_port(), origin))
    assert exchange(gw.port, BAD_HEADERS[name] + GET) == b""
    assert origin.origin.requests == 0
    assert gw.gateway.metrics.proxy_stats("web").invalid == 1


def test_truncated_header_then_idle_times_out(start: Callable[..., GatewayThread], origin: OriginHandle) -> None:
    gw = start(config(free_port(), origin))
    header = encode_v2(CLIENT, ("10.0.0.1", 80))
    began = time.monotonic()
    assert exchange(gw.port, header[:20]) == b""  # the gateway closes: recv returns
    assert time.monotonic() - began >= 0.9  # not before timeouts.header
    assert gw.gateway.metrics.proxy_stats("web").timeout == 1
    assert origin.origin.requests == 0


def test_ip_filter_denies_the_proxied_address(start: Callable[..., GatewayThread], origin: OriginHandle) -> None:
    gw = start(config(free_port(), origin, plugins=[{"ip_filter": {"deny": ["203.0.113.0/24"]}}]))
    denied = split_responses(exchange(gw.port, encode_v1(CLIENT, ("10.0.0.1", 80)) + GET))
    assert denied[0][0] == 403
    allowed = exchange(gw.port, encode_v1(("198.51.100.1", 5), ("10.0.0.1", 80)) + GET)
    assert echoed(allowed)["headers"]["x-forwarded-for"] == "198.51.100.1"


def test_rate_limit_keyed_by_the_proxied_address(start: Callable[..., GatewayThread], origin: OriginHandle) -> None:
    gw = start(config(free_port(), origin, plugins=[{"rate_limit": {"limit": 2, "per": "1m", "key": "ip"}}]))

    def status(client: tuple[str, int]) -> int:
        return split_responses(exchange(gw.port, encode_v2(client, ("10.0.0.1", 80)) + GET))[0][0]

    assert [status(CLIENT) for _ in range(3)] == [200, 200, 429]
    assert status(("198.51.100.1", 5)) == 200  # another client behind the same balancer: its own budget


def test_access_log_client_is_the_proxied_address(
    start: Callable[..., GatewayThread], origin: OriginHandle, tmp_path: Path
) -> None:
    access = tmp_path / "access.log"
    gw = start(config(free_port(), origin, log={"access": True, "access_file": str(access)}))
    echoed(exchange(gw.port, encode_v1(CLIENT, ("10.0.0.1", 80)) + GET))

    def lines() -> list[dict[str, Any]]:
        text = access.read_text() if access.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    wait_for(lambda: len(lines()) == 1)
    assert lines()[0]["client"] == "203.0.113.7"


def test_listener_without_proxy_protocol_treats_a_header_as_a_bad_request(
    start: Callable[..., GatewayThread], origin: OriginHandle
) -> None:
    cfg = config(free_port(), origin)
    del cfg["listeners"][0]["proxy_protocol"]
    gw = start(cfg)
    reply = exchange(gw.port, encode_v1(CLIENT, ("10.0.0.1", 80)) + GET)
    assert split_responses(reply)[0][0] == 400
    assert origin.origin.requests == 0


def test_reload_turns_proxy_protocol_on(start: Callable[..., GatewayThread], origin: OriginHandle) -> None:
    cfg = config(free_port(), origin)
    del cfg["listeners"][0]["proxy_protocol"]
    gw = start(cfg)
    assert echoed(exchange(gw.port, GET))["headers"]["x-forwarded-for"] == "127.0.0.1"
    write_config(gw.config_path, config(gw.port, origin))
    assert gw.reload()
    assert echoed(exchange(gw.port, encode_v1(CLIENT, ("10.0.0.1", 80)) + GET))["headers"]["x-forwarded-for"] == (
        "203.0.113.7"
    )


# --- https: the header comes before the TLS handshake --------------------------------------------


def https_exchange(port: int, header: bytes, context: ssl.SSLContext, server_name: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(header)
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(GET)
            chunks = []
            while True:
                try:
                    chunk = tls.recv(65536)
                except (ssl.SSLError, ConnectionResetError):
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)


def https_config(port: int, origin: OriginHandle, pki: Pki) -> dict[str, Any]:
    a_cert, a_key = pki.issue("a", "a.example.com")
    b_cert, b_key = pki.issue("b", "b.example.com")
    tls = {"certificates": [{"cert": a_cert, "key": a_key}, {"cert": b_cert, "key": b_key}]}
    return config(port, origin, listener={"protocol": "https", "tls": tls})


@pytest.mark.parametrize("name", ["a.example.com", "b.example.com"])
def test_proxy_then_tls_keeps_sni_and_counts_the_handshake(
    start: Callable[..., GatewayThread], origin: OriginHandle, tmp_path: Path, name: str
) -> None:
    pki = Pki(tmp_path)
    gw = start(https_config(free_port(), origin, pki))
    body = echoed(https_exchange(gw.port, encode_v2(CLIENT, ("10.0.0.1", 443)), pki.client_context(), name))
    assert body["headers"]["x-forwarded-for"] == "203.0.113.7"
    assert body["headers"]["x-forwarded-proto"] == "https"
    assert gw.gateway.metrics.tls_handshakes.get(("web", "completed")) == 1


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("request_with_finished", [False, True], ids=["request-after", "request-with-finished"])
def test_proxy_header_and_client_hello_in_one_write(
    start: Callable[..., GatewayThread],
    origin: OriginHandle,
    tmp_path: Path,
    request_with_finished: bool,
    loop: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bytes behind the header are the handshake's first: they must reach TLS. With
    `request_with_finished` the request rides in the same write as the client's Finished, so
    it arrives before start_tls has returned: it must be kept for the protocol ALPN picks.
    Both event loops: their TLS protocols hand over the bytes at different moments."""
    if loop == "asyncio":
        monkeypatch.setattr(support, "new_event_loop", asyncio.new_event_loop)
    pki = Pki(tmp_path)
    gw = start(https_config(free_port(), origin, pki))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = pki.client_context().wrap_bio(incoming, outgoing, server_hostname="a.example.com")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(encode_v1(CLIENT, ("10.0.0.1", 443)) + outgoing.read())
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, "closed during the handshake"
                incoming.write(data)
        if not request_with_finished:
            sock.sendall(outgoing.read())
        tls.write(GET)
        sock.sendall(outgoing.read())
        received = b""
        closed = False
        while not closed:  # until the gateway's close_notify (Connection: close)
            data = sock.recv(65536)
            assert data, "closed without close_notify"
            incoming.write(data)
            try:
                while chunk := tls.read(65536):
                    received += chunk
                closed = True  # b"": close_notify
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                closed = True
    assert echoed(received)["headers"]["x-forwarded-for"] == "203.0.113.7"


def test_tls_without_a_proxy_header_is_closed(
    start: Callable[..., GatewayThread], origin: OriginHandle, tmp_path: Path
) -> None:
    pki = Pki(tmp_path)
    gw = start(https_config(free_port(), origin, pki))
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        https_exchange(gw.port, b"", pki.client_context(), "a.example.com")
    assert gw.gateway.metrics.proxy_stats("web").invalid == 1
    assert origin.origin.requests == 0


def test_a_failed_handshake_after_the_header_is_counted(
    start: Callable[..., GatewayThread], origin: OriginHandle, tmp_path: Path
) -> None:
    pki = Pki(tmp_path)
    gw = start(https_config(free_port(), origin, pki))
    assert exchange(gw.port, encode_v1(CLIENT, ("10.0.0.1", 443)) + b"\x16\x03\x01\x00\x05hello") == b""
    wait_for(lambda: gw.gateway.metrics.tls_handshakes.get(("web", "failed")) == 1)
    assert gw.gateway.metrics.proxy_stats("web").accepted == 1
    assert origin.origin.requests == 0


def test_a_flood_of_silent_trusted_connections_is_closed_at_the_header_timeout(
    start: Callable[..., GatewayThread], origin: OriginHandle
) -> None:
    gw = start(config(free_port(), origin))
    socks = [socket.create_connection(("127.0.0.1", gw.port), timeout=5) for _ in range(50)]
    try:
        socks[0].sendall(V2_SIGNATURE + b"\x21\x11\x10\x00")  # announces 4 KB, sends none of it
        wait_for(lambda: gw.gateway.metrics.proxy_stats("web").timeout == 50, timeout=10)
        for sock in socks:
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
    finally:
        for sock in socks:
            sock.close()
    assert echoed(exchange(gw.port, encode_v1(CLIENT, ("10.0.0.1", 80)) + GET))  # still serving


def test_ipv6_listener_trusts_an_ipv6_balancer(start: Callable[..., GatewayThread], origin: OriginHandle) -> None:
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = int(probe.getsockname()[1])
    cfg = config(port, origin, trusted=["::1/128"])
    cfg["listeners"][0]["bind"] = f"[::1]:{port}"
    gw = start(cfg)
    with socket.create_connection(("::1", port), timeout=5) as sock:
        sock.sendall(encode_v1(CLIENT, ("10.0.0.1", 80)) + GET)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert echoed(data)["headers"]["x-forwarded-for"] == "203.0.113.7"
    assert gw.gateway.metrics.proxy_stats("web").accepted == 1


def test_reload_turns_proxy_protocol_on_and_off_on_an_https_listener(
    start: Callable[..., GatewayThread], origin: OriginHandle, tmp_path: Path
) -> None:
    pki = Pki(tmp_path)
    with_proxy = https_config(free_port(), origin, pki)
    without = json.loads(json.dumps(with_proxy))
    del without["listeners"][0]["proxy_protocol"]
    gw = start(without)
    assert echoed(https_exchange(gw.port, b"", pki.client_context(), "a.example.com"))
    write_config(gw.config_path, with_proxy)
    assert gw.reload()  # the socket now listens in the clear: TLS starts after the header
    header = encode_v1(CLIENT, ("10.0.0.1", 443))
    body = echoed(https_exchange(gw.port, header, pki.client_context(), "a.example.com"))
    assert body["headers"]["x-forwarded-for"] == "203.0.113.7"
    write_config(gw.config_path, without)
    assert gw.reload()
    assert echoed(https_exchange(gw.port, b"", pki.client_context(), "b.example.com"))


def test_a_header_trickled_byte_by_byte_is_cut_at_the_header_timeout(
    start: Callable[..., GatewayThread], origin: OriginHandle
) -> None:
    """Progress does not push the deadline back: a slowloris sending one byte every 100 ms is
    closed when timeouts.header (1s) has passed since the connection opened."""
    gw = start(config(free_port(), origin))
    header = encode_v1(CLIENT, ("10.0.0.1", 80))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        began = time.monotonic()
        closed = False
        for byte in header[:-1]:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.1)
        assert closed or sock.recv(1) == b""
        assert time.monotonic() - began < 4  # 41 bytes at 100 ms would take over 4 s
    assert gw.gateway.metrics.proxy_stats("web").timeout == 1
    assert origin.origin.requests == 0
