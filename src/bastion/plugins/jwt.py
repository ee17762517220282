"""jwt: bearer tokens verified with a shared secret, a public key or a JWKS endpoint.

What is refused, always with the contract's 401 (or 403 for a missing scope), never a 500:
an algorithm outside the allow-list (`none` can never be in it); a token whose algorithm
does not fit the key's type (the HS256-signed-with-the-RSA-public-key confusion: HMAC is
only ever verified with the configured secret, RSA/EC/EdDSA only with public keys, and a
config cannot mix the two); a bad signature; exp/nbf outside the leeway; a wrong issuer or
audience; a missing required claim; an unknown signing key; a subject that is no consumer
when `consumer_claim` is set.

Verified tokens are remembered (by their exact text) until the earlier of 60 seconds and
their expiry, so a client reusing its token costs a dict lookup, not a signature check.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal

import jwt as pyjwt
from pydantic import Field, field_validator, model_validator

from bastion.config.schema import Consumer
from bastion.config.types import Duration
from bastion.http.model import Headers
from bastion.pipeline import BuildEnv, Context, Plugin, PluginConfig, Reply
from bastion.plugins import register
from bastion.plugins.common import PROTECTED_HEADERS, Ambiguous, Sources, check_sources, header_name, quoted
from bastion.plugins.jwks import ASYMMETRIC_ALGORITHMS, HMAC_ALGORITHMS, Key, KeySet, load_pem

log = logging.getLogger("bastion.plugins.jwt")

CACHE_SIZE = 10_000
CACHE_TTL = 60.0
_AUTHORIZATION = b"authorization"


class JwtConfig(PluginConfig):
    secret: str | None = Field(None, description="Shared secret for HS256/384/512 (at least 32 bytes).")
    public_key: str | None = Field(None, description="PEM public key for RS*, PS*, ES* or EdDSA.")
    jwks_uri: str | None = Field(None, description="JWKS endpoint (http or https) with the signing keys.")
    algorithms: list[str] | None = Field(
        None, description="Allow-list; default: HS256/384/512 with a secret, every asymmetric one otherwise."
    )
    issuer: str | list[str] | None = Field(None, description="Accepted `iss` value(s); omitted: not checked.")
    audiences: list[str] = Field(default_factory=list, description="Accepted `aud` values; empty: not checked.")
    leeway: Duration = Field(0.0, description="Clock skew allowed on exp, nbf and iat.")
    required_claims: list[str] = Field(default_factory=lambda: ["exp"], description="Claims a token must carry.")
    consumer_claim: str | None = Field(None, description="Claim naming the consumer (matched to jwt credentials).")
    required_scopes: list[str] = Field(default_factory=list, description="All needed, from `scope` or `scp`; 403.")
    forward_claims: dict[str, str] = Field(default_factory=dict, description="Header -> claim sent upstream.")
    sources: list[str] = Field(
        default_factory=lambda: ["header:Authorization"],
        alias="in",
        min_length=1,
        description="Where the token is: header:NAME (Bearer scheme on Authorization), query:NAME, cookie:NAME.",
    )
    hide_credentials: bool = Field(False, description="Remove the token before the request goes upstream.")
    realm: str = Field("bastion", description="Realm of the WWW-Authenticate challenge.")
    jwks_refresh: Duration = Field(600.0, description="How often the JWKS is fetched again.")
    jwks_min_refresh: Duration = Field(30.0, description="Least time between fetches caused by unknown kids.")
    jwks_timeout: Duration = Field(5.0, description="Timeout of one JWKS fetch.")

    _sources = field_validator("sources")(check_sources)

    @field_validator("forward_claims")
    @classmethod
    def _forward(cls, value: dict[str, str]) -> dict[str, str]:
        for name, claim in value.items():
            if header_name(name) in PROTECTED_HEADERS or header_name(name) == _AUTHORIZATION:
                raise ValueError(f"{name} cannot carry a claim")
            if not claim:
                raise ValueError(f"{name}: empty claim name")
        return value

    @field_validator("jwks_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        if value is not None and len(value.encode()) < 32:
            raise ValueError("an HMAC secret must be at least 32 bytes (RFC 7518 3.2)")
        return value

    @model_validator(mode="after")
    def _keys_and_algorithms(self) -> JwtConfig:
        given = [k for k in ("secret", "public_key", "jwks_uri") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of secret, public_key, jwks_uri")
        fitting = HMAC_ALGORITHMS if self.secret is not None else ASYMMETRIC_ALGORITHMS
        for alg in self.algorithms or ():
            if alg.lower() == "none":
                raise ValueError('algorithm "none" is never accepted')
            if alg not in HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS:
                raise ValueError(f"unknown algorithm {alg!r}")
            if alg not in fitting:
                kind = "a secret" if self.secret is not None else "public keys"
                raise ValueError(f"{alg} cannot be verified with {kind} (key confusion)")
        if self.algorithms is not None and not self.algorithms:
            raise ValueError("algorithms cannot be empty")
        return self


def _claim(claims: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = claims
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _header_bytes(value: Any) -> bytes | None:
    """A claim as a header value; None when it would need a line break (header injection)."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if any(ch in text for ch in "\r\n\0"):
        return None
    return text.encode("utf-8")


def _scopes(claims: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return found


def short_key_warnings(key: Key, algorithms: frozenset[str]) -> list[str]:
    """PyJWT's complaints about `key` being short for some of `algorithms` (an HMAC secret
    under the hash size, RFC 7518 3.2; an RSA key under 2048 bits). PyJWT says so as a warning
    on every token it verifies; the plugin says it once, when the config goes live."""
    found = []
    for alg in sorted(algorithms):
        if not key.accepts(alg):
            continue
        algorithm = pyjwt.get_algorithm_by_name(alg)
        check = getattr(algorithm, "check_key_length", None)  # PyJWT >= 2.10 only
        message = check(algorithm.prepare_key(key.key)) if check is not None else None
        if message:
            found.append(f"{alg}: {message}")
    return found


class _Refusal(Exception):
    def __init__(self, message: str, word: str = "invalid_token") -> None:
        super().__init__(message)
        self.message = message
        self.word = word


_DECODE_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (pyjwt.ExpiredSignatureError, "The token has expired."),
    (pyjwt.ImmatureSignatureError, "The token is not valid yet."),
    (pyjwt.InvalidIssuerError, "The token's issuer is not accepted."),
    (pyjwt.InvalidAudienceError, "The token's audience is not accepted."),
    (pyjwt.InvalidSignatureError, "The token's signature is not valid."),
    (pyjwt.MissingRequiredClaimError, "The token lacks a required claim."),
    (pyjwt.InvalidIssuedAtError, "The token's iat claim is not valid."),
    (pyjwt.InvalidAlgorithmError, "The token's algorithm is not accepted."),
)


@register
class Jwt(Plugin):
    name = "jwt"
    Config = JwtConfig
    stage = Plugin.AUTHENTICATION

    def __init__(self, config: JwtConfig, env: BuildEnv) -> None:
        super().__init__(config, env)
        self.subjects = env.consumers.subjects
        fixed: Key | None = None
        if config.secret is not None:
            fixed = Key(None, "oct", None, config.secret.encode())
            self.keys = KeySet([fixed])
            default: tuple[str, ...] = HMAC_ALGORITHMS
        elif config.public_key is not None:
            fixed = load_pem(config.public_key)
            self.keys = KeySet([fixed])
            default = ASYMMETRIC_ALGORITHMS
        else:
            self.keys = KeySet(
                uri=config.jwks_uri,
                refresh=config.jwks_refresh,
                min_refresh=config.jwks_min_refresh,
                timeout=config.jwks_timeout,
            )
            default = ASYMMETRIC_ALGORITHMS
        self.algorithms = frozenset(config.algorithms or default)
        self.where = f"route {env.scope!r}" if env.scope else "global"
        self.short_key = " ".join(short_key_warnings(fixed, self.algorithms)) if fixed is not None else ""
        self.sources = Sources(config.sources, scheme=b"bearer ")
        self.hide = config.hide_credentials
        self.issuer: str | list[str] | None = config.issuer
        self.audiences = config.audiences or None
        self.leeway = config.leeway
        self.options: Any = {
            "require": list(config.required_claims),
            "verify_aud": bool(config.audiences),
            "verify_iss": config.issuer is not None,
        }
        self.consumer_path = tuple(config.consumer_claim.split(".")) if config.consumer_claim else None
        self.required_scopes = frozenset(config.required_scopes)
        self.scope_text = " ".join(config.required_scopes)
        self.forward = tuple(
            (header_name(header), tuple(claim.split("."))) for header, claim in config.forward_claims.items()
        )
        self.identity_headers = frozenset(name for name, _ in self.forward)
        self._www = f"Bearer realm={quoted(config.realm)}"
        self.challenge = self._www.encode("latin-1")
        self._cache: dict[str, tuple[dict[str, Any], Consumer | None, float]] = {}

    async def start(self) -> None:
        if self.short_key:  # here, not in __init__: building also happens for checks only
            log.warning(
                "jwt (%s): %s Such tokens are still accepted; allow only the algorithms in use"
                " (`algorithms`) or use a longer key.",
                self.where,
                self.short_key,
            )
        await self.keys.start()

    async def close(self) -> None:
        await self.keys.close()

    async def on_request(self, ctx: Context) -> Reply | None:
        request = ctx.request
        raw = self.sources.read(request)
        if raw is None:
            return self._refuse(401, "missing_credentials", "A bearer token is required.", "")
        if isinstance(raw, Ambiguous):  # RFC 6750 3.1: more than one method for a token
            message = "The request carries more than one token; send one."
            return self._refuse(401, "ambiguous_credentials", message, "invalid_request")
        token = raw.decode("latin-1")
        now = time.time()
        cached = self._cache.get(token)
        if cached is not None and cached[2] > now:
            claims, consumer, _ = cached
        else:
            try:
                claims, consumer = await self._verify(token)
            except _Refusal as refusal:
                return self._refuse(401, refusal.word, refusal.message, "invalid_token")
            self._remember(token, claims, consumer, now)
        if self.required_scopes and not self.required_scopes <= _scopes(claims):
            return self._refuse(403, "insufficient_scope", "The token lacks a required scope.", "insufficient_scope")
        ctx.claims = claims
        headers = request.headers
        for name, path in self.forward:
            headers.remove(name)  # never let a client forge what looks like a verified claim
            value = _claim(claims, path)
            if value is not None:
                encoded = _header_bytes(value)
                if encoded is not None:
                    headers.items.append((name, encoded))
        if self.hide:
            self.sources.remove(request)
        if consumer is not None:
            ctx.authenticate(consumer)
        return None

    async def _verify(self, token: str) -> tuple[dict[str, Any], Consumer | None]:
        """Claims and consumer of a valid token, or _Refusal saying what is wrong."""
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.PyJWTError:
            raise _Refusal("The token is malformed.") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise _Refusal("The token's algorithm is not accepted.")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _Refusal("The token is malformed.")
        keys = await self.keys.lookup(kid, alg)
        if not keys:
            raise _Refusal("The token's signing key is not known.")
        claims: dict[str, Any] | None = None
        failure: Exception | None = None
        for key in keys:
            try:
                claims = pyjwt.decode(
                    token,
                    key.key,
                    algorithms=[alg],
                    options=self.options,
                    audience=self.audiences,
                    issuer=self.issuer,
                    leeway=self.leeway,
                )
                break
            except pyjwt.InvalidSignatureError as exc:
                failure = exc  # maybe another key without kid fits
            except Exception as exc:
                failure = exc
                break
        if claims is None:
            raise _Refusal(self._describe(failure)) from None
        consumer = None
        if self.consumer_path is not None:
            subject = _claim(claims, self.consumer_path)
            consumer = self.subjects.get(subject) if isinstance(subject, str) else None
            if consumer is None:
                raise _Refusal("The token's subject is not a known consumer.", "unknown_consumer")
        return claims, consumer

    @staticmethod
    def _describe(error: Exception | None) -> str:
        for kind, message in _DECODE_ERRORS:
            if isinstance(error, kind):
                return message
        if error is not None and not isinstance(error, pyjwt.PyJWTError):
            log.debug("token verification failed: %r", error)
        return "The token is not valid."

    def _remember(self, token: str, claims: dict[str, Any], consumer: Consumer | None, now: float) -> None:
        until = now + CACHE_TTL
        exp = claims.get("exp")
        if isinstance(exp, int | float):
            until = min(until, exp + self.leeway)
        if len(self._cache) >= CACHE_SIZE:
            self._cache = {k: v for k, v in self._cache.items() if v[2] > now}
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
        self._cache[token] = (claims, consumer, until)

    def _refuse(self, status: Literal[401, 403], word: str, message: str, error: str) -> Reply:
        challenge = self._www
        if error:
            challenge += f', error="{error}"'
        if status == 403:
            challenge += f", scope={quoted(self.scope_text)}"
        return Reply.error(status, word, message, Headers([(b"www-authenticate", challenge.encode("latin-1"))]))
