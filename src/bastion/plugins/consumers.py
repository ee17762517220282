"""The consumers of a config, indexed for the authentication plugins.

Built once per snapshot. API keys are indexed by their SHA-256 digest: looking a presented
key up by digest reveals nothing useful through timing (an attacker cannot steer the digest),
and the final comparison uses hmac.compare_digest. Password hashes are checked for a known
format here, so a typo is a config error with its line, not a 401 at run time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence

import argon2

from bastion.config.schema import Consumer, Loc

BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
ARGON2_PREFIXES = ("$argon2id$", "$argon2i$", "$argon2d$")


_BCRYPT = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")


def valid_hash(text: str) -> bool:
    """Is this a well-formed bcrypt or argon2 hash (so a typo fails at load, not at login)?"""
    if text.startswith(BCRYPT_PREFIXES):
        return _BCRYPT.match(text) is not None
    if text.startswith(ARGON2_PREFIXES):
        try:
            argon2.extract_parameters(text)
        except (argon2.exceptions.InvalidHashError, ValueError):
            return False
        return True
    return False


def key_digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class ConsumerIndex:
    """Consumers by name, API key, basic-auth username, JWT subject and client certificate."""

    def __init__(self) -> None:
        self.by_name: dict[str, Consumer] = {}
        self._keys: dict[bytes, tuple[Consumer, bytes | None]] = {}  # None: only the digest is known
        self.passwords: dict[str, tuple[Consumer, bytes]] = {}
        self.subjects: dict[str, Consumer] = {}
        self.cert_fingerprints: dict[str, Consumer] = {}  # SHA-256 hex (lower case) -> consumer
        self.cert_subjects: dict[str, Consumer] = {}  # RFC 4514 subject (config/certnames.py) -> consumer

    @classmethod
    def build(cls, consumers: Sequence[Consumer]) -> tuple[ConsumerIndex, list[tuple[Loc, str]]]:
        """The index and the problems found (duplicate credentials, unknown hash formats)."""
        index = cls()
        problems: list[tuple[Loc, str]] = []
        for i, consumer in enumerate(consumers):
            index.by_name[consumer.name] = consumer
            creds = consumer.credentials
            base: Loc = ("consumers", i, "credentials")
            for j, cred in enumerate(creds.key_auth):
                raw = cred.key.encode() if cred.key is not None else None
                digest = key_digest(raw) if raw is not None else bytes.fromhex(cred.key_sha256 or "")
                other = index._keys.get(digest)
                if other is not None:
                    # Never echo the key itself: this message ends up in logs.
                    field = "key" if raw is not None else "key_sha256"
                    problems.append(((*base, "key_auth", j, field), f"key already used by consumer {other[0].name!r}"))
                    continue
                index._keys[digest] = (consumer, raw)
            for j, basic in enumerate(creds.basic_auth):
                loc: Loc = (*base, "basic_auth", j)
                if basic.username in index.passwords:
                    owner = index.passwords[basic.username][0].name
                    problems.append(((*loc, "username"), f"username already used by consumer {owner!r}"))
                    continue
                if not valid_hash(basic.password_hash):
                    problems.append(((*loc, "password_hash"), "not a bcrypt ($2b$...) or argon2 ($argon2id$...) hash"))
                    continue
                index.passwords[basic.username] = (consumer, basic.password_hash.encode())
            for j, token in enumerate(creds.jwt):
                if token.subject in index.subjects:
                    owner = index.subjects[token.subject].name
                    problems.append(((*base, "jwt", j, "subject"), f"subject already used by consumer {owner!r}"))
                    continue
                index.subjects[token.subject] = consumer
            for j, cert in enumerate(creds.mtls_auth):
                field, value, table = (
                    ("fingerprint_sha256", cert.fingerprint_sha256, index.cert_fingerprints)
                    if cert.fingerprint_sha256 is not None
                    else ("subject", cert.subject or "", index.cert_subjects)
                )
                if value in table:
                    problems.append(((*base, "mtls_auth", j, field), f"already used by consumer {table[value].name!r}"))
                    continue
                table[value] = consumer
        return index, problems

    def by_key(self, key: bytes) -> Consumer | None:
        """The consumer owning this API key, or None. A credential given as a digest matches
        when the key's SHA-256 is that digest (the lookup itself is the comparison)."""
        found = self._keys.get(key_digest(key))
        if found is None or (found[1] is not None and not hmac.compare_digest(found[1], key)):
            return None
        return found[0]

    def __len__(self) -> int:
        return len(self.by_name)
