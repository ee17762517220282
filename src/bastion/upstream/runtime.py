"""An upstream as the exchange uses it: targets, balancer, sticky sessions and the retry policy.

The exchange's attempt loop calls, per try: `pick` (sticky pin, else the balancer; a target
whose pool is full is avoided while another has room), then `report_success` or
`report_failure` (passive health and latency), and `may_retry` after a failure. Retries are
allowed only for idempotent requests (or any request whose connection never opened), only
for connect failures, resets and the configured statuses, only while an untried target is
available, and only within the retry budget.

The retry budget keeps retries a bounded share of live traffic, so a failing upstream sees at
most (1 + budget) x the load instead of (1 + attempts) x: over the last `BUDGET_WINDOW`
seconds, retries must stay under `budget x requests + min_retries_per_second x window`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from bastion.config.schema import Upstream
from bastion.errors import GatewayError, NoHealthyTarget, UpstreamError, UpstreamTimeout
from bastion.http.model import Request
from bastion.observability.metrics import REQUEST_BUCKETS, UpstreamStats
from bastion.upstream.balancers import BALANCERS, Balancer, cookie_value
from bastion.upstream.targets import TargetState, pool_limits

if TYPE_CHECKING:
    from bastion.net.tls import ClientTls

log = logging.getLogger("bastion.upstream")

IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))
BUDGET_WINDOW = 10
STICKY_SECRET_ENV = "BASTION_STICKY_SECRET"
_PROCESS_SECRET = os.urandom(32).hex()


def sticky_secret(configured: str | None) -> bytes:
    """The key for sticky ids: configured, else from the environment (set by the worker
    supervisor, so every worker agrees), else random for this process."""
    return (configured or os.environ.get(STICKY_SECRET_ENV) or _PROCESS_SECRET).encode()


def sticky_id(secret: bytes, upstream: str, address: str) -> str:
    """An opaque cookie value for a target: an HMAC of its identity, never the address."""
    return hmac.new(secret, f"{upstream}/{address}".encode(), hashlib.sha256).hexdigest()[:20]


class RetryBudget:
    """Requests and retries counted in one-second buckets over a sliding window."""

    __slots__ = ("share", "reserve", "clock", "requests", "retries", "second", "denied")

    def __init__(self, share: float, min_per_second: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.share = share
        self.reserve = min_per_second * BUDGET_WINDOW
        self.clock = clock
        self.requests = [0] * BUDGET_WINDOW
        self.retries = [0] * BUDGET_WINDOW
        self.second = int(clock())
        self.denied = 0

    def _advance(self) -> int:
        now = int(self.clock())
        gap = now - self.second
        if gap > 0:
            for step in range(1, min(gap, BUDGET_WINDOW) + 1):
                slot = (self.second + step) % BUDGET_WINDOW
                self.requests[slot] = 0
                self.retries[slot] = 0
            self.second = now
        return now % BUDGET_WINDOW

    def request(self) -> None:
        self.requests[self._advance()] += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget if there is room."""
        slot = self._advance()
        if sum(self.retries) >= self.share * sum(self.requests) + self.reserve:
            self.denied += 1
            return False
        self.retries[slot] += 1
        return True


class UpstreamRuntime:
    __slots__ = (
        "name",
        "config",
        "targets",
        "balancer",
        "response_timeout",
        "max_attempts",
        "retry_statuses",
        "budget",
        "passive",
        "clock",
        "sticky",
        "sticky_ids",
        "sticky_targets",
        "sticky_cookie",
        "stats",
        "tls",
    )

    def __init__(
        self,
        name: str,
        config: Upstream,
        targets: Sequence[TargetState],
        clock: Callable[[], float] = time.monotonic,
        stats: UpstreamStats | None = None,
        tls: ClientTls | None = None,
        **balancer_options: Any,
    ) -> None:
        """`stats`: the process's counters for this upstream name (they outlive the snapshot)."""
        self.name = name
        self.stats = stats if stats is not None else UpstreamStats()
        self.tls = tls  # applied to the targets' pools when this snapshot goes live
        self.config = config
        self.targets = list(targets)
        self.clock = clock
        factory = BALANCERS.get(config.balance, BALANCERS["round_robin"])
        self.balancer: Balancer = factory(self.targets, config, clock=clock, **balancer_options)
        self.response_timeout = config.timeouts.response
        self.max_attempts = 1 + config.retries.attempts
        self.retry_statuses = frozenset(config.retries.on_statuses)
        self.budget = RetryBudget(config.retries.budget, config.retries.min_retries_per_second, clock)
        self.passive = config.health_check.passive
        self.sticky = config.sticky
        self.sticky_ids: dict[str, str] = {}  # target key -> cookie value
        self.sticky_targets: dict[str, TargetState] = {}  # cookie value -> target
        self.sticky_cookie = b""
        if config.sticky is not None:
            secret = sticky_secret(config.sticky.secret)
            for target in self.targets:
                value = sticky_id(secret, name, str(target.address))
                self.sticky_ids[target.key] = value
                self.sticky_targets[value] = target
            self.sticky_cookie = config.sticky.cookie.encode()

    def activate(self) -> None:
        """This snapshot goes live: apply its settings to the shared target state."""
        now = self.clock()
        limits = pool_limits(self.config)
        queue = self.config.queue
        for target, settings in zip(self.targets, self.config.targets, strict=True):
            target.weight = settings.weight
            target.backup = settings.backup
            target.slow_start = self.config.slow_start
            target.pool.limits = limits
            target.pool.queue.size = queue.size
            target.pool.queue.timeout = queue.timeout
            target.pool.set_tls(self.tls)
            if target.joining:
                target.joining = False
                target.start_ramp(now)

    # --- the exchange's hooks --------------------------------------------------------------

    def pick(self, request: Request, exclude: Sequence[TargetState] = ()) -> TargetState:
        """The target for this try. Raises NoHealthyTarget."""
        if not exclude:
            self.budget.request()
        target = None
        if self.sticky is not None:
            target = self._pinned(request, exclude)
        if target is None:
            target = self.balancer.pick(request, exclude)
            if target is None:
                raise NoHealthyTarget()
        if target.pool.saturated():
            target = self._with_room(request, target, exclude)
        return target

    def _pinned(self, request: Request, exclude: Sequence[TargetState]) -> TargetState | None:
        value = cookie_value(request, self.sticky.cookie) if self.sticky is not None else None
        if value is None:
            return None
        target = self.sticky_targets.get(value)
        if target is None or target in exclude or not target.available(self.clock()):
            return None
        if target.backup and self.balancer.any_primary(self.clock()):
            return None  # a pin to a backup lasts only while the primaries are down
        return target

    def _with_room(self, request: Request, full: TargetState, exclude: Sequence[TargetState]) -> TargetState:
        """`full` would make the request queue: prefer another candidate that has a free slot."""
        skip = [*exclude, full]
        while True:
            other = self.balancer.pick(request, skip)
            if other is None:
                return full  # every candidate is full: queue on the first choice
            if not other.pool.saturated():
                return other
            skip.append(other)

    def may_retry(
        self,
        request: Request,
        attempt: int,
        sent: bool,
        tried: Sequence[TargetState] = (),
        error: Exception | None = None,
    ) -> bool:
        """May a failed try be tried again? `sent`: the request may have reached the upstream."""
        if attempt >= self.max_attempts:
            return False
        if sent and request.method not in IDEMPOTENT:
            return False
        if isinstance(error, UpstreamTimeout) and sent:
            return False  # a slow answer is not retried: that would double the load on a slow upstream
        if error is not None and not isinstance(error, UpstreamError | UpstreamTimeout):
            return False  # the client went away, the body was too large, ...: not the upstream's fault
        if not self.balancer.candidates(self.clock(), tried):
            return False  # every available target was tried: the last error stands
        if self.budget.try_retry():
            self.stats.retries += 1
            return True
        self.stats.retries_denied += 1
        return False

    def report_success(self, target: TargetState, seconds: float) -> None:
        """A try got a response head after `seconds` (passive health, latency scores)."""
        target.tried_ok()
        target.observe_latency(seconds, self.clock())
        latency = self.stats.latency  # Histogram.observe, inlined: once per try
        latency.counts[bisect_left(REQUEST_BUCKETS, seconds)] += 1
        latency.sum += seconds

    def report_failure(self, target: TargetState, error: Exception) -> None:
        """A try failed: connect error, reset, timeout, or a retryable status."""
        if not isinstance(error, UpstreamError | UpstreamTimeout):
            return  # the client's doing, not the target's
        error.where = (self.name, target.name)
        now = self.clock()
        passive = self.passive
        if passive is None:
            target.failures += 1
            return
        may_eject = self.balancer.any_available(now, besides=target)
        if target.tried_failed(passive.max_failures, passive.ejection, now, may_eject):
            log.warning(
                "upstream %s target %s is EJECTED for %gs (%d failures in a row, last: %s)",
                self.name,
                target.address,
                passive.ejection,
                passive.max_failures,
                error.message if isinstance(error, GatewayError) else error,
            )

    def response_headers(self, request: Request, target: TargetState) -> list[tuple[bytes, bytes]]:
        """Headers the upstream layer adds to the response: the sticky cookie when it changes."""
        sticky = self.sticky
        if sticky is None:
            return []
        value = self.sticky_ids.get(target.key)
        if value is None or cookie_value(request, sticky.cookie) == value:
            return []
        cookie = b"%s=%s; Path=/; HttpOnly; SameSite=Lax" % (self.sticky_cookie, value.encode())
        if sticky.ttl > 0:
            cookie += b"; Max-Age=%d" % int(sticky.ttl)
        return [(b"set-cookie", cookie)]

    def statistics(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "balance": self.config.balance,
            "targets": [t.statistics(now) for t in self.targets],
            "retries_denied_by_budget": self.budget.denied,
            "queue": self.targets[0].pool.queue.statistics() if self.targets else {},
        }
