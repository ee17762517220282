"""basic_auth: `Authorization: Basic` checked against bcrypt or argon2 password hashes.

Password hashes are slow on purpose (tens of milliseconds), so: verification runs in a small
dedicated thread pool, never on the event loop (bcrypt and argon2 release the GIL); a success
is remembered for `cache_ttl` under a keyed hash of the credentials, so a busy client costs
one verification per TTL, not one per request; an unknown username is checked against a
real hash anyway, so timing does not reveal which usernames exist; and when too many
verifications are already waiting, new ones are refused with a 429 rather than queued
without bound (a password-guessing flood must not take the gateway's memory). Each client
address may only fill a share of that queue, so a flood from one address is refused
without refusing everybody else.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

import argon2
import bcrypt
from pydantic import Field

from bastion.config.schema import Consumer
from bastion.config.types import Duration
from bastion.http.model import Headers
from bastion.pipeline import BuildEnv, Context, Plugin, PluginConfig, Reply
from bastion.plugins import register
from bastion.plugins.common import Ambiguous, Sources, quoted

MAX_PENDING = 256  # verifications queued or running, per process
# One client address's share of them: a flood of guesses from one address hits this long
# before MAX_PENDING, so callers at other addresses still get their checks done.
MAX_PENDING_PER_CLIENT = MAX_PENDING // 8
CACHE_SIZE = 10_000

_hasher = argon2.PasswordHasher()
_executor: ThreadPoolExecutor | None = None
_pending = 0
# Pending verifications by client address; an address leaves when its count drops to 0, so
# the dict holds at most MAX_PENDING entries.
_pending_by_client: dict[str, int] = {}


def verify_password(password_hash: bytes, password: bytes) -> bool:
    """True when `password` matches a bcrypt or argon2 hash; any malformed input is False."""
    try:
        if password_hash.startswith(b"$2"):
            return bcrypt.checkpw(password, password_hash)
        return _hasher.verify(password_hash, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError, ValueError):
        return False


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="bastion-hash")
    return _executor


class BasicAuthConfig(PluginConfig):
    realm: str = Field("bastion", description="Realm of the WWW-Authenticate challenge on a 401.")
    hide_credentials: bool = Field(False, description="Remove Authorization before the request goes upstream.")
    cache_ttl: Duration = Field(30.0, description="How long a successful verification is remembered; 0 disables.")


@register
class BasicAuth(Plugin):
    name = "basic_auth"
    Config = BasicAuthConfig
    stage = Plugin.AUTHENTICATION

    def __init__(self, config: BasicAuthConfig, env: BuildEnv) -> None:
        super().__init__(config, env)
        self.source = Sources(["header:Authorization"], scheme=b"basic ")
        self.passwords = env.consumers.passwords
        self.hide = config.hide_credentials
        self.ttl = config.cache_ttl
        self._www = f'Basic realm={quoted(config.realm)}, charset="UTF-8"'.encode("latin-1")
        self.challenge = self._www
        # The decoy for unknown usernames: a real hash, so the failure takes a real hash's time.
        self.decoy = next(iter(self.passwords.values()))[1] if self.passwords else None
        self._salt = os.urandom(16)  # the cache's keys mean nothing outside this process
        self._cache: dict[bytes, tuple[Consumer, float]] = {}

    async def on_request(self, ctx: Context) -> Reply | None:
        request = ctx.request
        value = self.source.read(request)
        if value is None:
            return self._refuse("missing_credentials", "Basic credentials are required.")
        if isinstance(value, Ambiguous):  # two Authorization fields, whatever their schemes
            return self._refuse("ambiguous_credentials", "The request carries more than one Authorization header.")
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return self._refuse("invalid_credentials", "The credentials are malformed.")
        username, sep, password = decoded.partition(b":")
        if not sep:
            return self._refuse("invalid_credentials", "The credentials are malformed.")
        cache_key = hashlib.blake2b(decoded, key=self._salt, digest_size=16).digest()
        now = time.monotonic()
        cached = self._cache.get(cache_key)
        if cached is not None and cached[1] > now:
            consumer = cached[0]
        else:
            checked = await self._check(username, password, ctx.client_ip)
            if isinstance(checked, Reply):
                return checked
            consumer = checked
            if self.ttl > 0:
                if len(self._cache) >= CACHE_SIZE:
                    self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
                    if len(self._cache) >= CACHE_SIZE:
                        self._cache.clear()
                self._cache[cache_key] = (consumer, now + self.ttl)
        if self.hide:
            request.headers.remove(b"authorization")
        ctx.authenticate(consumer)
        return None

    async def _check(self, username: bytes, password: bytes, client: str) -> Consumer | Reply:
        """Verify in the hash pool: the consumer, or the reply refusing the request.

        Waiting checks are limited per client address first (MAX_PENDING_PER_CLIENT), then
        for the process (MAX_PENDING), so one address's flood is refused on its own.
        """
        global _pending
        found = self.passwords.get(username.decode("utf-8", "replace"))
        password_hash = found[1] if found is not None else self.decoy
        if password_hash is None:
            return self._refuse("invalid_credentials", "The username or password is not valid.")
        mine = _pending_by_client.get(client, 0)
        if mine >= MAX_PENDING_PER_CLIENT:
            return self._busy("Too many credential checks from your address are in progress.")
        if _pending >= MAX_PENDING:
            return self._busy("Too many credential checks are in progress.")
        _pending += 1
        _pending_by_client[client] = mine + 1
        try:
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(_pool(), verify_password, password_hash, password)
        finally:
            _pending -= 1
            left = _pending_by_client[client] - 1
            if left:
                _pending_by_client[client] = left
            else:
                del _pending_by_client[client]
        if found is None or not ok:
            return self._refuse("invalid_credentials", "The username or password is not valid.")
        return found[0]

    @staticmethod
    def _busy(message: str) -> Reply:
        return Reply.error(429, "too_many_attempts", message, Headers([(b"retry-after", b"1")]))

    def _refuse(self, word: str, message: str) -> Reply:
        return Reply.error(401, word, message, Headers([(b"www-authenticate", self._www)]))
