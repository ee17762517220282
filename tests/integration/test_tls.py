"""TLS termination on https listeners: certificate choice by SNI, versions, ciphers, ALPN,
X-Forwarded-Proto, certificate reload, and redirect_https on plain listeners.

Every test runs a real gateway on loopback with certificate files issued by a throw-away CA
(tests/tls_support.py) and talks to it with the standard library's ssl module.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lb_support import wait_for

from bastion.demo.origin import OriginHandle
from support import GatewayThread, free_port, raw_exchange, request, write_config
from tls_support import (
    HTTPSConnection,
    Pki,
    expired,
    handshake_names,
    https_request,
    self_signed_cn_only,
    tls_socket,
    unverified,
)

Start = Callable[..., GatewayThread]


def https_config(port: int, origin: OriginHandle, certificates: list[tuple[str, str]], **tls: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": [
            {
                "name": "web-tls",
                "bind": f"127.0.0.1:{port}",
                "protocol": "https",
                "tls": {"certificates": [{"cert": c, "key": k} for c, k in certificates], **tls},
            }
        ],
        "upstreams": {"app": {"targets": [{"address": origin.address}]}},
        "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "app"}],
        "log": {"access": False},
    }


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def origin(origins: Callable[..., OriginHandle]) -> OriginHandle:
    return origins("a")


@pytest.fixture
def threads(tmp_path: Path) -> Iterator[Callable[..., GatewayThread]]:
    """Factory: `threads(config, tls_watch=...)` -> a gateway on the config's first listener port."""
    started: list[GatewayThread] = []

    def start(config: dict[str, Any], tls_watch: float | None = None) -> GatewayThread:
        port = int(config["listeners"][0]["bind"].rpartition(":")[2])
        path = write_config(tmp_path / f"gw{len(started)}.yaml", config)
        handle = GatewayThread(path, port, tls_watch=tls_watch)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


# --- which certificate ------------------------------------------------------------------------


def test_sni_picks_the_exact_name_then_a_wildcard_then_the_first_certificate(
    pki: Pki, origin: OriginHandle, threads: Callable[..., GatewayThread]
) -> None:
    port = free_port()
    default = pki.issue("default", "default.test")
    wildcard = pki.issue("wildcard", "*.example.com")
    exact = pki.issue("exact", "api.example.com")  # listed after the wildcard: exact still wins
    gw = threads(https_config(port, origin, [default, wildcard, exact]))
    assert handshake_names(port, "api.example.com") == ["api.example.com"]
    assert handshake_names(port, "API.Example.COM") == ["api.example.com"]
    assert handshake_names(port, "www.example.com") == ["*.example.com"]
    assert handshake_names(port, "a.b.example.com") == ["default.test"]  # a wildcard covers one label
    assert handshake_names(port, "example.com") == ["default.test"]
    assert handshake_names(port, "other.test") == ["default.test"]
    assert handshake_names(port, None) == ["default.test"]  # no SNI at all
    served = gw.gateway.statistics()["tls"][f"127.0.0.1:{port}"]
    assert [entry["names"] for entry in served] == [["default.test"], ["*.example.com"], ["api.example.com"]]
    # And a verifying client gets a full answer through the chosen certificate.
    reply = https_request(port, "www.example.com", pki.client_context(), "/hello")
    assert reply.status == 200
    assert reply.json()["path"] == "/hello"


def test_a_certificate_without_subject_alt_names_serves_its_common_name(
    tmp_path: Path, pki: Pki, origin: OriginHandle, threads: Callable[..., GatewayThread]
) -> None:
    port = free_port()
    default = pki.issue("default", "default.test")
    legacy = self_signed_cn_only(tmp_path, "legacy", "legacy.example.org")
    threads(https_config(port, origin, [default, legacy]))
    assert handshake_names(port, "legacy.example.org") == ["legacy.example.org"]
    assert handshake_names(port, "other.example.org") == ["default.test"]


def test_an_expired_certificate_is_served_and_a_verifying_client_refuses_it(
    pki: Pki, origin: OriginHandle, threads: Callable[..., GatewayThread], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    with caplog.at_level(logging.WARNING, "bastion"):
        threads(https_config(port, origin, [pki.issue("old", "api.example.com", **expired())]))
    assert "outside its validity period" in caplog.text
    with pytest.raises(ssl.SSLCertVerificationError) as caught:
        https_request(port, "api.example.com", pki.client_context())
    assert "expired" in caught.value.verify_message
    assert https_request(port, "api.example.com", unverified()).status == 200


def test_a_name_no_certificate_has_gets_the_first_one_and_fails_verification(
    pki: Pki, origin: OriginHandle, threads: Callable[..., GatewayThread]
) -> None:
    port = free_port()
    threads(https_config(port, origin, [pki.issue("api", "api.example.com")]))
    with pytest.raises(ssl.SSLCertVerificationError) as caught:
        https_request(port, "shop.example.net", pki.client_context())
    assert "match" in caught.value.verify_message  # Hostname mismatch


def test_a_client_that_never_finishes_its_handshake_is_closed_after_the_header_timeout(
    pki: Pki, origin: OriginHandle, threads: Callable[..., GatewayThread]
) -> None:
    port = free_port()
    config = https_config(port, origin, [pki.issue("api", "api.example.com")])
    config["listeners"][0]["timeouts"] = {"header": "300ms"}
    threads(config)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert sock.recv(1) == b""  # closed by the gateway long before the 5 s bound


# --- versions, ciphers, ALPN -----------------------------------------------------------------


def _client(maximum: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    context = unverified()
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = maximum
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_is_refused_and_1_2_accepted_by_default(
    pki: Pki, origin: OriginHandle, threads: Callable[..., GatewayThread]
) -> None:
    port = free_port()
    threads(https_config(port, origin, [pki.issue("api", "api.example.com")]))
    with pytest.raises(ssl.SSLError):
        handshake_names(port, "api.example.com", _client(ssl.TLSVersion.TLSv1_1, "DEFAULT:@SECLEVEL=0"))
    with tls_socket(port, "api.example.com", _client(ssl.TLSVersion.TLSv1_2)) as tls:
        assert tls.version() == "TLSv1.2"


def test_min_version_1_3_refuses_a_tls_1_2_client_also_after_a_reload(
    pki: Pki, origin: OriginHandle, threads: Callable[..., GatewayThread]
) -> None:
    port = free_port()
    config = https_config(port, origin, [pki.issue("api", "api.example.com")], min_version="1.3")
    gw = threads(config)
    with pytest.raises(ssl.SSLError):
        handshake_names(port, "api.example.com", _client(ssl.TLSVersion.TLSv1_2))
    with tls_socket(port, "api.example.com", _client(ssl.TLSVersion.TLSv1_3)) as tls:
        assert tls.version() == "TLSv1.3"
    config["listeners"][0]["tls"]["min_version"] = 1.2  # unquoted YAML: a float, taken as "1.2"
    write_config(gw.config_path, config)
    assert gw.reload()
    with tls_socket(port, "api.example.com", _client(ssl.TLSVersion.TLSv1_2)) as tls:
        assert tls.version() == "TLSv1.2"


def test_tls_1_2_takes_only_forward_secret_aead_ciphers(
    pki: Pki, origin: OriginHandle, threads: Callable[..., GatewayThread]
) -> None:
    port = free_port()
    threads(https_config(port, origin, [pki.issue("api", "api.example.com")]))  # an ECDSA key
    with pytest.raises(ssl.SSLError):  # CBC, even with ECDHE and SHA-256 (Python's own default allows it)
        handshake_names(port, "api.example.com", _client(ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA256"))
    for suite in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        with tls_socket(port, "api.example.com", _client(ssl.TLSVersion.TLSv1_2, suite)) as tls:
            assert tls.cipher()[0] == suite


@pytest.mark.parametrize(("http2", "chosen"), [(None, "h2"), (True, "h2"), (False, "http/1.1")])
def test_alpn_offers_h2_unless_http2_is_false(
    pki: Pki, origin: OriginHandle, threads: Callable[..., GatewayThread], http2: bool | None, chosen: str
) -> None:
    port = free_port()
    config = https_config(port, origin, [pki.issue("api", "api.example.com")])
    if http2 is not None:
        config["listeners"][0]["http2"] = http2
    threads(config)
    context = pki.client_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    with tls_socket(port, "api.example.com", context) as tls:
        assert tls.selected_alpn_protocol() == chosen


# --- what the origin sees --------------------------------------------------------------------


def test_requests_over_tls_reach_the_origin_with_x_forwarded_proto_https(
    pki: Pki, origin: OriginHandle, threads: Callable[..., GatewayThread]
) -> None:
    port = free_port()
    threads(https_config(port, origin, [pki.issue("api", "api.example.com")]))
    conn = HTTPSConnection(port, "api.example.com", pki.client_context())
    for path in ("/one", "/two"):  # a keep-alive connection: every request says https
        reply = https_request(
            port, "api.example.com", pki.client_context(), path, conn=conn, headers={"X-Forwarded-Proto": "http"}
        )
        seen = reply.json()
        assert seen["path"] == path
        assert seen["headers"]["x-forwarded-proto"] == "https"
        assert seen["headers"]["host"] == f"api.example.com:{port}"
    conn.close()


# --- certificate reload ----------------------------------------------------------------------


def test_a_replaced_certificate_is_served_to_new_handshakes_and_open_connections_keep_working(
    pki: Pki, origin: OriginHandle, threads: Callable[..., GatewayThread]
) -> None:
    port = free_port()
    pair = pki.issue("api", "api.example.com")
    gw = threads(https_config(port, origin, [pair]), tls_watch=0.05)
    context = pki.client_context()
    kept = HTTPSConnection(port, "api.example.com", context)
    assert https_request(port, "api.example.com", context, "/before", conn=kept).status == 200
    first = kept.sock.getpeercert(binary_form=True)

    pki.issue("api", "api.example.com", "www.example.com")  # same files, new certificate and key
    wait_for(lambda: handshake_names(port, "api.example.com") == ["api.example.com", "www.example.com"])
    assert gw.gateway.reloads["applied"] == 1
    # The connection opened before keeps its session and still serves requests.
    assert https_request(port, "api.example.com", context, "/after", conn=kept).json()["path"] == "/after"
    assert kept.sock.getpeercert(binary_form=True) == first
    kept.close()
    assert https_request(port, "www.example.com", context).status == 200


def test_a_reload_with_a_key_that_does_not_match_keeps_the_old_certificate(
    tmp_path: Path,
    pki: Pki,
    origin: OriginHandle,
    threads: Callable[..., GatewayThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    cert, key = pki.issue("api", "api.example.com")
    gw = threads(https_config(port, origin, [(cert, key)]))
    _, other_key = pki.issue("other", "api.example.com", "new.example.com")
    Path(cert).write_bytes((tmp_path / "other.pem").read_bytes())  # the new certificate, the old key
    with caplog.at_level(logging.ERROR, "bastion"):
        assert gw.reload() is False
    assert "listeners[0].tls.certificates[0].key" in caplog.text
    assert "is not the key of the certificate" in caplog.text
    assert handshake_names(port, "api.example.com") == ["api.example.com"]
    assert https_request(port, "api.example.com", pki.client_context()).status == 200
    # Once the key is replaced too, the reload (SIGHUP here) goes through.
    Path(key).write_bytes(Path(other_key).read_bytes())
    assert gw.reload() is True
    assert handshake_names(port, "api.example.com") == ["api.example.com", "new.example.com"]


def test_bastion_check_reports_a_mismatched_pair_with_file_line_and_key_path(
    tmp_path: Path, pki: Pki, origin: OriginHandle
) -> None:
    cert, _ = pki.issue("api", "api.example.com")
    _, wrong_key = pki.issue("other", "other.example.com")
    config = https_config(free_port(), origin, [(cert, wrong_key)])
    path = write_config(tmp_path / "bastion.yaml", config)
    result = subprocess.run(
        [sys.executable, "-m", "bastion", "check", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "key:" in text)
    assert f"{path}:{line}: listeners[0].tls.certificates[0].key: {wrong_key} is not the key of the certificate" in (
        result.stderr
    )


def test_bastion_check_lists_each_https_listeners_certificates(tmp_path: Path, pki: Pki, origin: OriginHandle) -> None:
    config = https_config(free_port(), origin, [pki.issue("api", "api.example.com", "*.example.com")])
    path = write_config(tmp_path / "bastion.yaml", config)
    result = subprocess.run(
        [sys.executable, "-m", "bastion", "check", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "api.example.com, *.example.com" in result.stdout


def test_a_listener_that_turns_tls_on_in_a_reload_serves_https_on_the_same_port(
    pki: Pki, origin: OriginHandle, threads: Callable[..., GatewayThread]
) -> None:
    port = free_port()
    config = https_config(port, origin, [pki.issue("api", "api.example.com")])
    plain = {key: value for key, value in config["listeners"][0].items() if key != "tls"} | {"protocol": "http"}
    gw = threads({**config, "listeners": [plain]})
    assert request(port, path="/x").json()["headers"]["x-forwarded-proto"] == "http"
    write_config(gw.config_path, config)
    assert gw.reload()
    reply = https_request(port, "api.example.com", pki.client_context(), "/x")
    assert reply.json()["headers"]["x-forwarded-proto"] == "https"


# --- redirect_https --------------------------------------------------------------------------


def test_redirect_https_answers_every_request_with_308_and_never_reaches_an_upstream(
    pki: Pki, origin: OriginHandle, threads: Callable[..., GatewayThread]
) -> None:
    port, tls_port = free_port(), free_port()
    config = https_config(tls_port, origin, [pki.issue("api", "api.example.com")])
    config["listeners"].insert(0, {"name": "web", "bind": f"127.0.0.1:{port}", "redirect_https": tls_port})
    threads(config)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    reply = request(port, path="/v1/users/7?b=2&a=1", headers={"Host": "api.example.com:8080"}, conn=conn)
    assert reply.status == 308
    assert reply.header("Location") == f"https://api.example.com:{tls_port}/v1/users/7?b=2&a=1"
    assert reply.header("X-Request-Id")
    # The same connection goes on (keep-alive); a POST with its body is redirected too.
    reply = request(port, "POST", "/orders", headers={"Host": "api.example.com"}, body=b"{}", conn=conn)
    assert (reply.status, reply.header("Location")) == (308, f"https://api.example.com:{tls_port}/orders")
    conn.close()
    assert request(port, path="/a/../b", headers={"Host": "[::1]:80"}).header("Location") == (
        f"https://[::1]:{tls_port}/b"
    )
    assert origin.call(lambda: origin.origin.requests) == 0
    # Following the redirect works.
    assert https_request(tls_port, "api.example.com", pki.client_context(), "/v1/users/7").status == 200


def test_redirect_https_leaves_out_port_443_and_needs_a_host(
    origin: OriginHandle, threads: Callable[..., GatewayThread]
) -> None:
    port = free_port()
    config = {
        "version": 1,
        "listeners": [{"name": "web", "bind": f"127.0.0.1:{port}", "redirect_https": 443}],
        "upstreams": {"app": {"targets": [{"address": origin.address}]}},
        "routes": [],
        "log": {"access": False},
    }
    threads(config)
    reply = request(port, path="/p", headers={"Host": "Shop.Example.com."})
    assert (reply.status, reply.header("Location")) == (308, "https://shop.example.com/p")
    raw = raw_exchange(port, b"GET /p HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 ")


def test_handshakes_are_counted_in_the_metrics(pki: Pki, origin: OriginHandle, threads: Start) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    port, admin = free_port(), free_port()
    config = https_config(port, origin, [pki.issue("api", "api.example.com")])
    config["admin"] = {"bind": f"127.0.0.1:{admin}"}
    threads(config)
    assert https_request(port, "api.example.com", pki.client_context()).status == 200
    with pytest.raises(ssl.SSLError), tls_socket(port, "api.example.com", ssl.create_default_context()):
        pass  # the client does not trust the certificate and aborts the handshake
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")  # plain HTTP on a TLS port
        sock.recv(100)

    def counts() -> dict[str, float]:
        text = request(admin, path="/metrics").body.decode()
        return {
            sample.labels["result"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "bastion_tls_handshakes"
            for sample in family.samples
            if sample.labels.get("listener") == "web-tls"
        }

    wait_for(lambda: counts().get("failed", 0) >= 2)
    assert counts() == {"completed": 1, "failed": 2}
