"""rate_limit: `limit` requests per `per`, counted per consumer, client address, route or header.

The counting is GCRA in the store (see store/base.py): no fixed windows, so no double burst
at a window edge. Up to `burst` requests (default: `limit`) may pass at once; after that
they pass at the sustained rate of one every `per / limit`. Several entries on a route stack:
each is checked and a request needs every one of them to pass.

Every response of a limited route carries the RateLimit headers of the IETF httpapi draft
(RateLimit-Limit, -Remaining, -Reset for the entry closest to exhaustion, RateLimit-Policy
listing every entry of the route, also on a 429 from an entry before the last); a refused
request gets the contract's 429 with Retry-After.

Counter keys carry the scope (global entry, or the route's name), the limit and the key
kind, so a global entry limits a consumer across every route while a route entry limits it
on that route only, and so that a reload that keeps an entry keeps its counters.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

from pydantic import Field, field_validator, model_validator

from bastion.config.types import Duration
from bastion.http.model import Headers, Response
from bastion.pipeline import BuildEnv, Context, Plugin, PluginConfig, RateState, Reply
from bastion.plugins import register
from bastion.plugins.common import TOKEN
from bastion.store.base import StoreUnavailable

log = logging.getLogger("bastion.plugins.rate_limit")

_LIMIT = b"ratelimit-limit"
_REMAINING = b"ratelimit-remaining"
_RESET = b"ratelimit-reset"
_POLICY = b"ratelimit-policy"
_OURS = frozenset((_LIMIT, _REMAINING, _RESET, _POLICY))


class RateLimitConfig(PluginConfig):
    limit: int = Field(ge=1, description="Requests allowed per `per`.")
    per: Duration = Field(description="The period, e.g. 1s, 1m, 1h, 1d.")
    key: str = Field("consumer", description="consumer | ip | route | header:NAME")
    burst: int | None = Field(None, ge=1, description="Requests that may pass at once; default: limit.")
    headers: bool = Field(True, description="Send the RateLimit-* headers.")
    fail_open: bool | None = Field(
        None, description="Let requests through when the store fails; default: cluster.on_store_error (allow)."
    )

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        kind, sep, name = value.partition(":")
        if value in ("consumer", "ip", "route") or (kind == "header" and sep and TOKEN.match(name)):
            return value
        raise ValueError("must be consumer, ip, route or header:NAME")

    @model_validator(mode="after")
    def _period(self) -> RateLimitConfig:
        if self.per <= 0:
            raise ValueError("per must be longer than 0")
        return self


def _seconds(value: float) -> bytes:
    return str(max(0, math.ceil(value))).encode()


@register
class RateLimit(Plugin):
    name = "rate_limit"
    Config = RateLimitConfig
    stage = Plugin.TRAFFIC

    def __init__(self, config: RateLimitConfig, env: BuildEnv) -> None:
        super().__init__(config, env)
        self.store = env.store
        self.limit = config.limit
        self.per = config.per
        self.burst = config.burst or config.limit
        kind, _, header = config.key.partition(":")
        self.kind = kind
        self.header = header.lower().encode("ascii")
        self.prefix = f"rl|{env.scope}|{config.limit}/{config.per:g}/{self.burst}|{config.key}|"
        self.policy = f"{config.limit};w={config.per:g}".encode()
        if self.burst != config.limit:
            self.policy += f";burst={self.burst}".encode()
        self.send_headers = config.headers
        self.fail_open = config.fail_open if config.fail_open is not None else env.store.fail_open
        self._last_error_log = 0.0
        # Route name -> RateLimit-Policy of every entry on it, in chain order (prepare_route).
        self._policies: dict[str, bytes] = {}

    def prepare_route(self, route: str, chain: Sequence[Plugin]) -> None:
        self._policies[route] = b", ".join(p.policy for p in chain if isinstance(p, RateLimit))

    def key_of(self, ctx: Context) -> str:
        kind = self.kind
        if kind == "consumer":
            consumer = ctx.consumer
            return self.prefix + (consumer.name if consumer is not None else "ip:" + ctx.client_ip)
        if kind == "ip":
            return self.prefix + ctx.client_ip
        if kind == "route":
            return self.prefix + ctx.route_name
        value = ctx.request.headers.get_raw(self.header)
        return self.prefix + ("h:" + value.decode("latin-1") if value else "ip:" + ctx.client_ip)

    async def on_request(self, ctx: Context) -> Reply | None:
        try:
            result = await self.store.rate(self.key_of(ctx), self.limit, self.per, self.burst)
        except Exception as exc:
            now = time.monotonic()
            if now - self._last_error_log > 10:
                self._last_error_log = now
                outcome = "pass" if self.fail_open else "are refused"
                if isinstance(exc, StoreUnavailable):  # the store has logged why
                    log.warning("rate limit store unavailable; requests %s: %s", outcome, exc)
                else:
                    log.exception("rate limit store failed; requests %s", outcome)
            if self.fail_open:
                return None
            return Reply.error(503, "rate_limit_unavailable", "The rate limit cannot be checked right now.")
        state = ctx.rate
        if state is None:
            policy = self._policies.get(ctx.route_name, self.policy)
            ctx.rate = RateState(self.limit, result.remaining, math.ceil(result.reset), policy)
        elif result.remaining < state.remaining:
            state.limit, state.remaining, state.reset = self.limit, result.remaining, math.ceil(result.reset)
        if result.allowed:
            return None
        headers = Headers([(b"retry-after", _seconds(max(1.0, result.retry_after)))])
        return Reply.error(429, "rate_limited", "Too many requests; retry later.", headers)

    async def on_response(self, ctx: Context, response: Response) -> None:
        state = ctx.rate
        if state is None or state.written or not self.send_headers:
            return
        state.written = True
        items = response.headers.items
        if any(name in _OURS for name, _ in items):
            items = response.headers.items = [item for item in items if item[0] not in _OURS]
        items += (
            (_LIMIT, str(state.limit).encode()),
            (_REMAINING, str(state.remaining).encode()),
            (_RESET, str(state.reset).encode()),
            (_POLICY, state.policy),
        )
