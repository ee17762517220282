"""The Store interface and the GCRA arithmetic every store shares.

Rate limiting uses GCRA (the generic cell rate algorithm): per key, one number, the
theoretical arrival time (TAT) of the next request at the sustained rate. A request is let
through when it arrives no earlier than TAT minus the burst tolerance; letting it through
pushes TAT one emission interval (period / limit) further. There is no window, so there is
no window edge where two windows' worth of requests could pass at once: over any interval
of length t, at most `burst + t * limit / period` requests pass.

One number per key is also what makes the cluster store simple: Redis runs the same
arithmetic in a Lua script (`now` from Redis `TIME`), atomically, with the key's TTL set to
the time until TAT, after which a key holds no information and may vanish. Times are
integer nanoseconds so that every store computes exactly the same answers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, NamedTuple

NS = 1_000_000_000


class RateResult(NamedTuple):
    """The answer for one request against one limit."""

    allowed: bool
    remaining: int  # requests that could pass right now, after this one
    reset: float  # seconds until the whole burst is available again
    retry_after: float  # seconds until a refused request would pass (0.0 when allowed)


def gcra(
    tat: int | None, now: int, limit: int, period: int, burst: int, cost: int = 1
) -> tuple[int | None, RateResult]:
    """One GCRA step: (new TAT to store or None to leave it, the result). Times in ns.

    `tat` None means the key is unknown (or expired), which is the same as `tat <= now`.
    """
    interval = max(1, period // limit)
    tolerance = interval * burst
    if tat is None or tat < now or tat > now + tolerance:
        # Unknown, idle, or ahead of anything reachable (a clock step back): a fresh start.
        tat = now
    new_tat = tat + interval * cost
    allow_at = new_tat - tolerance
    if allow_at > now:
        remaining = max(0, (tolerance - (tat - now)) // interval)
        return None, RateResult(False, remaining, (tat - now) / NS, (allow_at - now) / NS)
    remaining = (tolerance - (new_tat - now)) // interval
    return new_tat, RateResult(True, remaining, (new_tat - now) / NS, 0.0)


class StoreUnavailable(Exception):
    """The store cannot answer now (unreachable, too slow, or skipped while it recovers)."""


class Store(ABC):
    """Shared state for plugins. Methods are async so a networked store fits the same calls.

    A store object belongs to one config snapshot; `close()` is called when the snapshot is
    retired. What it points at (a shared-memory table, a Redis connection pool) may outlive
    it and is shared with the next snapshot, so counters survive a reload.

    `fail_open` is what a rate limit does when the store fails (raises), unless the plugin
    entry says otherwise: let the request through, or refuse it with a 503.
    """

    name: str = "store"
    fail_open: bool = True

    @abstractmethod
    async def rate(self, key: str, limit: int, period: float, burst: int, cost: int = 1) -> RateResult:
        """Count `cost` requests for `key` against `limit` per `period` seconds (GCRA)."""

    async def close(self) -> None:
        """Release what this store holds; safe to call twice or without any use."""
        return None

    def statistics(self) -> dict[str, Any]:
        return {"name": self.name}
