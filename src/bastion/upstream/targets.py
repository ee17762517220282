"""Live state of one target: the pool, in-flight count, health, latency. Survives config reloads.

A `TargetState` is keyed by (upstream name, address) in the gateway's `TargetRegistry`, so
a reload that keeps a target keeps its connections, health and latency score.

Health has two independent sides. Active checks (upstream/health.py) move `healthy` after
`healthy`/`unhealthy` consecutive results. Passive ejection takes a target out until
`ejected_until` after consecutive failed tries. An operator can drain a target through the
admin API (`admin_drained`): it gets no new requests until enabled again, whatever its
health. A target is available when it is healthy, not ejected, not drained and has a
weight. A target that becomes available again (or joins a running gateway) ramps its weight
up over the upstream's `slow_start` window.

Every method takes `now` (time.monotonic seconds) from the caller, so unit tests drive time.
"""

from __future__ import annotations

import math
from typing import Any

from bastion.config.schema import Target, Upstream
from bastion.config.types import HostPort
from bastion.observability.metrics import Metrics
from bastion.upstream.h2_pool import H2Pool
from bastion.upstream.pool import ConnectionPool, PoolLimits, WaitQueue

EWMA_DECAY = 10.0
"""Seconds over which an old latency sample loses most of its weight (peak EWMA)."""

SLOW_START_FLOOR = 0.05
"""Share of its weight a ramping target gets at the very start of its window."""


class TargetState:
    __slots__ = (
        "key",
        "upstream",
        "address",
        "name",
        "host_header",
        "weight",
        "backup",
        "pool",
        "in_flight",
        "healthy",
        "health_reason",
        "checks_ok",
        "checks_failed",
        "ejected_until",
        "ejections",
        "failures_in_row",
        "requests",
        "failures",
        "ewma",
        "ewma_stamp",
        "ramp_start",
        "ramp_until",
        "slow_start",
        "joining",
        "admin_drained",
        "responses",
    )

    def __init__(self, key: str, address: HostPort, pool: ConnectionPool | H2Pool, upstream: str = "") -> None:
        self.key = key
        self.upstream = upstream
        self.address = address
        self.name = str(address)  # as written in the config: metrics labels, admin API paths
        self.host_header = str(address).encode()  # Host toward it when a route does not preserve the client's
        self.weight = 1  # as last activated; balancers keep their own per-snapshot copy
        self.backup = False
        self.pool = pool
        self.in_flight = 0
        self.healthy = True  # active checks' verdict; optimistic until the first checks say otherwise
        self.health_reason = ""
        self.checks_ok = 0
        self.checks_failed = 0
        self.ejected_until = 0.0
        self.ejections = 0
        self.failures_in_row = 0
        self.requests = 0
        self.failures = 0
        self.ewma = 0.0  # peak-EWMA response latency, seconds; 0 until the first sample
        self.ewma_stamp = 0.0
        self.ramp_start = 0.0
        self.ramp_until = 0.0
        self.slow_start = 0.0
        self.joining = False  # joined a running gateway: slow-start when its snapshot goes live
        self.admin_drained = False  # drained through the admin API: no new requests until enabled
        self.responses: dict[int, int] = {}  # status the client got -> requests whose last try came here

    def available(self, now: float) -> bool:
        """May the balancer send a request here now (ignoring weight, which is per snapshot)?"""
        return self.healthy and self.ejected_until <= now and not self.admin_drained

    # --- slow start ------------------------------------------------------------------------

    def ramp(self, now: float) -> float:
        """Share of its weight the target gets now: 1 outside a slow-start window."""
        if now >= self.ramp_until:
            return 1.0
        if now <= self.ramp_start:
            return SLOW_START_FLOOR
        return max(SLOW_START_FLOOR, (now - self.ramp_start) / (self.ramp_until - self.ramp_start))

    def start_ramp(self, at: float) -> None:
        """The target (re)enters rotation at `at`: ramp up over the slow-start window."""
        if self.slow_start > 0:
            self.ramp_start = at
            self.ramp_until = at + self.slow_start

    # --- latency ---------------------------------------------------------------------------

    def observe_latency(self, seconds: float, now: float) -> None:
        """Peak EWMA: a slower sample is taken at once, faster ones pull it down gradually."""
        if seconds >= self.ewma:
            self.ewma = seconds
        else:
            keep = math.exp(-max(0.0, now - self.ewma_stamp) / EWMA_DECAY)
            self.ewma = self.ewma * keep + seconds * (1.0 - keep)
        self.ewma_stamp = now

    def latency(self, now: float) -> float:
        """The EWMA decayed toward 0 while no sample came, so an idle slow target is tried again."""
        ewma = self.ewma
        if ewma == 0.0:
            return 0.0
        idle = now - self.ewma_stamp
        return ewma * math.exp(-idle / EWMA_DECAY) if idle > 1.0 else ewma

    # --- health ----------------------------------------------------------------------------

    def check_result(self, ok: bool, reason: str, rise: int, fall: int, now: float) -> bool | None:
        """Count an active check; returns the new `healthy` when it changed, else None."""
        if ok:
            self.checks_ok += 1
            self.checks_failed = 0
            if not self.healthy and self.checks_ok >= rise:
                self.healthy = True
                self.health_reason = ""
                self.failures_in_row = 0
                self.start_ramp(now)
                return True
        else:
            self.checks_failed += 1
            self.checks_ok = 0
            self.health_reason = reason
            if self.healthy and self.checks_failed >= fall:
                self.healthy = False
                return False
        return None

    def tried_ok(self) -> None:
        self.failures_in_row = 0

    def tried_failed(self, max_failures: int | None, ejection: float, now: float, may_eject: bool) -> bool:
        """Count a failed try; returns True when this failure ejects the target."""
        self.failures += 1
        self.failures_in_row += 1
        if max_failures is None or self.failures_in_row < max_failures or self.ejected_until > now:
            return False
        if not may_eject:
            return False
        self.failures_in_row = 0
        self.ejected_until = now + ejection
        self.ejections += 1
        self.start_ramp(self.ejected_until)
        return True

    def reset_health(self) -> None:
        """Active checks were turned off: trust the target again."""
        self.healthy = True
        self.health_reason = ""
        self.checks_ok = self.checks_failed = 0

    def statistics(self, now: float | None = None) -> dict[str, Any]:
        ejected = now is not None and self.ejected_until > now
        return {
            "address": self.name,
            "weight": self.weight,
            "backup": self.backup,
            "up": self.healthy and not ejected and not self.admin_drained,
            "healthy": self.healthy,
            "health_reason": self.health_reason,
            "ejected": ejected,
            "ejections": self.ejections,
            "drained": self.admin_drained,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "failures": self.failures,
            "responses": [[status, count] for status, count in self.responses.items()],
            "latency_ewma_ms": round(self.ewma * 1000, 3),
            "pool": self.pool.statistics(),
        }


def pool_limits(upstream: Upstream) -> PoolLimits:
    return PoolLimits(
        max_connections=upstream.max_connections,
        max_idle=upstream.max_idle_connections,
        idle_timeout=upstream.timeouts.idle,
        connect_timeout=upstream.timeouts.connect,
    )


class TargetRegistry:
    """Every live TargetState, across snapshots, and each upstream's shared wait queue.

    `claim` only finds or creates state; settings (weight, limits, slow start) are applied by
    `UpstreamRuntime.activate` when a snapshot goes live, so building a snapshot that is then
    rejected changes nothing the running one uses.
    """

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics if metrics is not None else Metrics()  # the process's counters
        self.targets: dict[str, TargetState] = {}
        self.queues: dict[str, WaitQueue] = {}
        self.running = False  # set once the first snapshot serves: later joins slow-start

    def claim(self, upstream_name: str, upstream: Upstream, target: Target) -> TargetState:
        """The state for this target, reused when a previous snapshot had it."""
        key = f"{upstream_name}/{target.address}"
        if upstream.protocol != "http1":
            key += f"/{upstream.protocol}"  # another protocol: other connections, a fresh state
        state = self.targets.get(key)
        if state is None:
            queue = self.queues.get(upstream_name)
            if queue is None:
                queue = self.queues[upstream_name] = WaitQueue(upstream.queue.size, upstream.queue.timeout)
            pool: ConnectionPool | H2Pool
            if upstream.protocol == "http1":
                pool = ConnectionPool(target.address, pool_limits(upstream), queue)
            else:
                pool = H2Pool(target.address, pool_limits(upstream), queue)
            state = TargetState(key, target.address, pool, upstream_name)
            self.targets[key] = state
            state.joining = self.running
        return state

    def retain_only(self, keys: set[str]) -> None:
        """Forget targets no snapshot uses any more, closing their idle connections."""
        for key in list(self.targets):
            if key not in keys:
                self.targets.pop(key).pool.close()
        upstreams = {state.upstream for state in self.targets.values()}
        for name in list(self.queues):
            if name not in upstreams:
                del self.queues[name]
