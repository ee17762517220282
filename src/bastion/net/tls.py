"""TLS contexts built from the config's files: listeners (SNI, mTLS, reload) and upstreams.

Listeners. Each https listener socket is created once with the SSLContext of a `TlsFront`
and keeps it for life. The front's `sni_callback` runs during every handshake: it looks the
client's server name up in the listener's current `CertSet` (exact names, then a wildcard
covering one label, then the first certificate) and moves the connection onto that
certificate's own context (`ssl_object.context = ...`). A reload builds a new `CertSet`
from the files and `install`s it: handshakes from then on get the new certificates, while
connections already open keep the session they negotiated (OpenSSL copied the certificate
into each connection). What OpenSSL copies from the first context when a connection starts
(protocol versions, ciphers, whether to ask for a client certificate) lives on the front;
what it reads from the swapped-in context (certificate and key, the CAs that verify a
client certificate, ALPN) lives on each certificate's context. Both get the same settings.

Every file is read and checked here, before anything is installed: a certificate that does
not parse, a key that does not match it, an unreadable CA file are problems with the key
path of the setting that named the file, so `bastion check` and a reload report them like
any other config error (and a reload that has them keeps the old certificates serving).
The digest of every file read is kept, so the gateway can reload when one changes.

Upstreams. `ClientTls` is one context per upstream: verification on by default (the
system's CAs unless `ca` is given), the server name to send and verify (the target's host
unless `sni` is given), an optional client certificate.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from bastion.config.schema import ListenerTls, Loc, UpstreamTls

# TLS 1.2 suites: forward secrecy and AEAD only. TLS 1.3 suites are all AEAD (OpenSSL's defaults).
CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL"
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
ALPN_HTTP1 = ["http/1.1"]
ALPN_H2 = ["h2", "http/1.1"]  # an https listener with http2 (the default): h2 preferred


class TlsProblems(Exception):
    """Problems with TLS files, each with a key path below the setting's own block."""

    def __init__(self, problems: Sequence[tuple[Loc, str]]) -> None:
        super().__init__("; ".join(message for _, message in problems))
        self.problems = list(problems)


class FileReader:
    """Reads the files a config names (relative to the config's directory) and remembers
    the digest of each, for the gateway's watch."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.digests: dict[str, str] = {}  # absolute path -> sha256 of what was read

    def path(self, name: str) -> str:
        return str(self.base / Path(name).expanduser())

    def read(self, name: str) -> tuple[str, bytes]:
        """(absolute path, content); OSError when it cannot be read."""
        path = self.path(name)
        try:
            data = Path(path).read_bytes()
        except OSError:
            self.digests[path] = ""  # watched all the same: it may appear
            raise
        self.digests[path] = hashlib.sha256(data).hexdigest()
        return path, data


def file_digest(path: str) -> str:
    """What the watch compares: the content's digest ("" when unreadable)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


def _unreadable(exc: OSError) -> str:
    return f"cannot read {exc.filename}: {exc.strerror or exc}"


# --- certificates and keys ------------------------------------------------------------------


class Certificate:
    """One certificate entry, checked: its leaf, its names, and its files' absolute paths."""

    __slots__ = ("cert_path", "key_path", "leaf", "names")

    def __init__(self, cert_path: str, key_path: str, leaf: x509.Certificate) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.leaf = leaf
        self.names = certificate_names(leaf)

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc


def certificate_names(leaf: x509.Certificate) -> list[str]:
    """The DNS names a certificate serves: its subjectAltName DNS entries, else its CN."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [name.lower().rstrip(".") for name in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value).lower().rstrip(".") for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [name for name in names if name]


def _public_der(key: Any) -> bytes:
    der: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def load_pair(reader: FileReader, cert: str, key: str, loc: Loc = ()) -> Certificate:
    """Read and check a certificate chain and its key. Raises TlsProblems."""
    try:
        cert_path, cert_data = reader.read(cert)
    except OSError as exc:
        raise TlsProblems([((*loc, "cert"), _unreadable(exc))]) from None
    try:
        key_path, key_data = reader.read(key)
    except OSError as exc:
        raise TlsProblems([((*loc, "key"), _unreadable(exc))]) from None
    try:
        chain = x509.load_pem_x509_certificates(cert_data)
    except ValueError:
        raise TlsProblems([((*loc, "cert"), f"{cert_path} holds no PEM certificate")]) from None
    try:
        private = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise TlsProblems([((*loc, "key"), f"{key_path} is encrypted (give the key without a passphrase)")]) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsProblems([((*loc, "key"), f"{key_path} holds no PEM private key")]) from None
    if _public_der(private.public_key()) != _public_der(chain[0].public_key()):
        raise TlsProblems([((*loc, "key"), f"{key_path} is not the key of the certificate in {cert_path}")])
    return Certificate(cert_path, key_path, chain[0])


def _harden(context: ssl.SSLContext) -> None:
    """What every server context shares whatever the config says: ciphers and options."""
    context.set_ciphers(CIPHERS_TLS12)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE


def _ca_file(reader: FileReader, name: str, loc: Loc) -> str:
    """Read a CA bundle and check it holds at least one certificate; its absolute path."""
    try:
        path, data = reader.read(name)
    except OSError as exc:
        raise TlsProblems([(loc, _unreadable(exc))]) from None
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsProblems([(loc, f"{path} holds no PEM certificate")]) from None
    return path


# --- listeners ------------------------------------------------------------------------------


class CertSet:
    """A listener's certificates, indexed by the names they serve. Immutable once built."""

    def __init__(self, settings: ListenerTls, reader: FileReader, alpn: Sequence[str] = ALPN_HTTP1) -> None:
        """Raises TlsProblems (key paths below the listener's `tls`) listing every bad entry.
        `alpn`: the protocols offered, in preference order (each certificate's context offers them)."""
        self.settings = settings
        self.alpn = list(alpn)
        self.min_version = settings.min_version
        self.client_ca: str | None = None
        problems: list[tuple[Loc, str]] = []
        ca_problems: list[tuple[Loc, str]] = []  # reported after the certificates, as the file lists them
        if settings.client_ca is not None:
            try:
                self.client_ca = _ca_file(reader, settings.client_ca, ("client_ca",))
            except TlsProblems as exc:
                ca_problems = exc.problems
        self.certificates: list[Certificate] = []
        self.contexts: list[ssl.SSLContext] = []
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}  # "example.com" for *.example.com
        for index, entry in enumerate(settings.certificates):
            loc: Loc = ("certificates", index)
            try:
                cert = load_pair(reader, entry.cert, entry.key, loc)
                context = self._context(cert)
            except TlsProblems as exc:
                problems += exc.problems
                continue
            except ssl.SSLError as exc:
                problems.append(((*loc, "cert"), f"OpenSSL refused {entry.cert}: {exc.reason or exc}"))
                continue
            self.certificates.append(cert)
            self.contexts.append(context)
            for name in cert.names:  # the first certificate to claim a name keeps it
                if name.startswith("*."):
                    self.wildcard.setdefault(name[2:], context)
                else:
                    self.exact.setdefault(name, context)
        if problems or ca_problems:
            raise TlsProblems(problems + ca_problems)
        self.default = self.contexts[0]

    def _context(self, cert: Certificate) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _harden(context)
        context.minimum_version = _VERSIONS[self.min_version]
        context.set_alpn_protocols(self.alpn)
        context.load_cert_chain(cert.cert_path, cert.key_path)
        if self.client_ca is not None:
            context.load_verify_locations(self.client_ca)
            context.verify_mode = ssl.CERT_OPTIONAL
        return context

    def pick(self, server_name: str | None) -> ssl.SSLContext:
        """The context for a ClientHello's server name: exact, then `*.` one label up, then the first."""
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(".")
        context = self.exact.get(name)
        if context is not None:
            return context
        _, dot, parent = name.partition(".")
        if dot:
            context = self.wildcard.get(parent)
            if context is not None:
                return context
        return self.default

    def expired(self, now: datetime.datetime | None = None) -> list[Certificate]:
        now = now or datetime.datetime.now(datetime.UTC)
        return [cert for cert in self.certificates if cert.not_after < now or cert.leaf.not_valid_before_utc > now]

    def statistics(self) -> list[dict[str, Any]]:
        return [
            {"cert": cert.cert_path, "names": cert.names, "not_after": cert.not_after.isoformat()}
            for cert in self.certificates
        ]


class TlsFront:
    """The context an https listener socket was created with; it delegates to the current CertSet."""

    def __init__(self, certs: CertSet) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _harden(self.context)
        self.context.set_alpn_protocols(ALPN_HTTP1)
        self.context.sni_callback = self._select
        self.certs = certs
        self.install(certs)

    def install(self, certs: CertSet) -> None:
        """Serve these certificates from the next handshake on; open connections keep theirs."""
        self.certs = certs
        self.context.set_alpn_protocols(certs.alpn)
        self.context.minimum_version = _VERSIONS[certs.min_version]
        self.context.verify_mode = ssl.CERT_OPTIONAL if certs.client_ca is not None else ssl.CERT_NONE

    def _select(self, ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        ssl_object.context = self.certs.pick(server_name)


# --- upstreams ------------------------------------------------------------------------------


class ClientTls:
    """How a pool opens TLS connections to one upstream's targets."""

    __slots__ = ("context", "sni", "key")

    def __init__(self, context: ssl.SSLContext, sni: str | None, key: tuple[Any, ...]) -> None:
        self.context = context
        self.sni = sni
        self.key = key  # settings and file digests: a change means pooled connections are stale

    def server_hostname(self, host: str) -> str:
        return self.sni or host


def client_tls(settings: UpstreamTls, reader: FileReader, alpn: list[str] | None = None) -> ClientTls:
    """The context toward an upstream's targets (offering `alpn`, default http/1.1). Raises
    TlsProblems (key paths below its `tls`)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(alpn or ALPN_HTTP1)
    problems: list[tuple[Loc, str]] = []
    if settings.ca is not None:
        try:
            context.load_verify_locations(_ca_file(reader, settings.ca, ("ca",)))
        except TlsProblems as exc:
            problems += exc.problems
    if settings.cert is not None and settings.key is not None:
        try:
            cert = load_pair(reader, settings.cert, settings.key)
            context.load_cert_chain(cert.cert_path, cert.key_path)
        except TlsProblems as exc:
            problems += exc.problems
        except ssl.SSLError as exc:
            problems.append((("cert",), f"OpenSSL refused {settings.cert}: {exc.reason or exc}"))
    if problems:
        raise TlsProblems(problems)
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    files = [name for name in (settings.ca, settings.cert, settings.key) if name is not None]
    digests = tuple(reader.digests.get(reader.path(name), "") for name in files)
    return ClientTls(context, settings.sni, (settings, digests, tuple(alpn or ALPN_HTTP1)))
