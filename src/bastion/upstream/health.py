"""Active health checks: one probe task per target whose upstream configures `active`.

The gateway owns one `HealthMonitor` for its lifetime. `sync(snapshot)` runs whenever a
snapshot goes live: it keeps the task of a target whose check settings did not change (its
rhythm and counters go on), restarts the task of one whose settings changed, starts tasks
for new targets and stops those of targets that left. So a reload never doubles or leaks
checkers, and a target's health survives it.

A probe is an HTTP GET (the status must be in `statuses`; over TLS, verified as requests
are, when the upstream has `tls`), a bare TCP connect, or a gRPC Health/Check call over
HTTP/2 (upstream/grpc_health.py), each bounded by `timeout`. Results
move `TargetState.healthy` after `healthy`/`unhealthy` consecutive results; every change is
logged.

With N worker processes every worker probes on its own, each every `interval x N`, with
worker i offset by `i x interval`: together they probe a target once per `interval`, and each
worker sees a failure within `unhealthy x interval x N` (passive ejection reacts at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from bastion.config.schema import ActiveHealthCheck
from bastion.upstream.grpc_health import probe_grpc
from bastion.upstream.h2_pool import H2Pool
from bastion.upstream.h2_probe import probe_http2
from bastion.upstream.targets import TargetState

if TYPE_CHECKING:
    from bastion.upstream.runtime import UpstreamRuntime

log = logging.getLogger("bastion.health")

_MAX_STATUS_LINE = 8192


async def probe_http(target: TargetState, check: ActiveHealthCheck) -> tuple[bool, str]:
    """GET the check path over a fresh connection; healthy when the status is expected."""
    if isinstance(target.pool, H2Pool):
        return await probe_http2(target, check)  # the target speaks HTTP/2 only
    host, port = target.address
    tls = target.pool.tls
    if tls is None:
        reader, writer = await asyncio.open_connection(host, port)
    else:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls.context, server_hostname=tls.server_hostname(host)
        )
    try:
        host_header = check.host or str(target.address)
        writer.write(
            f"GET {check.path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: bastion-health-check\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n".encode("latin-1")
        )
        await writer.drain()
        line = await reader.readuntil(b"\r\n")
    except asyncio.IncompleteReadError:
        return False, "closed without answering"
    except asyncio.LimitOverrunError:
        return False, "not an HTTP response"
    finally:
        writer.close()
    parts = line[:_MAX_STATUS_LINE].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return False, "not an HTTP response"
    status = int(parts[1])
    if status in check.statuses:
        return True, f"status {status}"
    return False, f"status {status}"


async def probe_tcp(target: TargetState, check: ActiveHealthCheck) -> tuple[bool, str]:
    """Healthy when a TCP connection opens."""
    host, port = target.address
    _, writer = await asyncio.open_connection(host, port)
    writer.close()
    return True, "connected"


PROBES = {"http": probe_http, "tcp": probe_tcp, "grpc": probe_grpc}


async def probe(target: TargetState, check: ActiveHealthCheck) -> tuple[bool, str]:
    """One check, bounded by its timeout; (ok, reason) and never an exception."""
    try:
        async with asyncio.timeout(check.timeout):
            return await PROBES[check.type](target, check)
    except TimeoutError:
        return False, f"no answer within {check.timeout:g}s"
    except OSError as exc:
        return False, exc.strerror or str(exc) or type(exc).__name__


def log_change(target: TargetState, healthy: bool, why: str) -> None:
    state = "UP" if healthy else "DOWN"
    log.warning("upstream %s target %s is %s (%s)", target.upstream, target.address, state, why)


class HealthMonitor:
    """The gateway's active checkers, keyed by target; see the module docstring."""

    def __init__(self, worker: int = 0, workers: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.worker = worker
        self.workers = max(1, workers)
        self.clock = clock
        self.tasks: dict[str, tuple[ActiveHealthCheck, asyncio.Task[None]]] = {}

    def sync(self, upstreams: dict[str, UpstreamRuntime]) -> None:
        """Make the running checkers match these upstreams' targets and settings."""
        wanted: dict[str, tuple[TargetState, ActiveHealthCheck]] = {}
        for upstream in upstreams.values():
            check = upstream.config.health_check.active
            for target in upstream.targets:
                if check is not None:
                    wanted[target.key] = (target, check)
                elif not target.healthy or target.checks_ok or target.checks_failed:
                    if not target.healthy:
                        log_change(target, True, "active checks turned off")
                    target.reset_health()
        for key in list(self.tasks):
            check, task = self.tasks[key]
            if key not in wanted or wanted[key][1] != check:
                task.cancel()
                del self.tasks[key]
        loop = asyncio.get_running_loop()
        for key, (target, check) in wanted.items():
            if key not in self.tasks:
                task = loop.create_task(self._run(target, check), name=f"health-check {key}")
                self.tasks[key] = (check, task)

    async def _run(self, target: TargetState, check: ActiveHealthCheck) -> None:
        period = check.interval * self.workers
        await asyncio.sleep(check.interval * self.worker)
        while True:
            ok, reason = await probe(target, check)
            changed = target.check_result(ok, reason, check.healthy, check.unhealthy, self.clock())
            if changed is not None:
                why = f"{check.healthy} checks passed" if changed else f"{check.unhealthy} checks failed: {reason}"
                log_change(target, changed, why)
            await asyncio.sleep(period)

    async def close(self) -> None:
        """Stop every checker (safe to call twice)."""
        tasks = [task for _, task in self.tasks.values()]
        self.tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
