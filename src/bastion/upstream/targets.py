"""Live state of one target: the pool, in-flight count, health. Survives config reloads.

A `TargetState` is keyed by (upstream name, address) in the gateway's `TargetRegistry`, so
a reload that keeps a target keeps its connections and health.
"""

from __future__ import annotations

from typing import Any

from bastion.config.schema import Target, Upstream
from bastion.config.types import HostPort
from bastion.upstream.pool import ConnectionPool, PoolLimits


class TargetState:
    __slots__ = ("key", "address", "weight", "backup", "pool", "in_flight", "healthy", "requests", "failures")

    def __init__(self, key: str, address: HostPort, pool: ConnectionPool) -> None:
        self.key = key
        self.address = address
        self.weight = 1
        self.backup = False
        self.pool = pool
        self.in_flight = 0
        self.healthy = True
        self.requests = 0
        self.failures = 0

    def available(self) -> bool:
        """May the balancer send a request here now?"""
        return self.healthy and self.weight > 0

    def statistics(self) -> dict[str, Any]:
        return {
            "address": str(self.address),
            "weight": self.weight,
            "backup": self.backup,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "failures": self.failures,
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
    """Every live TargetState, across snapshots."""

    def __init__(self) -> None:
        self.targets: dict[str, TargetState] = {}

    def claim(self, upstream_name: str, upstream: Upstream, target: Target) -> TargetState:
        """The state for this target, reused when a previous snapshot had it."""
        key = f"{upstream_name}/{target.address}"
        limits = pool_limits(upstream)
        state = self.targets.get(key)
        if state is None:
            state = TargetState(key, target.address, ConnectionPool(target.address, limits))
            self.targets[key] = state
        else:
            state.pool.limits = limits  # read at use time: new limits apply at once
        state.weight = target.weight
        state.backup = target.backup
        return state

    def retain_only(self, keys: set[str]) -> None:
        """Forget targets no snapshot uses any more, closing their idle connections."""
        for key in list(self.targets):
            if key not in keys:
                self.targets.pop(key).pool.close()
