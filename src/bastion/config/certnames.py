"""One written form for certificate subjects, shared by the config and the mtls_auth plugin.

A subject is compared as a string, so both sides must write it the same way: RFC 4514, as
`cryptography` renders a `Name` (most specific attribute first, `TYPE=value` joined by
commas without spaces, specials escaped with a backslash), with `emailAddress` for the
e-mail attribute instead of its dotted OID. A configured subject is parsed with the same
rules and written back, so `2.5.4.3=app,O=Example` and `CN=app,O=Example` are one subject.
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.x509.oid import NameOID

_NAMES = {NameOID.EMAIL_ADDRESS: "emailAddress"}
_PARSE = {"emailAddress": NameOID.EMAIL_ADDRESS}


def subject_string(name: x509.Name) -> str:
    """The RFC 4514 form Bastion compares subjects in."""
    return name.rfc4514_string(_NAMES)


def canonical_subject(text: str) -> str:
    """A configured subject in the compared form; ValueError when it is not RFC 4514."""
    try:
        name = x509.Name.from_rfc4514_string(text.strip(), _PARSE)
    except ValueError:
        raise ValueError(
            f"not an RFC 4514 subject: {text!r} (write it most specific first, with upper-case attribute "
            "names and no spaces around commas: CN=app,O=Example)"
        ) from None
    if not len(name):
        raise ValueError("the subject is empty")
    return subject_string(name)


def certificate_identity(der: bytes) -> tuple[str, str]:
    """(SHA-256 fingerprint as lower-case hex, subject string) of a DER certificate."""
    subject = subject_string(x509.load_der_x509_certificate(der).subject)
    return hashlib.sha256(der).hexdigest(), subject
