"""TLS pieces without sockets: certificate choice, names, subjects, redirect locations and
the pool's reaction to changed upstream TLS settings."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from bastion.config.certnames import canonical_subject, certificate_identity
from bastion.config.schema import ListenerTls, UpstreamTls
from bastion.config.types import HostPort
from bastion.errors import BadRequest
from bastion.http.model import Headers, Request
from bastion.http.redirect import https_location
from bastion.net.tls import CertSet, FileReader, certificate_names, client_tls
from bastion.plugins.mtls_auth import MtlsAuth
from bastion.upstream.pool import ConnectionPool, PoolLimits
from tls_support import Pki, self_signed_cn_only


def cert_set(directory: Path, *entries: tuple[str, str]) -> CertSet:
    settings = ListenerTls.model_validate({"certificates": [{"cert": c, "key": k} for c, k in entries]})
    return CertSet(settings, FileReader(directory))


def served(certs: CertSet, name: str | None) -> list[str]:
    context = certs.pick(name)
    return certs.certificates[certs.contexts.index(context)].names


def test_pick_exact_then_one_label_wildcard_then_the_first(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    certs = cert_set(
        tmp_path,
        pki.issue("first", "first.test"),
        pki.issue("wild", "*.example.com"),
        pki.issue("api", "api.example.com", "API2.example.com"),
        pki.issue("again", "api.example.com"),  # a later claim of a taken name loses
    )
    assert served(certs, "api.example.com") == ["api.example.com", "api2.example.com"]
    assert served(certs, "API2.EXAMPLE.COM.") == ["api.example.com", "api2.example.com"]
    assert served(certs, "x.example.com") == ["*.example.com"]
    assert served(certs, "y.x.example.com") == ["first.test"]
    assert served(certs, "example.com") == ["first.test"]
    assert served(certs, "localhost") == ["first.test"]
    assert served(certs, None) == ["first.test"]
    assert served(certs, "") == ["first.test"]


def test_names_come_from_dns_alt_names_else_the_common_name(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    cert_path, _ = pki.issue("mixed", "a.example.com", "10.0.0.7", common_name="ignored.example.com")
    leaf = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    assert certificate_names(leaf) == ["a.example.com"]  # the IP entry is no SNI name; the CN is not used
    cn_only, _ = self_signed_cn_only(tmp_path, "cn", "Legacy.Example.org")
    assert certificate_names(x509.load_pem_x509_certificate(Path(cn_only).read_bytes())) == ["legacy.example.org"]


def test_the_reader_records_the_digest_of_every_file_it_read(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    cert, key = pki.issue("api", "api.example.com")
    certs_reader = FileReader(tmp_path)
    CertSet(ListenerTls.model_validate({"certificates": [{"cert": "api.pem", "key": "api.key"}]}), certs_reader)
    assert certs_reader.digests == {
        cert: hashlib.sha256(Path(cert).read_bytes()).hexdigest(),
        key: hashlib.sha256(Path(key).read_bytes()).hexdigest(),
    }


def test_subjects_are_compared_in_one_rfc_4514_form() -> None:
    assert canonical_subject("CN=app,O=Example") == "CN=app,O=Example"
    assert canonical_subject("2.5.4.3=app,O=Example") == "CN=app,O=Example"
    assert canonical_subject("emailAddress=ops@example.com,CN=app") == "emailAddress=ops@example.com,CN=app"
    assert canonical_subject(r"CN=a\,b,O=x") == r"CN=a\,b,O=x"
    for bad in ("cn=app", "CN=app, O=Example", "", "just text"):
        with pytest.raises(ValueError, match=r"RFC 4514|empty"):
            canonical_subject(bad)


def test_a_certificate_identity_is_its_der_digest_and_subject(tmp_path: Path) -> None:
    cert_path, _ = Pki(tmp_path).issue("c", "c.test", common_name="svc", organization_name="Example")
    der = x509.load_pem_x509_certificate(Path(cert_path).read_bytes()).public_bytes(Encoding.DER)
    fingerprint, subject = certificate_identity(der)
    assert fingerprint == hashlib.sha256(der).hexdigest()
    assert subject.startswith("CN=svc,") and "O=Example" in subject
    assert canonical_subject(subject) == subject


def test_a_forwarded_subject_cannot_end_its_header_line() -> None:
    assert MtlsAuth.header_value("CN=a\r\nX-Consumer: admin") == b"CN=a\\0d\\0aX-Consumer: admin"
    assert MtlsAuth.header_value("CN=caf\u00e9") == "CN=caf\u00e9".encode()


def location(host: str, path: str = "/p", query: str = "", port: int = 8443) -> str:
    return https_location(Request("GET", path, query, Headers(), host=host), port)


def test_redirect_locations() -> None:
    assert location("api.example.com", "/a/b", "x=1&y") == "https://api.example.com:8443/a/b?x=1&y"
    assert location("api.example.com", port=443) == "https://api.example.com/p"
    assert location("::1") == "https://[::1]:8443/p"
    assert location("a.test", "*") == "https://a.test:8443/"
    with pytest.raises(BadRequest):
        location("")


class FakeConn:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.closed = False
        self.idle_since = 0.0

    def detach(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_available(self) -> bool:
        return not self.closed


def test_changed_upstream_tls_settings_retire_the_pools_connections(tmp_path: Path) -> None:
    pool = ConnectionPool(HostPort("10.0.0.1", 443), PoolLimits(10, 10, 60.0, 1.0))
    reader = FileReader(tmp_path)
    verified = client_tls(UpstreamTls(), reader)
    pool.set_tls(verified)
    idle: Any = FakeConn(pool.epoch)
    pool.idle.append(idle)
    pool.set_tls(client_tls(UpstreamTls(), reader))  # the same settings, built again: nothing changes
    assert pool.idle == [idle] and not idle.closed
    busy: Any = FakeConn(pool.epoch)
    pool.set_tls(client_tls(UpstreamTls(verify=False), reader))
    assert pool.idle == [] and idle.closed
    pool.release(busy, reusable=True)  # made under the old settings: closed, not pooled
    assert busy.closed and pool.idle == []
    assert pool.tls is not None and pool.tls.server_hostname("10.0.0.1") == "10.0.0.1"
    assert client_tls(UpstreamTls(sni="users.internal"), reader).server_hostname("10.0.0.1") == "users.internal"
