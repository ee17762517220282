"""The Redis store against a real redis-server: GCRA in Lua, pipelining, script by SHA, breaker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bastion.config.schema import Cluster
from bastion.store.base import StoreUnavailable
from bastion.store.redis import GCRA_SHA, Breaker, RedisStore
from redis_support import RedisServer


def cluster(url: str, **extra: Any) -> Cluster:
    return Cluster.model_validate({"redis": url, **extra})


def commandstats(server: RedisServer) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in server.info("commandstats").items()}


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone (it gets killed or paused)."""
    server = RedisServer()
    yield server
    server.stop()


def test_gcra_in_redis_matches_the_local_arithmetic(redis_server: RedisServer) -> None:
    async def main() -> list[Any]:
        store = RedisStore(cluster(redis_server.url))
        try:
            return [await store.rate("k", 5, 60.0, 5) for _ in range(6)]
        finally:
            await store.close()

    results = asyncio.run(main())
    assert [r.allowed for r in results] == [True] * 5 + [False]
    assert [r.remaining for r in results] == [4, 3, 2, 1, 0, 0]
    assert results[0].reset == pytest.approx(12.0, abs=0.01)
    assert results[5].retry_after == pytest.approx(12.0, abs=0.05)
    # One key, with its prefix, whose TTL is the time until its TAT.
    client = redis_server.client()
    assert client.keys("*") == [b"bastion:rl:k"]
    assert 59_000 < client.pttl("bastion:rl:k") <= 60_000


def test_the_prefix_separates_clusters(redis_server: RedisServer) -> None:
    async def main() -> tuple[bool, bool]:
        a = RedisStore(cluster(redis_server.url, prefix="a"))
        b = RedisStore(cluster(redis_server.url, prefix="b"))
        try:
            await a.rate("k", 1, 60.0, 1)
            return (await a.rate("k", 1, 60.0, 1)).allowed, (await b.rate("k", 1, 60.0, 1)).allowed
        finally:
            await a.close()
            await b.close()

    assert asyncio.run(main()) == (False, True)


def test_concurrent_checks_share_round_trips_and_call_the_script_by_sha(redis_server: RedisServer) -> None:
    """500 concurrent checks: a few pipelines, not 500 round trips; EVALSHA only, never EVAL."""

    async def main() -> tuple[list[bool], dict[str, Any]]:
        store = RedisStore(cluster(redis_server.url, pool_size=4))
        try:
            results = await asyncio.gather(*(store.rate("hot", 100, 60.0, 100) for _ in range(500)))
            return [r.allowed for r in results], store.statistics()
        finally:
            await store.close()

    allowed, stats = asyncio.run(main())
    assert sum(allowed) == 100  # exactly the burst, however they were batched
    assert stats["checks"] == 500
    assert stats["round_trips"] <= 10, stats
    assert stats["script_loads"] == 1  # at the head of the first pipeline
    calls = commandstats(redis_server)
    assert calls.get("evalsha") == 500
    assert "eval" not in calls
    assert calls.get("script|load") == 1
    assert redis_server.client().script_exists(GCRA_SHA) == [True]


def test_a_flushed_script_cache_is_loaded_again(redis_server: RedisServer) -> None:
    async def main() -> tuple[bool, bool, int]:
        store = RedisStore(cluster(redis_server.url))
        try:
            first = (await store.rate("k", 10, 1.0, 10)).allowed
            redis_server.client().script_flush()  # what a restarted Redis looks like
            second = (await store.rate("k", 10, 1.0, 10)).allowed
            return first, second, store.statistics()["script_loads"]
        finally:
            await store.close()

    assert asyncio.run(main()) == (True, True, 2)


def test_breaker_opens_on_failure_fails_fast_then_one_probe_closes_it() -> None:
    now = [0.0]
    breaker = Breaker(1.0, clock=lambda: now[0])
    assert breaker.allow()
    assert breaker.failure("refused") is True
    assert breaker.failure("refused") is False  # same outage: logged once
    assert not breaker.allow()
    now[0] = 0.99
    assert not breaker.allow()
    now[0] = 1.0
    assert breaker.allow()  # the probe
    assert breaker.state == Breaker.HALF_OPEN
    assert not breaker.allow()  # only one
    breaker.failure("refused")  # the probe failed: open again for a full interval
    now[0] = 1.5
    assert not breaker.allow()
    now[0] = 2.0
    assert breaker.allow()
    assert breaker.success() == pytest.approx(2.0)
    assert breaker.state == Breaker.CLOSED and breaker.allow()


def test_a_dead_redis_costs_the_timeout_once_then_checks_fail_fast(own_redis: RedisServer) -> None:
    async def main() -> dict[str, Any]:
        store = RedisStore(cluster(own_redis.url, timeout="200ms", retry_interval="500ms"))
        out: dict[str, Any] = {}
        try:
            assert (await store.rate("k", 1000, 1.0, 1000)).allowed
            # A Redis that hangs: every client paused for 3 s (a real server, not answering).
            await asyncio.to_thread(own_redis.client().execute_command, "CLIENT", "PAUSE", "3000", "ALL")
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.rate("k", 1000, 1.0, 1000)
            out["first"] = time.monotonic() - start
            start = time.monotonic()
            for _ in range(100):
                with pytest.raises(StoreUnavailable):
                    await store.rate("k", 1000, 1.0, 1000)
            out["next_100"] = time.monotonic() - start
            out["stats"] = store.statistics()
            await asyncio.to_thread(own_redis.client().execute_command, "CLIENT", "UNPAUSE")
            # Recovery: after retry_interval, one check probes and closes the breaker.
            start = time.monotonic()
            while True:
                try:
                    await store.rate("k", 1000, 1.0, 1000)
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.01)
            out["recovered_after"] = time.monotonic() - start
            out["state"] = store.statistics()["state"]
        finally:
            await store.close()
        return out

    out = asyncio.run(main())
    assert 0.19 <= out["first"] < 0.5
    assert out["next_100"] < 0.05  # no network, no waiting
    assert out["stats"]["state"] == "open"
    assert out["stats"]["fast_failed"] == 100
    assert out["recovered_after"] < 0.8
    assert out["state"] == "closed"


def test_a_killed_and_restarted_redis_is_used_again(own_redis: RedisServer) -> None:
    async def main() -> tuple[float, float, dict[str, Any]]:
        store = RedisStore(cluster(own_redis.url, retry_interval="300ms"))
        try:
            assert (await store.rate("k", 1000, 1.0, 1000)).allowed
            own_redis.kill()
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.rate("k", 1000, 1.0, 1000)
            refused_in = time.monotonic() - start
            await asyncio.to_thread(own_redis.start)
            back = time.monotonic()
            while True:
                try:
                    await store.rate("k", 1000, 1.0, 1000)
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.01)
            return refused_in, time.monotonic() - back, store.statistics()
        finally:
            await store.close()

    refused_in, recovered_in, stats = asyncio.run(main())
    assert refused_in < 0.25  # a refused connection fails at once, no timeout to wait
    assert recovered_in < 0.6
    assert stats["state"] == "closed" and stats["outages"] == 1
    assert stats["script_loads"] == 2  # the new server had an empty script cache


def test_a_gateway_reports_its_config_source_version_and_store(
    redis_server: RedisServer, gateway: Any, origins: Any
) -> None:
    """What the admin API will serve: Gateway.statistics() names the config and the store."""
    import hashlib

    from support import request

    origin = origins("a")
    plugins = [{"rate_limit": {"limit": 2, "per": "1m", "key": "route"}}]
    gw = gateway(
        targets=[origin.port],
        cluster={"redis": redis_server.url},
        plugins=plugins,
    )
    assert [request(gw.port, "GET", "/").status for _ in range(3)] == [200, 200, 429]
    stats = gw.call(asyncio.sleep(0, gw.gateway.statistics()))
    text = gw.config_path.read_text()
    assert stats["config"]["source"] == f"file {gw.config_path}"
    assert stats["config"]["version"] is None
    assert stats["config"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    store = stats["store"]
    assert store["name"] == "redis" and store["state"] == "closed" and store["checks"] == 3
    assert redis_server.client().keys("bastion:rl:*")  # counted in Redis, not in the process
