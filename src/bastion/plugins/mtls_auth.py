"""mtls_auth: the client certificate verified during the TLS handshake names the consumer.

The listener asks for a certificate when its `tls.client_ca` is set, and OpenSSL refuses
the handshake when one is presented that does not verify against those CAs; so a request
reaching this plugin either carries a verified certificate or none. The certificate is
matched by its SHA-256 fingerprint first, then by its subject (RFC 4514, the form in
config/certnames.py), against the consumers' `mtls_auth` credentials. No certificate, or one
no consumer lists: 401.

Parsing a certificate costs tens of microseconds, so the identity of each certificate seen
is kept in a small cache keyed by its DER bytes (one object per connection, whose hash
Python keeps once computed).
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from bastion.config.certnames import certificate_identity
from bastion.http.model import Headers
from bastion.pipeline import BuildEnv, Context, Plugin, PluginConfig, Reply
from bastion.plugins import register
from bastion.plugins.common import header_name

CACHE_SIZE = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
FIELDS = ("fingerprint_sha256", "subject")


class MtlsAuthConfig(PluginConfig):
    forward: dict[str, str] = Field(
        default_factory=dict,
        description="Request headers to set from the certificate, header name -> fingerprint_sha256 or subject; "
        "a client-sent copy is removed on every route.",
    )

    @field_validator("forward")
    @classmethod
    def _forward(cls, value: dict[str, str]) -> dict[str, str]:
        for header, field in value.items():
            header_name(header)
            if field not in FIELDS:
                raise ValueError(f"{header}: not a certificate field: {field!r} (one of {', '.join(FIELDS)})")
        return value


@register
class MtlsAuth(Plugin):
    name = "mtls_auth"
    Config = MtlsAuthConfig
    stage = Plugin.AUTHENTICATION

    def __init__(self, config: MtlsAuthConfig, env: BuildEnv) -> None:
        super().__init__(config, env)
        self.consumers = env.consumers
        self.forward = tuple((header_name(header), FIELDS.index(field)) for header, field in config.forward.items())
        self.identity_headers = frozenset(name for name, _ in self.forward)
        self._cache: dict[bytes, tuple[str, str]] = {}

    def identity(self, der: bytes) -> tuple[str, str]:
        """(fingerprint, subject) of a certificate, cached."""
        found = self._cache.get(der)
        if found is None:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            found = self._cache[der] = certificate_identity(der)
        return found

    @staticmethod
    def header_value(text: str) -> bytes:
        """A subject as a header value: control characters escaped as RFC 4514 does (`\\0a`),
        so a certificate cannot end the header line; UTF-8 for the rest."""
        return _CONTROL.sub(lambda m: f"\\{ord(m.group()):02x}", text).encode("utf-8")

    async def on_request(self, ctx: Context) -> Reply | None:
        der = ctx.request.client_cert
        if der is None:
            return _refuse("missing_credentials", "A client certificate is required.")
        identity = self.identity(der)
        consumers = self.consumers
        consumer = consumers.cert_fingerprints.get(identity[0]) or consumers.cert_subjects.get(identity[1])
        if consumer is None:
            return _refuse("invalid_credentials", "The client certificate does not belong to a known consumer.")
        ctx.authenticate(consumer)
        if self.forward:
            headers = ctx.request.headers
            for name, field in self.forward:
                headers.set(name, self.header_value(identity[field]))
        return None


def _refuse(word: str, message: str) -> Reply:
    return Reply.error(401, word, message, Headers())
