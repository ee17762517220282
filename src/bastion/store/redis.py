"""The cluster store: GCRA counters in Redis, so every gateway on that Redis shares one limit.

Each check is one call of a Lua script (`GCRA_LUA`) that reads the key's TAT, applies the same
arithmetic as `base.gcra` with Redis' own clock (`TIME`) and writes the new TAT, atomically.
One script, one clock: the gateways of a cluster together behave exactly like one limiter,
whatever their number and whatever their clocks say. The script is sent once (SCRIPT LOAD,
at the head of the first pipeline) and then called by its SHA1; a NOSCRIPT answer (a
restarted Redis) redoes that pipeline with the script loaded again.
Times are microseconds here: Lua numbers are doubles, exact only up to 2^53.

Round trips. Checks are not sent one by one: a check joins a queue, and the queue is sent as
one pipeline (EVALSHA x n) on the next turn of the event loop. At most `pool_size` pipelines
are in flight; while they are, new checks wait in the queue and leave together when one
comes back. So 500 concurrent requests cost a handful of round trips, not 500, and a
request alone costs one.

Failures. Every pipeline runs under `timeout`. A failure (refused, reset, timed out) opens a
circuit breaker: for `retry_interval` every check fails at once (`StoreUnavailable`, and the
rate limit applies `on_store_error`), without touching the network; then one check goes
through as a probe (half-open). Its success closes the breaker, its failure opens it again.
So a dead Redis costs the requests already waiting on it at most `timeout`, once, and after
that one probe per `retry_interval`.

The connection pool, the breaker and the queue belong to the process (one per event loop
and settings) and are shared by the snapshots that use them, like the shared-memory table:
a reload keeps them, and the last snapshot to close closes the connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError, RedisError

from bastion.cluster.connect import Keys, RedisURL, connect, parse_url
from bastion.store.base import RateResult, Store, StoreUnavailable

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from bastion.config.schema import Cluster

log = logging.getLogger("bastion.store")

US = 1_000_000

# KEYS[1] the counter; ARGV: emission interval (us), burst tolerance (us), cost.
# Returns {allowed, remaining, reset_us, retry_after_us}, as base.gcra does.
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now or tat > now + tolerance then
  tat = now
end
local new_tat = tat + interval * cost
local allow_at = new_tat - tolerance
if allow_at > now then
  local remaining = math.floor((tolerance - (tat - now)) / interval)
  if remaining < 0 then remaining = 0 end
  return {0, remaining, tat - now, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return {1, math.floor((tolerance - (new_tat - now)) / interval), new_tat - now, 0}
"""
GCRA_SHA = hashlib.sha1(GCRA_LUA.encode()).hexdigest()

Clock = Callable[[], float]


class Breaker:
    """Closed (use the store), open (fail fast until `until`), half-open (one probe out)."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, retry_interval: float, clock: Clock = time.monotonic) -> None:
        self.retry_interval = retry_interval
        self.clock = clock
        self.state = self.CLOSED
        self.until = 0.0
        self.down_since: float | None = None
        self.opened = 0  # times it went from closed to open
        self.last_error = ""

    def allow(self) -> bool:
        """May a check go to the store now? In half-open, only the first caller may."""
        state = self.state
        if state == self.CLOSED:
            return True
        if state == self.OPEN and self.clock() >= self.until:
            self.state = self.HALF_OPEN
            return True
        return False

    def success(self) -> float | None:
        """The store answered. Returns how long it had been down, if it had."""
        self.state = self.CLOSED
        down, self.down_since = self.down_since, None
        return None if down is None else self.clock() - down

    def failure(self, error: str) -> bool:
        """The store failed. Returns True when this closes an up period (worth a log line)."""
        now = self.clock()
        first = self.down_since is None
        if first:
            self.down_since = now
            self.opened += 1
        self.state = self.OPEN
        self.until = now + self.retry_interval
        self.last_error = error
        return first


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class RedisBackend:
    """One process's link to one Redis for rate limiting: client, queue, breaker, counters."""

    def __init__(
        self,
        url: RedisURL,
        *,
        prefix: str = "bastion",
        timeout: float = 0.25,
        retry_interval: float = 1.0,
        pool_size: int = 8,
        clock: Clock = time.monotonic,
    ) -> None:
        self.url = url
        self.keys = Keys(prefix)
        self.timeout = timeout
        self.pool_size = pool_size
        self.breaker = Breaker(retry_interval, clock)
        self.loop = asyncio.get_running_loop()
        self.client: Redis = connect(url, timeout=timeout, pool_size=pool_size)
        self.users = 0
        self.policy = "allow"  # on_store_error of the snapshots attached, for the log line
        self._pending: list[tuple[str, int, int, int, asyncio.Future[RateResult]]] = []
        self._in_flight = 0
        self._script_loaded = False
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.checks = 0
        self.round_trips = 0
        self.largest_batch = 0
        self.failed = 0  # checks that got StoreUnavailable after trying
        self.fast_failed = 0  # checks refused by the open breaker, no network
        self.script_loads = 0

    def rate(self, key: str, interval: int, tolerance: int, cost: int) -> asyncio.Future[RateResult]:
        """Queue one check; the future resolves when its pipeline comes back."""
        if not self.breaker.allow():
            self.fast_failed += 1
            raise StoreUnavailable(f"redis store unavailable ({self.breaker.last_error})")
        future: asyncio.Future[RateResult] = self.loop.create_future()
        self._pending.append((self.keys.rate + key, interval, tolerance, cost, future))
        if not self._flush_scheduled and self._in_flight < self.pool_size:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        if self.breaker.state == Breaker.OPEN:
            # Queued before a failure opened the breaker: do not make them wait on it again.
            self._fail(batch, StoreUnavailable(f"redis store unavailable ({self.breaker.last_error})"))
            self.fast_failed += len(batch)
            return
        self._in_flight += 1
        task = self.loop.create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[str, int, int, int, asyncio.Future[RateResult]]]) -> None:
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    replies = await self._run(batch)
            except (RedisError, OSError, TimeoutError) as exc:
                error = _describe(exc)
                if self.breaker.failure(error):
                    log.error(
                        "redis store %s failed (%s): rate limits apply on_store_error (%s); one probe every %gs",
                        self.url.redacted(),
                        error,
                        self.policy,
                        self.breaker.retry_interval,
                    )
                self.failed += len(batch)
                self._fail(batch, StoreUnavailable(f"redis store failed ({error})"))
                return
            down = self.breaker.success()
            if down is not None:
                log.warning("redis store %s is back after %.2fs", self.url.redacted(), down)
            for (_, _, _, _, future), reply in zip(batch, replies, strict=True):
                if not future.done():
                    allowed, remaining, reset, retry = reply
                    future.set_result(RateResult(bool(allowed), int(remaining), reset / US, retry / US))
        except BaseException as exc:  # cancelled at shutdown, or a bug: never leave a waiter hanging
            self._fail(batch, StoreUnavailable(_describe(exc)))
            if not isinstance(exc, Exception):
                raise
            log.exception("redis store: unexpected failure")
        finally:
            self._in_flight -= 1
            if self._pending and not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self._flush)

    async def _run(self, batch: list[tuple[str, int, int, int, asyncio.Future[RateResult]]]) -> list[Any]:
        """EVALSHA every check in one pipeline. The first pipeline (and the one redone after a
        NOSCRIPT, from a restarted Redis) starts with SCRIPT LOAD, in the same round trip."""
        self.checks += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            load = not self._script_loaded
            if load:
                pipe.script_load(GCRA_LUA)
            for key, interval, tolerance, cost, _ in batch:
                pipe.evalsha(GCRA_SHA, 1, key, interval, tolerance, cost)
            self.round_trips += 1
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            if load:
                self.script_loads += 1
                if isinstance(replies[0], Exception):
                    raise replies[0]
                replies = replies[1:]
                self._script_loaded = True
            if attempt == 1 and any(isinstance(reply, NoScriptError) for reply in replies):
                self._script_loaded = False
                continue
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies
        raise AssertionError("unreachable")

    @staticmethod
    def _fail(batch: list[tuple[str, int, int, int, asyncio.Future[RateResult]]], exc: Exception) -> None:
        for *_, future in batch:
            if not future.done():
                future.set_exception(exc)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._fail(self._pending, StoreUnavailable("the store is closed"))
        self._pending = []
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()

    def statistics(self) -> dict[str, Any]:
        return {
            "url": self.url.redacted(),
            "state": self.breaker.state,
            "last_error": self.breaker.last_error,
            "outages": self.breaker.opened,
            "checks": self.checks,
            "round_trips": self.round_trips,
            "largest_batch": self.largest_batch,
            "failed": self.failed,
            "fast_failed": self.fast_failed,
            "script_loads": self.script_loads,
        }


_backends: dict[tuple[Any, ...], RedisBackend] = {}


def _attach(settings: Cluster) -> RedisBackend:
    loop = asyncio.get_running_loop()
    key = (id(loop), settings.redis, settings.prefix, settings.timeout, settings.retry_interval, settings.pool_size)
    backend = _backends.get(key)
    if backend is None or backend.loop is not loop:
        backend = _backends[key] = RedisBackend(
            parse_url(settings.redis),
            prefix=settings.prefix,
            timeout=settings.timeout,
            retry_interval=settings.retry_interval,
            pool_size=settings.pool_size,
        )
    backend.users += 1
    backend.policy = settings.on_store_error
    return backend


async def _detach(backend: RedisBackend) -> None:
    backend.users -= 1
    if backend.users > 0:
        return
    for key, value in list(_backends.items()):
        if value is backend:
            del _backends[key]
    await backend.aclose()


class RedisStore(Store):
    """The store of one snapshot with `cluster.redis`: attaches to the process's backend on
    first use (building a snapshot opens nothing, so `bastion check` stays offline)."""

    name = "redis"

    def __init__(self, settings: Cluster) -> None:
        self.settings = settings
        self.fail_open = settings.on_store_error == "allow"
        self._backend: RedisBackend | None = None
        self._closed = False

    def backend(self) -> RedisBackend:
        backend = self._backend
        if backend is None:
            if self._closed:
                raise StoreUnavailable("the store is closed")
            backend = self._backend = _attach(self.settings)
        return backend

    async def rate(self, key: str, limit: int, period: float, burst: int, cost: int = 1) -> RateResult:
        interval = max(1, int(period * US) // limit)
        return await self.backend().rate(key, interval, interval * burst, cost)

    async def close(self) -> None:
        self._closed = True
        backend, self._backend = self._backend, None
        if backend is not None:
            await _detach(backend)

    def statistics(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"name": self.name, "on_store_error": self.settings.on_store_error}
        if self._backend is not None:
            stats.update(self._backend.statistics())
        else:
            stats["url"] = parse_url(self.settings.redis).redacted()
        return stats
