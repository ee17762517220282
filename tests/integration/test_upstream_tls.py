"""TLS toward upstreams: verification (CA, name, SNI), client certificates, health checks,
and a reload that changes the TLS settings, against real HTTPS origins on loopback."""

from __future__ import annotations

import http.client
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lb_support import wait_for

from bastion.demo.origin import OriginHandle, start_origin_thread
from support import GatewayThread, free_port, request, write_config
from tls_support import Pki

CHECKS = {"path": "/healthz", "interval": "50ms", "timeout": "500ms", "healthy": 1, "unhealthy": 1}


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path, "upstream-ca")


@pytest.fixture
def tls_origin(pki: Pki) -> Iterator[Callable[..., OriginHandle]]:
    """Factory: an HTTPS origin serving a certificate for `names` (optionally asking for a client one)."""
    started: list[OriginHandle] = []

    def start(*names: str, client_ca: Pki | None = None) -> OriginHandle:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*pki.issue(f"origin{len(started)}", *names))
        if client_ca is not None:
            context.load_verify_locations(str(client_ca.ca_file))
            context.verify_mode = ssl.CERT_REQUIRED
        handle = start_origin_thread(f"tls{len(started)}", tls=context)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


def config(port: int, origin: OriginHandle, tls: dict[str, Any] | None, **upstream: Any) -> dict[str, Any]:
    app: dict[str, Any] = {"targets": [{"address": origin.address}], "retries": {"attempts": 0}, **upstream}
    if tls is not None:
        app["tls"] = tls
    return {
        "version": 1,
        "listeners": [{"name": "web", "bind": f"127.0.0.1:{port}"}],
        "upstreams": {"app": app},
        "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "app"}],
        "log": {"access": False},
    }


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


def test_a_verified_upstream_answers_and_sni_names_the_certificate(
    pki: Pki, tls_origin: Callable[..., OriginHandle], start: Callable[[dict[str, Any]], GatewayThread]
) -> None:
    origin = tls_origin("users.internal")
    port = free_port()
    start(config(port, origin, {"ca": str(pki.ca_file), "sni": "users.internal"}))
    reply = request(port, path="/users/7")
    assert reply.status == 200
    assert reply.json()["path"] == "/users/7"
    assert reply.json()["origin"] == origin.origin.name


def test_a_certificate_from_another_ca_gets_502(
    tmp_path: Path, tls_origin: Callable[..., OriginHandle], start: Callable[[dict[str, Any]], GatewayThread]
) -> None:
    origin = tls_origin("users.internal")
    other = Pki(tmp_path, "other-ca")
    port = free_port()
    start(config(port, origin, {"ca": str(other.ca_file), "sni": "users.internal"}))
    reply = request(port, path="/")
    assert (reply.status, reply.json()["error"]) == (502, "upstream_connect_failed")
    assert "certificate did not verify" in reply.json()["message"]
    assert origin.call(lambda: origin.origin.requests) == 0


def test_verification_is_on_by_default_with_the_system_cas(
    tls_origin: Callable[..., OriginHandle], start: Callable[[dict[str, Any]], GatewayThread]
) -> None:
    origin = tls_origin("users.internal")
    port = free_port()
    start(config(port, origin, {"sni": "users.internal"}))  # a private CA no system trusts
    assert request(port, path="/").status == 502


def test_verify_false_accepts_any_certificate(
    tmp_path: Path, tls_origin: Callable[..., OriginHandle], start: Callable[[dict[str, Any]], GatewayThread]
) -> None:
    origin = tls_origin("users.internal")
    port = free_port()
    start(config(port, origin, {"verify": False, "ca": str(Pki(tmp_path, "other-ca").ca_file)}))
    assert request(port, path="/").status == 200


def test_without_sni_the_target_address_is_verified(
    pki: Pki, tls_origin: Callable[..., OriginHandle], start: Callable[[dict[str, Any]], GatewayThread]
) -> None:
    named = tls_origin("users.internal")
    port = free_port()
    start(config(port, named, {"ca": str(pki.ca_file)}))  # 127.0.0.1 is not users.internal
    reply = request(port, path="/")
    assert reply.status == 502
    assert "127.0.0.1" in reply.json()["message"]
    by_address = tls_origin("127.0.0.1")
    port = free_port()
    start(config(port, by_address, {"ca": str(pki.ca_file)}))
    assert request(port, path="/").status == 200


def test_a_client_certificate_is_presented_when_configured(
    tmp_path: Path, pki: Pki, tls_origin: Callable[..., OriginHandle], start: Callable[[dict[str, Any]], GatewayThread]
) -> None:
    clients = Pki(tmp_path, "gateway-ca")
    origin = tls_origin("users.internal", client_ca=clients)
    cert, key = clients.issue("gateway", "gateway.internal")
    tls = {"ca": str(pki.ca_file), "sni": "users.internal"}
    port = free_port()
    start(config(port, origin, {**tls, "cert": cert, "key": key}))
    assert request(port, path="/").status == 200
    port = free_port()
    start(config(port, origin, tls))
    assert request(port, path="/").status == 502


def test_active_health_checks_speak_tls_to_a_tls_upstream(
    tmp_path: Path, pki: Pki, tls_origin: Callable[..., OriginHandle], start: Callable[[dict[str, Any]], GatewayThread]
) -> None:
    origin = tls_origin("users.internal")
    health = {"active": CHECKS}
    port = free_port()
    good = start(config(port, origin, {"ca": str(pki.ca_file), "sni": "users.internal"}, health_check=health))
    target = good.gateway.snapshot.upstreams["app"].targets[0]
    wait_for(lambda: target.checks_ok >= 2)
    assert target.healthy and target.checks_failed == 0
    # With a CA that does not verify it, the checks fail and the target goes down.
    wrong = {"ca": str(Pki(tmp_path, "other-ca").ca_file), "sni": "users.internal"}
    bad = start(config(free_port(), origin, wrong, health_check=health))
    other = bad.gateway.snapshot.upstreams["app"].targets[0]
    wait_for(lambda: not other.healthy)
    assert "verify" in other.health_reason


def test_a_reload_that_changes_tls_settings_does_not_reuse_older_connections(
    tmp_path: Path, pki: Pki, tls_origin: Callable[..., OriginHandle], start: Callable[[dict[str, Any]], GatewayThread]
) -> None:
    origin = tls_origin("users.internal")
    port = free_port()
    cfg = config(port, origin, {"ca": str(pki.ca_file), "sni": "users.internal"})
    gw = start(cfg)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert request(port, path="/", conn=conn).status == 200  # leaves a pooled connection
    pool = gw.gateway.snapshot.upstreams["app"].targets[0].pool
    wait_for(lambda: len(pool.idle) == 1)
    cfg["upstreams"]["app"]["tls"]["ca"] = str(Pki(tmp_path, "other-ca").ca_file)
    write_config(gw.config_path, cfg)
    assert gw.reload()
    assert request(port, path="/", conn=conn).status == 502  # a new connection, verified with the new CA
    conn.close()


def test_a_connection_busy_during_such_a_reload_is_closed_when_released(
    tmp_path: Path, pki: Pki, tls_origin: Callable[..., OriginHandle], start: Callable[[dict[str, Any]], GatewayThread]
) -> None:
    origin = tls_origin("users.internal")
    port = free_port()
    cfg = config(port, origin, {"ca": str(pki.ca_file), "sni": "users.internal"})
    gw = start(cfg)
    target = gw.gateway.snapshot.upstreams["app"].targets[0]
    slow: list[int] = []
    thread = threading.Thread(target=lambda: slow.append(request(port, path="/delay/300").status))
    thread.start()
    wait_for(lambda: target.in_flight == 1)
    cfg["upstreams"]["app"]["tls"]["ca"] = str(Pki(tmp_path, "other-ca").ca_file)
    write_config(gw.config_path, cfg)
    assert gw.reload()
    thread.join(10)
    assert slow == [200]  # the request in flight finished on its connection
    assert not target.pool.idle  # which did not go back to the pool
    assert request(port, path="/").status == 502
