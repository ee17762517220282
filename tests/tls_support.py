"""Certificates on disk and HTTPS clients for the TLS tests.

`Pki` issues certificates with trustme (a CA per test) and writes them as PEM files into
the test's directory, where the gateway's config names them. `HTTPSConnection` connects to
127.0.0.1 whatever name it sends in SNI, so one listener on loopback can be asked for any
host name; `served_names` reads the names of the certificate the server presented, verified
or not.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from support import Reply


class Pki:
    """A CA and the files of the certificates it issued, under `directory`."""

    def __init__(self, directory: Path, name: str = "ca") -> None:
        self.directory = directory
        self.name = name
        self.ca = trustme.CA(organization_name=f"Bastion tests {name}")
        self.ca_file = directory / f"{name}.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, filename: str, *names: str, **options: Any) -> tuple[str, str]:
        """Write FILENAME.pem (chain) and FILENAME.key; returns their paths as strings."""
        leaf = self.ca.issue_cert(*names, **options)
        return self.write(filename, leaf)

    def write(self, filename: str, leaf: trustme.LeafCert) -> tuple[str, str]:
        cert = self.directory / f"{filename}.pem"
        key = self.directory / f"{filename}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return str(cert), str(key)

    def client_context(self, **options: Any) -> ssl.SSLContext:
        """A client context that trusts this CA (and verifies names)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        for name, value in options.items():
            setattr(context, name, value)
        return context


def expired(days_ago: int = 2) -> dict[str, datetime.datetime]:
    """trustme options for a certificate whose validity ended `days_ago` days ago."""
    now = datetime.datetime.now(datetime.UTC)
    return {"not_before": now - datetime.timedelta(days=30), "not_after": now - datetime.timedelta(days=days_ago)}


def self_signed_cn_only(directory: Path, filename: str, common_name: str) -> tuple[str, str]:
    """A certificate without subjectAltName (its CN is the only name), and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{filename}.pem", directory / f"{filename}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


class HTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1:PORT, sending `server_name` in SNI and in Host (None: no SNI)."""

    def __init__(self, port: int, server_name: str | None, context: ssl.SSLContext, timeout: float = 10) -> None:
        super().__init__(server_name or "127.0.0.1", port, context=context, timeout=timeout)
        self.server_name = server_name
        self.tls_context = context

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self.tls_context.wrap_socket(sock, server_hostname=self.server_name)


def unverified() -> ssl.SSLContext:
    """A client context that accepts any certificate (to look at what is served)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def served_names(sock: Any) -> list[str]:
    """The DNS names (else the CN) of the certificate the server presented on `sock`."""
    der = sock.getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return list(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)]


@contextlib.contextmanager
def tls_socket(port: int, server_name: str | None, context: ssl.SSLContext | None = None) -> Iterator[ssl.SSLSocket]:
    """A TLS connection to 127.0.0.1:PORT (handshake done), closed on exit."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        tls = (context or unverified()).wrap_socket(sock, server_hostname=server_name)
    except BaseException:
        sock.close()
        raise
    with tls:
        yield tls


def handshake_names(port: int, server_name: str | None, context: ssl.SSLContext | None = None) -> list[str]:
    """Open a TLS connection, return the served certificate's names, close."""
    with tls_socket(port, server_name, context) as tls:
        return served_names(tls)


def https_request(
    port: int,
    server_name: str | None,
    context: ssl.SSLContext,
    path: str = "/",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    conn: HTTPSConnection | None = None,
) -> Reply:
    own = conn is None
    conn = conn or HTTPSConnection(port, server_name, context)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, response.getheaders(), response.read())
    finally:
        if own:
            conn.close()
