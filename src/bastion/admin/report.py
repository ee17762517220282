"""What one gateway process reports about itself, and the sum of several processes' reports.

With `--workers N` every worker has its own connections, pools, health verdicts and
counters. The admin API asks each worker for its `process_report` and answers with
`merge_reports` of them, so every endpoint speaks for the whole gateway:

- counters and histograms are added up; so are gauges that count things (connections,
  in-flight requests, pool connections);
- a target is `up` only when every worker sends it traffic (a worker that ejected it, or
  whose health checks failed, makes it 0), `healthy` likewise; `ejected` when any worker
  ejected it; its EWMA is the mean over the workers that have a sample;
- config reloads happen in every worker at once: the counts shown are the highest of any
  worker, not the sum;
- a worker that did not answer is listed as such in `workers` and makes `ready` false.

Reports are plain JSON data: they cross a unix socket between workers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bastion import __version__
from bastion.observability.metrics import add_rows, merge_exports

if TYPE_CHECKING:
    from bastion.admin.view import GatewayView


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def process_report(gateway: GatewayView) -> dict[str, Any]:
    """This process's state and counters (plain JSON data)."""
    snapshot = gateway.running_snapshot
    connections: dict[str, int] = {}
    if snapshot is not None:
        connections = {listener.name: 0 for listener in snapshot.config.listeners}
    for conn in gateway.connections:
        name = conn.settings.name
        connections[name] = connections.get(name, 0) + 1
    upstreams: dict[str, Any] = {}
    if snapshot is not None:
        for name, upstream in snapshot.upstreams.items():
            stats = upstream.statistics()
            upstreams[name] = {
                "balance": stats["balance"],
                "targets": stats["targets"],
                "queue_waiting": stats["queue"].get("waiting", 0),
            }
    return {
        "worker": {
            "index": gateway.worker,
            "pid": os.getpid(),
            "started_at": gateway.started_at,
            "restarts": gateway.restarts,
            "rss_bytes": _rss_bytes(),
        },
        "workers_expected": gateway.workers,
        "launched_at": gateway.launched_at,
        "ready": gateway.is_ready(),
        "status": gateway.statistics(),
        "metrics": gateway.metrics.export(),
        "upstreams": upstreams,
        "connections": connections,
    }


def _merge_target(into: dict[str, Any] | None, target: dict[str, Any]) -> dict[str, Any]:
    if into is None:
        merged = {**target, "pool": dict(target["pool"]), "workers_up": 1 if target["up"] else 0, "workers": 1}
        merged["_ewma"] = [target["latency_ewma_ms"]] if target["latency_ewma_ms"] else []
        return merged
    into["workers"] += 1
    into["workers_up"] += 1 if target["up"] else 0
    into["up"] = into["up"] and target["up"]
    into["healthy"] = into["healthy"] and target["healthy"]
    into["health_reason"] = into["health_reason"] or target["health_reason"]
    into["ejected"] = into["ejected"] or target["ejected"]
    into["drained"] = into["drained"] or target["drained"]
    for key in ("ejections", "in_flight", "requests", "failures"):
        into[key] += target[key]
    for key, value in target["pool"].items():
        into["pool"][key] = into["pool"].get(key, 0) + value
    into["responses"] = add_rows(into["responses"], target["responses"])
    if target["latency_ewma_ms"]:
        into["_ewma"].append(target["latency_ewma_ms"])
    return into


def merge_upstreams(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every upstream's targets as the whole gateway sees them."""
    merged: dict[str, dict[str, Any]] = {}
    for report in reports:
        for name, upstream in report["upstreams"].items():
            entry = merged.setdefault(name, {"balance": upstream["balance"], "queue_waiting": 0, "_targets": {}})
            entry["queue_waiting"] += upstream["queue_waiting"]
            targets = entry["_targets"]
            for target in upstream["targets"]:
                targets[target["address"]] = _merge_target(targets.get(target["address"]), target)
    out: dict[str, Any] = {}
    for name, entry in merged.items():
        targets = []
        for target in entry.pop("_targets").values():
            samples = target.pop("_ewma")
            target["latency_ewma_ms"] = round(sum(samples) / len(samples), 3) if samples else 0.0
            targets.append(target)
        out[name] = {**entry, "targets": targets}
    return out


def merge_status(reports: Sequence[dict[str, Any]], expected: int) -> dict[str, Any]:
    """`GET /status`: version, config, uptime, workers, reloads, for the whole gateway."""
    now = time.time()
    by_index = {report["worker"]["index"]: report for report in reports}
    workers = []
    for index in range(max(expected, len(reports))):
        report = by_index.get(index)
        if report is None:
            workers.append({"index": index, "answered": False})
            continue
        worker = report["worker"]
        workers.append(
            {
                **worker,
                "answered": True,
                "ready": report["ready"],
                "uptime_seconds": round(now - worker["started_at"], 3),
                "connections": sum(report["connections"].values()),
                "requests": sum(
                    row[-1] for route in report["metrics"]["routes"].values() for row in route["responses"]
                ),
                "reloads": report["status"]["reloads"],
            }
        )
    configs: list[dict[str, Any]] = []
    for report in reports:
        config = report["status"]["config"]
        if config and not any(c.get("sha256") == config.get("sha256") for c in configs):
            configs.append(config)
    last_reloads = [r["status"]["last_reload"] for r in reports if r["status"].get("last_reload")]
    first = reports[0]["status"] if reports else {}
    launched = min((r["launched_at"] for r in reports), default=now)
    return {
        "version": __version__,
        "ready": bool(reports) and len(reports) >= expected and all(r["ready"] for r in reports),
        "config": configs[0] if configs else None,
        "configs": configs,
        "uptime_seconds": round(now - launched, 3),
        "started_at": launched,
        "workers_expected": expected,
        "workers": workers,
        "reloads": {
            result: max((r["status"]["reloads"][result] for r in reports), default=0)
            for result in ("applied", "rejected")
        },
        "last_reload": max(last_reloads, key=lambda r: r["at"]) if last_reloads else None,
        "store": first.get("store"),
        "tls": first.get("tls") or {},  # https listener bind -> its certificates (the same in every worker)
        "following": first.get("following", {}),
    }


def merge_reports(reports: Sequence[dict[str, Any]], expected: int) -> dict[str, Any]:
    """Several processes' reports as one gateway's (the input of /metrics, /status, /upstreams)."""
    connections: dict[str, int] = {}
    for report in reports:
        for listener, count in report["connections"].items():
            connections[listener] = connections.get(listener, 0) + count
    return {
        "status": merge_status(reports, expected),
        "metrics": merge_exports(report["metrics"] for report in reports),
        "upstreams": merge_upstreams(reports),
        "connections": connections,
    }
