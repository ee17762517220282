"""mTLS: listeners that ask for client certificates, and the mtls_auth plugin mapping a
verified certificate to a consumer, through a real gateway to a real origin."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from bastion.demo.origin import OriginHandle
from support import GatewayThread, free_port, write_config
from tls_support import Pki, https_request


class Setup:
    """A gateway with an https listener asking for client certificates signed by `clients`."""

    def __init__(self, tmp_path: Path, origin: OriginHandle) -> None:
        self.servers = Pki(tmp_path, "server-ca")
        self.clients = Pki(tmp_path, "client-ca")
        self.strangers = Pki(tmp_path, "other-ca")
        self.server_pair = self.servers.issue("api", "api.example.com")
        self.app = self.clients.issue("app", "app.clients.test", common_name="app")
        self.svc = self.clients.issue("svc", "svc.clients.test", common_name="svc", organization_name="Example")
        self.unknown = self.clients.issue("unknown", "unknown.clients.test", common_name="unknown")
        self.stranger = self.strangers.issue("stranger", "app.clients.test", common_name="app")
        self.port = free_port()
        self.origin = origin

    def fingerprint(self, pair: tuple[str, str]) -> str:
        cert = x509.load_pem_x509_certificate(Path(pair[0]).read_bytes())
        return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()

    def subject(self, pair: tuple[str, str]) -> str:
        return x509.load_pem_x509_certificate(Path(pair[0]).read_bytes()).subject.rfc4514_string()

    def config(self, plugin: dict[str, Any] | None = None) -> dict[str, Any]:
        app_fingerprint = self.fingerprint(self.app).upper()
        colons = ":".join(app_fingerprint[i : i + 2] for i in range(0, 64, 2))  # as openssl x509 -fingerprint prints
        return {
            "version": 1,
            "listeners": [
                {
                    "name": "web-tls",
                    "bind": f"127.0.0.1:{self.port}",
                    "protocol": "https",
                    "tls": {
                        "certificates": [{"cert": self.server_pair[0], "key": self.server_pair[1]}],
                        "client_ca": str(self.clients.ca_file),
                    },
                }
            ],
            "upstreams": {"app": {"targets": [{"address": self.origin.address}]}},
            "routes": [
                {"name": "secure", "match": {"path": "/secure"}, "upstream": "app", "plugins": [{"mtls_auth": plugin}]},
                {"name": "open", "match": {"path": "/open"}, "upstream": "app"},
            ],
            "consumers": [
                {"name": "app-consumer", "credentials": {"mtls_auth": [{"fingerprint_sha256": colons}]}},
                {"name": "svc-consumer", "credentials": {"mtls_auth": [{"subject": self.subject(self.svc)}]}},
            ],
            "log": {"access": False},
        }

    def client(self, pair: tuple[str, str] | None) -> ssl.SSLContext:
        context = self.servers.client_context()
        if pair is not None:
            context.load_cert_chain(*pair)
        return context

    def get(self, path: str, pair: tuple[str, str] | None, headers: dict[str, str] | None = None) -> Any:
        return https_request(self.port, "api.example.com", self.client(pair), path, headers=headers)


@pytest.fixture
def setup(tmp_path: Path, origins: Callable[..., OriginHandle]) -> Setup:
    return Setup(tmp_path, origins("a"))


@pytest.fixture
def start(tmp_path: Path) -> Any:
    started: list[GatewayThread] = []

    def run(setup: Setup, config: dict[str, Any]) -> GatewayThread:
        handle = GatewayThread(write_config(tmp_path / "gw.yaml", config), setup.port)
        started.append(handle)
        return handle

    yield run
    for handle in started:
        handle.stop()


def test_a_registered_fingerprint_or_subject_names_the_consumer(setup: Setup, start: Any) -> None:
    start(setup, setup.config())
    reply = setup.get("/secure", setup.app, headers={"X-Consumer": "someone-else"})
    assert reply.status == 200
    assert reply.json()["headers"]["x-consumer"] == "app-consumer"
    reply = setup.get("/secure", setup.svc)
    assert reply.status == 200
    assert reply.json()["headers"]["x-consumer"] == "svc-consumer"


def test_no_certificate_or_an_unregistered_one_gets_401(setup: Setup, start: Any) -> None:
    start(setup, setup.config())
    reply = setup.get("/secure", None)
    assert (reply.status, reply.json()["error"]) == (401, "missing_credentials")
    reply = setup.get("/secure", setup.unknown)
    assert (reply.status, reply.json()["error"]) == (401, "invalid_credentials")
    assert reply.json()["request_id"] == reply.header("X-Request-Id")
    assert setup.origin.call(lambda: setup.origin.origin.requests) == 0


def test_routes_without_mtls_auth_work_with_or_without_a_certificate(setup: Setup, start: Any) -> None:
    start(setup, setup.config())
    assert setup.get("/open", None).status == 200
    reply = setup.get("/open", setup.app)
    assert reply.status == 200
    assert "x-consumer" not in reply.json()["headers"]  # a certificate alone authenticates nobody


def test_a_certificate_from_another_ca_fails_the_handshake(setup: Setup, start: Any) -> None:
    start(setup, setup.config())
    with pytest.raises(OSError):  # ssl.SSLError, or a reset once TLS 1.3 lets the client speak first
        setup.get("/open", setup.stranger)
    assert setup.origin.call(lambda: setup.origin.origin.requests) == 0


def test_forwarded_certificate_headers_are_set_and_never_taken_from_the_client(setup: Setup, start: Any) -> None:
    plugin = {"forward": {"X-Client-Cert-Sha256": "fingerprint_sha256", "X-Client-Cert-Subject": "subject"}}
    start(setup, setup.config(plugin))
    headers = setup.get("/secure", setup.svc).json()["headers"]
    assert headers["x-client-cert-sha256"] == setup.fingerprint(setup.svc)
    assert headers["x-client-cert-subject"] == setup.subject(setup.svc)
    assert setup.subject(setup.svc).startswith("CN=svc,")
    # On a route without the plugin, a client cannot pass a forged copy either.
    forged = {"X-Client-Cert-Subject": "CN=admin", "X-Client-Cert-Sha256": "00" * 32}
    headers = setup.get("/open", setup.app, headers=forged).json()["headers"]
    assert "x-client-cert-subject" not in headers
    assert "x-client-cert-sha256" not in headers
