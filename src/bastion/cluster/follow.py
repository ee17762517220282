"""A gateway's link to its cluster's Redis for configs and consumers (rate limits have their own).

`watch(poke)` runs two loops that call `poke()` when something may have changed: a pub/sub
subscription to the config and consumers channels (a push reaches every gateway in
milliseconds), and a poll every `poll_interval` as the fallback (a message lost while the
subscription was down, a Redis that does not deliver pub/sub). The gateway answers a poke by
reading two small keys (`heads()`) and reloading only when a number moved, so pokes are cheap
and may come as often as they like.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from bastion.cluster import consumers as consumer_store
from bastion.cluster import versions
from bastion.cluster.connect import Keys, connect, parse_url
from bastion.config.schema import Consumer

log = logging.getLogger("bastion.cluster")

POLL_INTERVAL = 1.0
TIMEOUT = 2.0


class ClusterUnavailable(Exception):
    """Redis could not be reached (or did not answer in time) for a config or consumers read."""


@dataclass(frozen=True)
class FollowSettings:
    """`bastion run --from-redis URL`: where the versions are and where the local copy goes."""

    url: str
    prefix: str = "bastion"
    local_copy: Path | None = None

    def copy_path(self) -> Path:
        return self.local_copy or versions.default_local_copy(self.url, self.prefix)


class ClusterLink:
    def __init__(
        self, url: str, prefix: str, *, timeout: float = TIMEOUT, poll_interval: float = POLL_INTERVAL
    ) -> None:
        self.url = parse_url(url)
        self.keys = Keys(prefix)
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.client = connect(self.url, timeout=timeout, pool_size=4)
        self._listener = connect(self.url, timeout=timeout, pool_size=2, blocking=True)
        self._tasks: list[asyncio.Task[None]] = []
        self.subscribed = False

    def describe(self) -> str:
        return f"{self.url.redacted()} (prefix {self.keys.prefix})"

    async def _call(self, coro: Any) -> Any:
        try:
            async with asyncio.timeout(self.timeout):
                return await coro
        except (RedisError, OSError, TimeoutError) as exc:
            raise ClusterUnavailable(f"{self.describe()}: {exc or type(exc).__name__}") from None

    async def heads(self) -> tuple[tuple[int, str] | None, int | None]:
        """((current config version, its sha256), consumers rev), in one round trip."""
        current, rev = await self._call(self.client.mget(self.keys.config_current, self.keys.consumers_rev))
        return versions.parse_head(current), (int(rev) if rev else None)

    async def fetch_config(self) -> versions.StoredVersion | None:
        result: versions.StoredVersion | None = await self._call(versions.fetch(self.client, self.keys))
        return result

    async def fetch_consumers(self) -> tuple[int | None, list[Consumer]]:
        result: tuple[int | None, list[Consumer]] = await self._call(consumer_store.fetch(self.client, self.keys))
        return result

    def watch(self, poke: Callable[[], None]) -> None:
        """Start the subscription and the poll (once; later calls do nothing)."""
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen(poke)), loop.create_task(self._poll(poke))]

    async def _poll(self, poke: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            poke()

    async def _listen(self, poke: Callable[[], None]) -> None:
        delay = 0.1
        while True:
            pubsub = self._listener.pubsub()
            try:
                await pubsub.subscribe(self.keys.config_channel, self.keys.consumers_channel)
                if not self.subscribed:
                    log.info("following %s", self.describe())
                self.subscribed = True
                delay = 0.1
                poke()  # whatever changed while we were not subscribed
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=10.0)
                    if message is not None:
                        poke()
            except (RedisError, OSError) as exc:
                if self.subscribed:
                    log.warning("lost the subscription to %s (%s); polling until it is back", self.describe(), exc)
                self.subscribed = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        for client in (self.client, self._listener):
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
