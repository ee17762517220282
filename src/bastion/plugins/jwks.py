"""Verification keys for the jwt plugin: a fixed key, or a JWKS endpoint kept fresh.

A JWKS set is fetched when the snapshot starts and then every `refresh`; a token naming an
unknown `kid` triggers an early fetch, at most once every `min_refresh` (so a stream of
tokens with made-up kids cannot hammer the identity provider), and concurrent requests wait
for the same fetch. A failed fetch keeps the keys already known: an identity provider that
is down must not log everybody out. The fetch is urllib in a worker thread (it is rare and
off the hot path), bounded in time and size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.request
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

log = logging.getLogger("bastion.plugins.jwt")

MAX_JWKS_BYTES = 1024 * 1024

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
ASYMMETRIC_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
# The key family each algorithm needs: a key of another family never verifies that algorithm.
FAMILY = {
    **{alg: "oct" for alg in HMAC_ALGORITHMS},
    **{alg: "RSA" for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": "EC:secp256r1",
    "ES384": "EC:secp384r1",
    "ES512": "EC:secp521r1",
    "EdDSA": "OKP",
}

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey


class Key:
    """One verification key: its kid, family, optional pinned alg, and the key object."""

    __slots__ = ("kid", "family", "alg", "key")

    def __init__(self, kid: str | None, family: str, alg: str | None, key: Any) -> None:
        self.kid = kid
        self.family = family
        self.alg = alg
        self.key = key

    def accepts(self, alg: str) -> bool:
        return FAMILY.get(alg) == self.family and (self.alg is None or self.alg == alg)


def family_of(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC:{key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "OKP"
    raise ValueError(f"unsupported key type {type(key).__name__}")


def load_pem(text: str) -> Key:
    """A PEM public key (or certificate-less SPKI) from the config."""
    try:
        key = load_pem_public_key(text.strip().encode())
    except ValueError as exc:
        raise ValueError(f"not a PEM public key: {exc}") from None
    return Key(None, family_of(key), None, key)


def parse_jwks(document: Any) -> list[Key]:
    """The usable signature keys of a JWKS document; unusable entries are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys = []
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        kty = entry.get("kty")
        loader: Any = {"RSA": RSAAlgorithm, "EC": ECAlgorithm, "OKP": OKPAlgorithm}.get(kty)  # type: ignore[arg-type]
        if loader is None:
            continue
        try:
            key = loader.from_jwk(entry)
        except Exception as exc:  # a malformed entry must not hide the good ones
            log.warning("JWKS key %r skipped: %s", entry.get("kid"), exc)
            continue
        if hasattr(key, "public_key") and not isinstance(key, PublicKey):
            key = key.public_key()  # a private JWK: only its public half is needed
        kid = entry.get("kid")
        alg = entry.get("alg")
        try:
            family = family_of(key)
        except ValueError:
            continue
        keys.append(Key(kid if isinstance(kid, str) else None, family, alg if isinstance(alg, str) else None, key))
    return keys


def fetch_jwks(uri: str, timeout: float) -> list[Key]:
    """Blocking fetch + parse (runs in a worker thread)."""
    request = urllib.request.Request(uri, headers={"Accept": "application/json", "User-Agent": "bastion"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # http(s) only: checked in config
        body = response.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError("JWKS document over 1 MB")
    return parse_jwks(json.loads(body))


class KeySet:
    """Keys by kid, with the refresh policy described at the top of the module."""

    def __init__(
        self,
        keys: list[Key] | None = None,
        uri: str | None = None,
        refresh: float = 600.0,
        min_refresh: float = 30.0,
        timeout: float = 5.0,
    ) -> None:
        self.uri = uri
        self.refresh_every = refresh
        self.min_refresh = min_refresh
        self.timeout = timeout
        self.fetches = 0
        self.failures = 0
        self._by_kid: dict[str | None, list[Key]] = {}
        self._all: list[Key] = []
        self._attempted = -float("inf")
        self._inflight: asyncio.Future[bool] | None = None
        self._task: asyncio.Task[None] | None = None
        if keys:
            self._install(keys)

    def _install(self, keys: list[Key]) -> None:
        by_kid: dict[str | None, list[Key]] = {}
        for key in keys:
            by_kid.setdefault(key.kid, []).append(key)
        self._by_kid = by_kid
        self._all = keys

    def candidates(self, kid: str | None, alg: str) -> list[Key]:
        """Keys that may verify a token with this kid and alg (no I/O).

        A kid only selects among JWKS keys. A configured key (a secret or a PEM, no `uri`)
        has no kid to match, so it is tried whatever kid the token names.
        """
        keys = self._all if kid is None or self.uri is None else self._by_kid.get(kid, ())
        return [key for key in keys if key.accepts(alg)]

    async def lookup(self, kid: str | None, alg: str) -> list[Key]:
        """Like `candidates`, but an unknown kid may trigger one (rate-limited) refresh."""
        found = self.candidates(kid, alg)
        if found or self.uri is None:
            return found
        if self._inflight is None and time.monotonic() - self._attempted < self.min_refresh:
            return found
        await self.refresh()
        return self.candidates(kid, alg)

    async def refresh(self) -> bool:
        """Fetch now (or join the fetch already running); True when the keys were replaced."""
        if self.uri is None:
            return False
        if self._inflight is not None:
            return await asyncio.shield(self._inflight)
        loop = asyncio.get_running_loop()
        self._attempted = time.monotonic()
        future = self._inflight = loop.create_future()
        ok = False
        try:
            self.fetches += 1
            keys = await loop.run_in_executor(None, fetch_jwks, self.uri, self.timeout)
            self._install(keys)
            ok = True
        except Exception as exc:
            self.failures += 1
            log.warning("JWKS fetch from %s failed, keeping %d known keys: %s", self.uri, len(self._all), exc)
        finally:
            # Also on cancellation: requests waiting on this fetch must not wait forever.
            self._inflight = None
            future.set_result(ok)
        return ok

    async def start(self) -> None:
        if self.uri is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._refresher())

    async def _refresher(self) -> None:
        while True:
            ok = await self.refresh()
            await asyncio.sleep(self.refresh_every if ok else min(self.refresh_every, max(self.min_refresh, 1.0)))

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def statistics(self) -> dict[str, Any]:
        return {"keys": len(self._all), "fetches": self.fetches, "failures": self.failures}
