"""Every Prometheus metric the gateway exposes, rendered from a (merged) gateway report.

A scrape builds the metric families from plain data (the reports of every worker, added up
by `admin/report.py`) and lets prometheus_client write its text format, so the names, the
escaping and the histogram layout are prometheus_client's. Counting itself never touches
prometheus_client: see `observability/metrics.py`.

The names and labels are listed, with their types, in docs/admin.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from bastion.observability.metrics import REQUEST_BUCKETS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_BOUNDS = [*(repr(float(b)) for b in REQUEST_BUCKETS), "+Inf"]


def _buckets(histogram: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Per-bucket counts -> Prometheus' cumulative `le` buckets."""
    out = []
    total = 0
    for bound, count in zip(_BOUNDS, histogram["counts"], strict=True):
        total += count
        out.append((bound, float(total)))
    return out


def families(report: Mapping[str, Any]) -> Iterator[Metric]:
    """The metric families of a merged report (see `admin.report.merge_reports`)."""
    metrics = report["metrics"]

    routes = metrics["routes"]
    requests = CounterMetricFamily(
        "bastion_http_requests", "Requests answered, by route, method and status.", labels=["route", "method", "code"]
    )
    duration = HistogramMetricFamily(
        "bastion_http_request_duration_seconds",
        "Time from the request head's arrival to the end of the response, by route.",
        labels=["route"],
    )
    limited = CounterMetricFamily(
        "bastion_rate_limited", "Requests refused with 429 by the gateway (rate limits), by route.", labels=["route"]
    )
    refused = CounterMetricFamily(
        "bastion_auth_refused",
        "Requests refused with 401 or 403 by the gateway's plugins (authentication, acl, ip_filter), by route.",
        labels=["route", "code"],
    )
    grpc = CounterMetricFamily(
        "bastion_grpc_responses",
        "gRPC calls by route and the grpc-status the client got (the HTTP status of a gRPC call is 200).",
        labels=["route", "grpc_status"],
    )
    for route, stats in sorted(routes.items()):
        for code, count in sorted(stats.get("grpc", ())):
            grpc.add_metric([route, code], count)
        for method, status, count in sorted(stats["responses"]):
            requests.add_metric([route, method, str(status)], count)
        duration.add_metric([route], _buckets(stats["latency"]), stats["latency"]["sum"])
        for status, count in sorted(stats["refused"]):
            if status == 429:
                limited.add_metric([route], count)
            else:
                refused.add_metric([route, str(status)], count)
    yield from (requests, duration, limited, refused, grpc)

    upstream_duration = HistogramMetricFamily(
        "bastion_upstream_request_duration_seconds",
        "Time from sending a request to a target to its response head, per try, by upstream.",
        labels=["upstream"],
    )
    retries = CounterMetricFamily("bastion_upstream_retries", "Retries made, by upstream.", labels=["upstream"])
    denied = CounterMetricFamily(
        "bastion_upstream_retries_denied", "Retries the retry budget refused, by upstream.", labels=["upstream"]
    )
    for name, stats in sorted(metrics["upstreams"].items()):
        upstream_duration.add_metric([name], _buckets(stats["latency"]), stats["latency"]["sum"])
        retries.add_metric([name], stats["retries"])
        denied.add_metric([name], stats["retries_denied"])
    yield upstream_duration
    yield retries
    yield denied

    yield from _target_families(report["upstreams"])

    rejected = CounterMetricFamily(
        "bastion_http_rejected",
        "Requests refused before routing (malformed, 414, 431, ...), by listener and status.",
        labels=["listener", "code"],
    )
    for listener, code, count in sorted(report["metrics"].get("rejected", ())):
        rejected.add_metric([listener, code], count)
    yield rejected

    handshakes = CounterMetricFamily(
        "bastion_tls_handshakes",
        "TLS handshakes on https listeners, by result (completed, or failed: refused, timed out, cut).",
        labels=["listener", "result"],
    )
    for listener, result, count in sorted(report["metrics"].get("tls_handshakes", ())):
        handshakes.add_metric([listener, result], count)
    yield handshakes

    proxied = CounterMetricFamily(
        "bastion_proxy_protocol_connections",
        "Connections to listeners with proxy_protocol.accept, by result (accepted, untrusted, invalid, timeout).",
        labels=["listener", "result"],
    )
    for listener, result, count in sorted(report["metrics"].get("proxy_protocol", ())):
        proxied.add_metric([listener, result], count)
    yield proxied

    yield from _udp_families(report["metrics"].get("udp", {}))

    l4_connections = CounterMetricFamily(
        "bastion_l4_connections",
        "Ended connections of tcp and tls_passthrough listeners, by listener and result (the close reason).",
        labels=["listener", "result"],
    )
    for listener, result, count in sorted(report["metrics"].get("l4_connections", ())):
        l4_connections.add_metric([listener, result], count)
    yield l4_connections

    l4_bytes = CounterMetricFamily(
        "bastion_l4_bytes",
        "Bytes relayed by ended L4 connections, by listener and direction (in: client to target).",
        labels=["listener", "direction"],
    )
    for listener, direction, count in sorted(report["metrics"].get("l4_bytes", ())):
        l4_bytes.add_metric([listener, direction], count)
    yield l4_bytes

    active = GaugeMetricFamily(
        "bastion_connections_active", "Open client connections, by listener.", labels=["listener"]
    )
    for listener, count in sorted(report["connections"].items()):
        active.add_metric([listener], count)
    yield active

    yield from _process_families(report)


def _target_families(upstreams: Mapping[str, Any]) -> Iterator[Metric]:
    labels = ["upstream", "target"]
    up = GaugeMetricFamily(
        "bastion_upstream_target_up",
        "1 when the target takes new requests (healthy, not ejected, not drained) in every worker, else 0.",
        labels=labels,
    )
    healthy = GaugeMetricFamily(
        "bastion_upstream_target_healthy", "Active health checks' verdict: 1 healthy, 0 unhealthy.", labels=labels
    )
    drained = GaugeMetricFamily(
        "bastion_upstream_target_drained", "1 while drained through the admin API.", labels=labels
    )
    in_flight = GaugeMetricFamily(
        "bastion_upstream_target_in_flight", "Requests being served by the target now.", labels=labels
    )
    requests = CounterMetricFamily(
        "bastion_upstream_target_requests", "Tries sent to the target (retries included).", labels=labels
    )
    failures = CounterMetricFamily(
        "bastion_upstream_target_failures",
        "Failed tries: connect errors, resets, timeouts, retryable statuses.",
        labels=labels,
    )
    ejections = CounterMetricFamily(
        "bastion_upstream_target_ejections", "Times passive health checks ejected the target.", labels=labels
    )
    latency = GaugeMetricFamily(
        "bastion_upstream_target_latency_ewma_seconds",
        "Peak-EWMA response latency the balancers use (mean over workers with a sample).",
        labels=labels,
    )
    pool_open = GaugeMetricFamily(
        "bastion_upstream_connections_open", "Open connections to the target (idle included).", labels=labels
    )
    pool_idle = GaugeMetricFamily(
        "bastion_upstream_connections_idle", "Idle keep-alive connections to the target.", labels=labels
    )
    opened = CounterMetricFamily(
        "bastion_upstream_connections_opened", "Connections opened to the target.", labels=labels
    )
    responses = CounterMetricFamily(
        "bastion_upstream_target_responses",
        "Requests whose last try went to this target, by the status the client got.",
        labels=["upstream", "target", "code"],
    )
    waiting = GaugeMetricFamily(
        "bastion_upstream_queue_waiting", "Requests waiting for a connection slot, by upstream.", labels=["upstream"]
    )
    for name, upstream in sorted(upstreams.items()):
        waiting.add_metric([name], upstream["queue_waiting"])
        for target in upstream["targets"]:
            values = [name, target["address"]]
            up.add_metric(values, 1 if target["up"] else 0)
            healthy.add_metric(values, 1 if target["healthy"] else 0)
            drained.add_metric(values, 1 if target["drained"] else 0)
            in_flight.add_metric(values, target["in_flight"])
            requests.add_metric(values, target["requests"])
            failures.add_metric(values, target["failures"])
            ejections.add_metric(values, target["ejections"])
            latency.add_metric(values, target["latency_ewma_ms"] / 1000)
            pool_open.add_metric(values, target["pool"]["open"])
            pool_idle.add_metric(values, target["pool"]["idle"])
            opened.add_metric(values, target["pool"]["opened_total"])
            for status, count in sorted(target["responses"]):
                responses.add_metric([*values, str(status)], count)
    yield from (up, healthy, drained, in_flight, requests, failures, ejections, latency)
    yield from (pool_open, pool_idle, opened, waiting, responses)


def _process_families(report: Mapping[str, Any]) -> Iterator[Metric]:
    status = report["status"]
    reloads = CounterMetricFamily(
        "bastion_config_reloads", "Config reloads, by result (applied or rejected).", labels=["result"]
    )
    for result in ("applied", "rejected"):
        reloads.add_metric([result], status["reloads"][result])
    yield reloads

    info = InfoMetricFamily(
        "bastion_config", "The config running: its version (Redis pushes), source and digest.", labels=[]
    )
    for config in status["configs"]:
        version = config.get("version")
        info.add_metric(
            [],
            {
                "version": "" if version is None else str(version),
                "source": str(config.get("source", "")),
                "sha256": str(config.get("sha256", ""))[:12],
            },
        )
    yield info

    expiry = GaugeMetricFamily(
        "bastion_tls_certificate_not_after_seconds",
        "When each certificate of an https listener expires (Unix time).",
        labels=["bind", "cert"],
    )
    for bind, certificates in sorted(status.get("tls", {}).items()):
        for cert in certificates:
            expiry.add_metric([bind, cert["cert"]], datetime.fromisoformat(cert["not_after"]).timestamp())
    yield expiry

    build = InfoMetricFamily("bastion_build", "The Bastion version running.", labels=[])
    build.add_metric([], {"version": status["version"]})
    yield build

    workers = GaugeMetricFamily("bastion_workers", "Worker processes, by state.", labels=["state"])
    workers.add_metric(["expected"], status["workers_expected"])
    workers.add_metric(["answering"], sum(1 for w in status["workers"] if w.get("answered")))
    yield workers

    restarts = CounterMetricFamily(
        "bastion_worker_restarts", "Times a worker slot's process was replaced after dying.", labels=["worker"]
    )
    memory = GaugeMetricFamily(
        "bastion_worker_resident_memory_bytes", "Resident memory of each worker process.", labels=["worker"]
    )
    started = GaugeMetricFamily(
        "bastion_worker_start_time_seconds", "When each worker process started (Unix time).", labels=["worker"]
    )
    for worker in status["workers"]:
        if not worker.get("answered"):
            continue
        index = str(worker["index"])
        restarts.add_metric([index], worker["restarts"])
        memory.add_metric([index], worker["rss_bytes"])
        started.add_metric([index], worker["started_at"])
    yield from (restarts, memory, started)


class _ReportCollector:
    def __init__(self, report: Mapping[str, Any]) -> None:
        self.report = report

    def collect(self) -> Iterator[Metric]:
        return families(self.report)


def render(report: Mapping[str, Any]) -> bytes:
    """The Prometheus text exposition of a merged report."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ReportCollector(report))
    return generate_latest(registry)


def _udp_families(udp: dict[str, Any]) -> Iterator[Metric]:
    """udp listeners: datagrams and bytes per direction, sessions, drops by reason."""
    datagrams = CounterMetricFamily(
        "bastion_udp_datagrams", "Datagrams relayed by udp listeners, by direction.", labels=["listener", "direction"]
    )
    size = CounterMetricFamily(
        "bastion_udp_bytes", "Bytes relayed by udp listeners, by direction.", labels=["listener", "direction"]
    )
    sessions = CounterMetricFamily("bastion_udp_sessions", "Client sessions opened.", labels=["listener"])
    active = GaugeMetricFamily("bastion_udp_sessions_active", "Client sessions open now.", labels=["listener"])
    evicted = CounterMetricFamily(
        "bastion_udp_sessions_evicted", "Sessions ended at max_sessions to make room.", labels=["listener"]
    )
    dropped = CounterMetricFamily(
        "bastion_udp_dropped", "Datagrams not relayed, by reason.", labels=["listener", "reason"]
    )
    for listener, stats in sorted(udp.items()):
        for index, direction in enumerate(("upstream", "downstream")):
            datagrams.add_metric([listener, direction], stats["datagrams"][index])
            size.add_metric([listener, direction], stats["bytes"][index])
        sessions.add_metric([listener], stats["sessions"])
        active.add_metric([listener], stats["sessions_active"])
        evicted.add_metric([listener], stats["evicted"])
        for reason, count in sorted(stats["dropped"]):
            dropped.add_metric([listener, reason], count)
    yield from (datagrams, size, sessions, active, evicted, dropped)
