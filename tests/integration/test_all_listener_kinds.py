"""Cross-feature review: one gateway with every kind of listener at once (h2c, tcp, udp,
tls_passthrough) and an h2c upstream: the admin API and /metrics describe all of it and stay
valid; `--workers 2` serves each listener and reloads on SIGHUP."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from adversary import wait_until
from bastion.demo.origin import OriginHandle
from h2_support import H2Origin, RawH2
from l4_support import TcpOrigin, recv_exactly
from support import GatewayProcess, GatewayThread, free_port, request, write_config
from udp_support import DnsClient, DnsServer


@pytest.fixture
def h2_origin() -> Iterator[H2Origin]:
    origin = H2Origin()
    yield origin
    origin.stop()


def everything(
    ports: dict[str, int], h2_target: str, tcp_target: str, udp_target: str, http_target: str
) -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": [
            {"name": "web", "bind": f"127.0.0.1:{ports['web']}", "http2": "prior_knowledge"},
            {"name": "pg", "bind": f"127.0.0.1:{ports['tcp']}", "protocol": "tcp", "upstream": "echo"},
            {"name": "dns", "bind": f"127.0.0.1:{ports['udp']}", "protocol": "udp", "upstream": "dns"},
            {
                "name": "edge",
                "bind": f"127.0.0.1:{ports['tls']}",
                "protocol": "tls_passthrough",
                "sni_routes": [{"hosts": ["*"], "upstream": "echo"}],
            },
        ],
        "admin": {"bind": f"127.0.0.1:{ports['admin']}"},
        "upstreams": {
            "h2app": {"protocol": "h2c", "targets": [{"address": h2_target}]},
            "plain": {"targets": [{"address": http_target}]},
            "echo": {"targets": [{"address": tcp_target}]},
            "dns": {"targets": [{"address": udp_target}]},
        },
        "routes": [
            {"name": "h2", "match": {"path": "/h2/"}, "upstream": "h2app"},
            {"name": "grpc", "match": {"path": "/pkg.Svc/"}, "upstream": "h2app", "grpc_web": True},
            {"name": "plain", "match": {"path": "/"}, "upstream": "plain"},
        ],
        "log": {"access": False},
    }


def ports() -> dict[str, int]:
    from udp_support import tcp_and_udp_port

    return {"web": free_port(), "tcp": free_port(), "udp": tcp_and_udp_port(), "tls": free_port(), "admin": free_port()}


def use_every_listener(port_map: dict[str, int]) -> None:
    with RawH2(port_map["web"]) as client:
        assert client.response(client.request("/h2/x"))[0] == 200
        assert client.response(client.request("/plain"))[0] == 200
        assert client.response(client.request("/pkg.Svc/Call", "POST", extra=[(b"content-type", b"application/grpc")]))
    with socket.create_connection(("127.0.0.1", port_map["tcp"]), timeout=5) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
    dns = DnsClient(port_map["udp"])
    try:
        assert dns.resolve(attempts=3) == "10.1.2.3"
    finally:
        dns.close()


def test_admin_and_metrics_with_every_kind_of_listener(
    tmp_path: Path, h2_origin: H2Origin, origins: Callable[..., OriginHandle]
) -> None:
    tcp, udp, plain = TcpOrigin(), DnsServer("10.1.2.3"), origins("plain")
    port_map = ports()
    config = everything(port_map, f"127.0.0.1:{h2_origin.port}", tcp.address, udp.address, plain.address)
    gw = GatewayThread(write_config(tmp_path / "gw.yaml", config), port_map["web"])
    try:
        use_every_listener(port_map)
        admin = port_map["admin"]
        metrics = request(admin, path="/metrics")
        assert metrics.status == 200
        families = {f.name: f for f in text_string_to_metric_families(metrics.body.decode())}
        assert "bastion_l4_connections" in families or "bastion_l4_connections_total" in families
        assert any(name.startswith("bastion_udp_") for name in families)
        assert any(name.startswith("bastion_grpc_") for name in families), sorted(families)
        upstreams = request(admin, path="/upstreams")
        assert upstreams.status == 200
        body = upstreams.json()
        text = json.dumps(body)
        assert "h2app" in text and "echo" in text and "dns" in text
        (h2app,) = [u for u in body["upstreams"] if u["name"] == "h2app"]
        pool = h2app["targets"][0]["pool"]
        assert pool["opened_total"] >= 1 and "streams" in pool and "goaways" in pool, pool
        for path in ("/status", "/routes", "/listeners", "/config", "/errors"):
            reply = request(admin, path=path)
            assert reply.status in (200, 404), (path, reply.status, reply.body[:200])
        assert gw.reload()
        use_every_listener(port_map)
    finally:
        gw.stop()
        tcp.kill()
        udp.stop()


def test_two_workers_serve_h2_and_l4_and_reload_on_sighup(
    tmp_path: Path, h2_origin: H2Origin, origins: Callable[..., OriginHandle]
) -> None:
    tcp, other_tcp = TcpOrigin(greeting=b"A"), TcpOrigin(greeting=b"B")
    udp, plain = DnsServer("10.1.2.3"), origins("plain")
    port_map = ports()
    config = everything(port_map, f"127.0.0.1:{h2_origin.port}", tcp.address, udp.address, plain.address)
    path = write_config(tmp_path / "gw.yaml", config)
    proc = GatewayProcess(path, port_map["web"], "--workers", "2")
    try:
        wait_until(lambda: _serves_tcp(port_map["tcp"]) == b"A", timeout=10, what="tcp listener")
        for _ in range(6):  # spread over both workers
            with RawH2(port_map["web"]) as client:
                assert client.response(client.request("/h2/x"))[0] == 200
            assert _serves_tcp(port_map["tcp"]) == b"A"
        config["upstreams"]["echo"]["targets"] = [{"address": other_tcp.address}]
        write_config(path, config)
        proc.signal(signal.SIGHUP)
        wait_until(lambda: all(_serves_tcp(port_map["tcp"]) == b"B" for _ in range(10)), timeout=10, what="reload")
        with RawH2(port_map["web"]) as client:
            assert client.response(client.request("/h2/x"))[0] == 200
    finally:
        code, _, err = proc.stop()
        tcp.kill()
        other_tcp.kill()
        udp.stop()
    assert code == 0, err
    assert err.count("config reloaded") == 2, err


def _serves_tcp(port: int) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            return recv_exactly(sock, 1)
    except (OSError, AssertionError):
        time.sleep(0.05)
        return b""
