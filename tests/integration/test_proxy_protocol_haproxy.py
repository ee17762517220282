"""Interop: a real HAProxy in front (mode tcp, `send-proxy` / `send-proxy-v2`), as users run it.

Three loopback addresses keep the roles apart: the client connects from 127.0.0.3, HAProxy
connects to the gateway from 127.0.0.2 (the only trusted address), so 127.0.0.3 can reach
X-Forwarded-For and the access log only through the PROXY header."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lb_support import wait_for

from bastion.demo.origin import OriginHandle
from support import GatewayThread, free_port, split_responses, wait_listening, write_config
from tls_support import Pki

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="haproxy is not installed (.ci/run installs it)"
)

CLIENT = ("127.0.0.3", 0)
GET = b"GET /echo HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """Factory: `haproxy(gateway_port, "send-proxy-v2")` -> the port HAProxy listens on."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(gateway_port: int, option: str, backend: str = "") -> int:
        port = free_port()
        cfg = tmp_path / f"haproxy{len(procs)}.cfg"
        cfg.write_text(
            "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n"
            f"frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n"
            f"backend be\n{backend}  server gw 127.0.0.1:{gateway_port} {option} source 127.0.0.2\n"
        )
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        wait_listening(port, proc=proc, errors=proc.stderr)
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def gateway(tmp_path: Path, origins: Callable[..., OriginHandle]) -> Iterator[Callable[..., GatewayThread]]:
    started: list[GatewayThread] = []
    origin = origins("a")

    def start(trusted: tuple[str, ...] = ("127.0.0.2/32",), **listener: Any) -> GatewayThread:
        port = free_port()
        config = {
            "version": 1,
            "listeners": [
                {
                    "name": "web",
                    "bind": f"127.0.0.1:{port}",
                    "proxy_protocol": {"accept": True, "trusted": list(trusted)},
                    **listener,
                }
            ],
            "upstreams": {"app": {"targets": [{"address": origin.address}]}},
            "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "app"}],
            "log": {"access_file": str(tmp_path / "access.log")},
        }
        handle = GatewayThread(write_config(tmp_path / "gw.yaml", config), port)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


def access_lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("option", ["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front_passes_the_client_port(
    haproxy: Callable[..., int], gateway: Callable[..., GatewayThread], tmp_path: Path, option: str
) -> None:
    gw = gateway()
    front = haproxy(gw.port, option)
    with socket.create_connection(("127.0.0.1", front), timeout=10, source_address=CLIENT) as sock:
        sock.sendall(GET)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    [(status, _, body)] = split_responses(data)
    assert status == 200
    assert json.loads(body)["headers"]["x-forwarded-for"] == "127.0.0.3"
    wait_for(lambda: len(access_lines(tmp_path / "access.log")) == 1)
    assert access_lines(tmp_path / "access.log")[0]["client"] == "127.0.0.3"


def test_haproxy_in_front_of_an_https_listener(
    haproxy: Callable[..., int], gateway: Callable[..., GatewayThread], tmp_path: Path
) -> None:
    pki = Pki(tmp_path)
    cert, key = pki.issue("web", "web.example.com")
    gw = gateway(protocol="https", tls={"certificates": [{"cert": cert, "key": key}]})
    front = haproxy(gw.port, "send-proxy-v2")
    with (
        socket.create_connection(("127.0.0.1", front), timeout=10, source_address=CLIENT) as raw,
        pki.client_context().wrap_socket(raw, server_hostname="web.example.com") as tls,
    ):
        tls.sendall(GET)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    [(status, _, body)] = split_responses(data)
    headers = json.loads(body)["headers"]
    assert status == 200 and headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-for"] == "127.0.0.3"


def test_haproxy_health_checks_send_local_and_a_direct_client_is_refused(
    haproxy: Callable[..., int], gateway: Callable[..., GatewayThread]
) -> None:
    gw = gateway(trusted=("127.0.0.1/32", "127.0.0.2/32"))  # HAProxy's checks leave from 127.0.0.1
    # HTTP checks: a v2 LOCAL header, then GET /healthz, answered by the route's origin
    haproxy(gw.port, "send-proxy-v2 check inter 100ms", backend="  option httpchk GET /healthz\n")
    wait_for(lambda: gw.gateway.metrics.proxy_stats("web").accepted >= 4)
    assert gw.gateway.metrics.proxy_stats("web").invalid == 0
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10, source_address=CLIENT) as sock:
        sock.sendall(b"PROXY TCP4 198.51.100.1 127.0.0.1 1 80\r\n" + GET)  # not from HAProxy's address
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""
    assert gw.gateway.metrics.proxy_stats("web").untrusted == 1
