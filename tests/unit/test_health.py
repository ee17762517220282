"""The health monitor's lifecycle across reloads, with a fake probe instead of sockets."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from bastion.config.schema import ActiveHealthCheck, Upstream
from bastion.upstream import health
from bastion.upstream.health import HealthMonitor
from bastion.upstream.pool import ConnectionPool, PoolLimits
from bastion.upstream.runtime import UpstreamRuntime
from bastion.upstream.targets import TargetState


def states(config: Upstream) -> list[TargetState]:
    limits = PoolLimits(10, 10, 60.0, 1.0)
    return [
        TargetState(f"app/{t.address}", t.address, ConnectionPool(t.address, limits), "app") for t in config.targets
    ]


class FakeProbe:
    """Answers from a dict (address -> ok) and counts calls per address."""

    def __init__(self) -> None:
        self.ok: dict[str, bool] = {}
        self.calls: dict[str, int] = {}

    async def __call__(self, target: TargetState, check: ActiveHealthCheck) -> tuple[bool, str]:
        address = str(target.address)
        self.calls[address] = self.calls.get(address, 0) + 1
        ok = self.ok.get(address, True)
        return ok, "status 200" if ok else "status 503"


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> FakeProbe:
    fake = FakeProbe()
    monkeypatch.setitem(health.PROBES, "http", fake)
    return fake


def upstreams(
    addresses: list[str], active: dict[str, Any] | None, pool: dict[str, TargetState]
) -> dict[str, UpstreamRuntime]:
    """An `app` upstream whose TargetStates are reused from `pool` (as the registry does)."""
    config = Upstream.model_validate(
        {"targets": [{"address": a} for a in addresses], "health_check": {"active": active} if active else {}}
    )
    built = []
    for fresh in states(config):
        built.append(pool.setdefault(fresh.key, fresh))
    return {"app": UpstreamRuntime("app", config, built)}


ACTIVE = {"interval": "20ms", "timeout": "50ms", "healthy": 2, "unhealthy": 2}


def test_checks_mark_down_and_up_and_log(probe: FakeProbe, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        pool: dict[str, TargetState] = {}
        monitor = HealthMonitor()
        monitor.sync(upstreams(["10.0.0.1:80", "10.0.0.2:80"], ACTIVE, pool))
        probe.ok["10.0.0.1:80"] = False
        await asyncio.sleep(0.1)
        assert not pool["app/10.0.0.1:80"].healthy
        assert pool["app/10.0.0.2:80"].healthy
        probe.ok["10.0.0.1:80"] = True
        await asyncio.sleep(0.1)
        assert pool["app/10.0.0.1:80"].healthy
        await monitor.close()

    with caplog.at_level(logging.WARNING, "bastion.health"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert any("10.0.0.1:80 is DOWN (2 checks failed: status 503)" in m for m in messages), messages
    assert any("10.0.0.1:80 is UP (2 checks passed)" in m for m in messages), messages


def test_a_reload_keeps_unchanged_checkers_and_their_verdicts(probe: FakeProbe) -> None:
    async def scenario() -> None:
        pool: dict[str, TargetState] = {}
        monitor = HealthMonitor()
        monitor.sync(upstreams(["10.0.0.1:80", "10.0.0.2:80"], ACTIVE, pool))
        probe.ok["10.0.0.2:80"] = False
        await asyncio.sleep(0.1)
        tasks = {key: task for key, (_, task) in monitor.tasks.items()}
        # Same settings, one target more: the old checkers go on, one new checker starts.
        monitor.sync(upstreams(["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], ACTIVE, pool))
        assert len(monitor.tasks) == 3
        assert all(monitor.tasks[key][1] is task for key, task in tasks.items())
        assert not pool["app/10.0.0.2:80"].healthy  # the verdict survived
        # A target leaves: its checker stops.
        monitor.sync(upstreams(["10.0.0.1:80", "10.0.0.2:80"], ACTIVE, pool))
        await asyncio.sleep(0)
        assert set(monitor.tasks) == {"app/10.0.0.1:80", "app/10.0.0.2:80"}
        # New settings: checkers restart (no doubles).
        monitor.sync(upstreams(["10.0.0.1:80", "10.0.0.2:80"], {**ACTIVE, "interval": "30ms"}, pool))
        assert len(monitor.tasks) == 2
        assert all(monitor.tasks[key][1] is not task for key, task in tasks.items())
        await asyncio.sleep(0)
        assert all(task.cancelled() for task in tasks.values())
        # Checks turned off: nothing runs, and the down target is trusted again.
        monitor.sync(upstreams(["10.0.0.1:80", "10.0.0.2:80"], None, pool))
        assert not monitor.tasks
        assert pool["app/10.0.0.2:80"].healthy
        await monitor.close()

    asyncio.run(scenario())


def test_workers_spread_checks_so_the_total_rate_stays(probe: FakeProbe) -> None:
    """Two workers, each checking every 2 x interval, offset by one interval."""

    async def scenario() -> None:
        monitors = [HealthMonitor(worker=i, workers=2) for i in range(2)]
        for monitor in monitors:
            monitor.sync(upstreams(["10.0.0.1:80"], {**ACTIVE, "interval": "50ms"}, {}))
        await asyncio.sleep(0.52)
        for monitor in monitors:
            await monitor.close()

    asyncio.run(scenario())
    assert 9 <= probe.calls["10.0.0.1:80"] <= 12  # one per 50 ms in total, not two
