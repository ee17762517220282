"""Metrics without sockets: what one finished request adds, how workers add up, the text format.

The exposition is read back with prometheus_client's own parser, as Prometheus would read it.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bastion.admin.report import merge_reports, merge_status, merge_upstreams
from bastion.errors import NotFound, UpstreamConnectError, UpstreamTimeout
from bastion.observability.exposition import render
from bastion.observability.metrics import (
    RECENT_ERRORS,
    REQUEST_BUCKETS,
    UNMATCHED,
    Histogram,
    Metrics,
    merge_exports,
)


def target_ns(upstream: str = "app", name: str = "10.0.0.1:80") -> SimpleNamespace:
    """The fields of a TargetState that `observe` reads."""
    return SimpleNamespace(upstream=upstream, name=name, responses={})


TARGET = target_ns()


def exchange(
    metrics: Metrics,
    route: str | None = "users",
    status: int = 200,
    method: str = "GET",
    target: Any = TARGET,
    age: float = 0.0,
    path: str = "/users/7",
    request_id: str = "req-1",
    error: Any = None,
) -> Any:
    """Just the fields `Metrics.observe` reads from an Exchange (the route's stats as a
    snapshot built on `metrics` would hand them out)."""
    return SimpleNamespace(
        route=SimpleNamespace(name=route, stats=metrics.route(route)) if route is not None else None,
        status=status,
        request=SimpleNamespace(method=method, host="api.example.com", path=path, request_id=request_id),
        target=target,
        started=time.monotonic() - age,
        _error=error,
    )


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition, parsed by prometheus_client."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def target_stats(address: str, **extra: Any) -> dict[str, Any]:
    stats = {
        "address": address,
        "weight": 1,
        "backup": False,
        "up": True,
        "healthy": True,
        "health_reason": "",
        "ejected": False,
        "ejections": 0,
        "drained": False,
        "in_flight": 0,
        "requests": 0,
        "failures": 0,
        "responses": [],
        "latency_ewma_ms": 0.0,
        "pool": {"open": 0, "idle": 0, "waiting": 0, "opened_total": 0},
    }
    stats.update(extra)
    return stats


def report(index: int, metrics: Metrics, targets: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    status = {
        "config": {"source": "file gw.yaml", "version": None, "sha256": "ab" * 32},
        "reloads": {"applied": 0, "rejected": 0},
        "last_reload": None,
        "store": {"name": "local"},
        "following": {},
    }
    status.update(extra.pop("status", {}))
    return {
        "worker": {"index": index, "pid": 100 + index, "started_at": 1000.0, "restarts": 0, "rss_bytes": 1 << 20},
        "workers_expected": 2,
        "launched_at": 1000.0,
        "ready": True,
        "status": status,
        "metrics": metrics.export(),
        "upstreams": {"app": {"balance": "round_robin", "targets": targets, "queue_waiting": 0}},
        "connections": {"web": 2},
        **extra,
    }


def test_a_request_is_counted_once_with_its_route_method_status_and_target() -> None:
    metrics = Metrics()
    target = target_ns()
    metrics.observe(exchange(metrics, target=target, age=0.003))
    metrics.observe(exchange(metrics, target=target, status=502))
    stats = metrics.routes["users"]
    assert stats.responses == {"GET": {200: 1, 502: 1}}
    assert target.responses == {200: 1, 502: 1}
    assert sum(stats.latency.counts) == 2
    assert stats.latency.counts[REQUEST_BUCKETS.index(0.005)] == 1  # 3 ms falls in le=0.005
    assert 0.003 <= stats.latency.sum < 0.1
    assert stats.refused == {}


def test_requests_without_a_route_and_unknown_methods_do_not_mint_labels() -> None:
    metrics = Metrics()
    metrics.observe(exchange(metrics, route=None, status=404, method="BREW", target=None))
    metrics.observe(exchange(metrics, route=None, status=404, method="PROPFIND", target=None))
    assert metrics.routes[UNMATCHED].responses == {"OTHER": {404: 2}}
    assert list(metrics.export()["routes"]) == [UNMATCHED]  # a route without requests exports nothing


def test_refusals_made_by_the_gateway_are_counted_apart_from_upstream_answers() -> None:
    metrics = Metrics()
    for status in (429, 401, 403):
        metrics.observe(exchange(metrics, status=status, target=None))
    metrics.observe(exchange(metrics, status=429, target=target_ns()))  # the upstream's own
    assert metrics.routes["users"].refused == {429: 1, 401: 1, 403: 1}


def test_server_errors_are_kept_for_the_dashboard_and_4xx_are_not() -> None:
    metrics = Metrics()
    metrics.observe(exchange(metrics, status=200))
    metrics.observe(exchange(metrics, status=404, route=None, target=None, error=NotFound()))
    metrics.observe(exchange(metrics, status=429, target=None))
    assert list(metrics.recent_errors) == [] and metrics.errors_seen == 0

    metrics.observe(exchange(metrics, status=502, error=UpstreamConnectError(), request_id="r-502", age=0.25))
    metrics.observe(exchange(metrics, status=500, request_id="r-500"))  # the upstream's own 500
    metrics.observe(exchange(metrics, status=503, target=None, request_id="r-plugin"))  # a plugin's reply
    metrics.observe(exchange(metrics, status=200, error=UpstreamTimeout(), request_id="r-cut"))  # cut mid-body
    kept = {e["request_id"]: e for e in metrics.recent_errors}
    assert list(kept) == ["r-502", "r-500", "r-plugin", "r-cut"]
    first = kept["r-502"]
    assert (first["status"], first["error"], first["source"]) == (502, "upstream_connect_failed", "gateway")
    assert first["message"] == UpstreamConnectError.message
    assert (first["route"], first["method"], first["path"]) == ("users", "GET", "/users/7")
    assert first["host"] == "api.example.com"
    assert (first["upstream"], first["target"]) == ("app", "10.0.0.1:80")
    assert 250 <= first["duration_ms"] < 10_000 and first["at"] > 0
    assert (kept["r-500"]["source"], kept["r-500"]["error"]) == ("upstream", None)
    assert (kept["r-plugin"]["source"], kept["r-plugin"]["target"]) == ("plugin", None)
    assert (kept["r-cut"]["status"], kept["r-cut"]["error"]) == (200, "upstream_timeout")

    refused = UpstreamConnectError()  # no connection was had, so the exchange has no target:
    refused.where = ("app", "10.0.0.9:80")  # the upstream layer says where the try failed
    metrics.observe(exchange(metrics, status=502, target=None, error=refused, request_id="r-refused"))
    last = metrics.recent_errors[-1]
    assert (last["request_id"], last["upstream"], last["target"]) == ("r-refused", "app", "10.0.0.9:80")


def test_the_recent_errors_ring_is_bounded() -> None:
    metrics = Metrics()
    for index in range(RECENT_ERRORS + 20):
        metrics.observe(exchange(metrics, status=502, request_id=f"r{index}", path="/" + "x" * 1000))
    assert len(metrics.recent_errors) == RECENT_ERRORS
    assert metrics.recent_errors[0]["request_id"] == "r20"
    assert metrics.errors_seen == RECENT_ERRORS + 20
    assert len(metrics.recent_errors[-1]["path"]) == 256


def test_histogram_buckets_include_their_upper_bound() -> None:
    histogram = Histogram()
    for value in (0.001, 0.0010001, 60.0, 61.0):
        histogram.observe(value)
    assert histogram.counts[0] == 1  # le=0.001 holds exactly 0.001
    assert histogram.counts[1] == 1
    assert histogram.counts[len(REQUEST_BUCKETS) - 1] == 1  # le=60
    assert histogram.counts[-1] == 1  # +Inf


def test_exports_of_several_workers_add_up() -> None:
    one, two = Metrics(), Metrics()
    for _ in range(3):
        one.observe(exchange(one))
    for _ in range(4):
        two.observe(exchange(two))
    two.observe(exchange(two, route="orders", status=404, target=None))
    one.upstream("app").latency.observe(0.02)
    one.upstream("app").retries = 2
    two.upstream("app").latency.observe(0.04)
    two.upstream("app").retries_denied = 1
    merged = merge_exports([one.export(), two.export()])
    assert merged["routes"]["users"]["responses"] == [["GET", 200, 7]]
    assert merged["routes"]["orders"]["responses"] == [["GET", 404, 1]]
    assert sum(merged["routes"]["users"]["latency"]["counts"]) == 7
    latency = merged["upstreams"]["app"]["latency"]
    assert sum(latency["counts"]) == 2 and latency["sum"] == pytest.approx(0.06)
    assert merged["upstreams"]["app"]["retries"] == 2 and merged["upstreams"]["app"]["retries_denied"] == 1


def test_targets_merge_conservatively() -> None:
    """Up only where every worker sends it traffic; counts added; EWMA the mean of real samples."""
    a = [
        target_stats(
            "10.0.0.1:80",
            in_flight=2,
            requests=5,
            latency_ewma_ms=2.0,
            pool={"open": 2, "idle": 1},
            responses=[[200, 4], [502, 1]],
        ),
        target_stats("10.0.0.2:80", requests=1),
    ]
    b = [
        target_stats(
            "10.0.0.1:80",
            in_flight=1,
            requests=3,
            latency_ewma_ms=4.0,
            pool={"open": 1, "idle": 0},
            responses=[[200, 3]],
        ),
        target_stats("10.0.0.2:80", up=False, ejected=True, ejections=1, requests=2),
    ]
    merged = merge_upstreams([report(0, Metrics(), a), report(1, Metrics(), b)])["app"]
    first, second = merged["targets"]
    assert (first["up"], first["in_flight"], first["requests"], first["latency_ewma_ms"]) == (True, 3, 8, 3.0)
    assert first["pool"] == {"open": 3, "idle": 1}
    assert sorted(first["responses"]) == [[200, 7], [502, 1]]
    assert (second["up"], second["ejected"], second["ejections"], second["workers_up"]) == (False, True, 1, 1)
    assert second["latency_ewma_ms"] == 0.0  # no worker has a sample


def test_status_lists_a_silent_worker_and_is_then_not_ready() -> None:
    reports = [report(0, Metrics(), [], status={"reloads": {"applied": 2, "rejected": 1}})]
    status = merge_status(reports, expected=2)
    assert status["ready"] is False
    assert [w["answered"] for w in status["workers"]] == [True, False]
    assert status["reloads"] == {"applied": 2, "rejected": 1}
    reports.append(report(1, Metrics(), [], status={"reloads": {"applied": 2, "rejected": 1}}))
    status = merge_status(reports, expected=2)
    assert status["ready"] is True
    assert status["reloads"] == {"applied": 2, "rejected": 1}  # every worker reloads: not summed


def test_the_exposition_has_the_contract_names_and_parses() -> None:
    one, two = Metrics(), Metrics()
    one.observe(exchange(one))
    two.observe(exchange(two))
    two.observe(exchange(two, status=429, target=None))
    two.upstream("app").latency.observe(0.01)
    targets = [target_stats("10.0.0.1:80", in_flight=1, responses=[[200, 2]])]
    down = [target_stats("10.0.0.1:80", up=False, healthy=False)]
    merged = merge_reports([report(0, one, targets), report(1, two, down)], expected=2)
    parsed = samples(render(merged))
    route = (("code", "200"), ("method", "GET"), ("route", "users"))
    assert parsed[("bastion_http_requests_total", route)] == 2
    assert parsed[("bastion_http_request_duration_seconds_count", (("route", "users"),))] == 3
    assert parsed[("bastion_http_request_duration_seconds_bucket", (("le", "+Inf"), ("route", "users")))] == 3
    assert parsed[("bastion_upstream_request_duration_seconds_count", (("upstream", "app"),))] == 1
    assert parsed[("bastion_rate_limited_total", (("route", "users"),))] == 1
    target = (("target", "10.0.0.1:80"), ("upstream", "app"))
    assert parsed[("bastion_upstream_target_up", target)] == 0  # down in one worker
    assert parsed[("bastion_upstream_target_in_flight", target)] == 1
    assert parsed[("bastion_upstream_target_responses_total", (("code", "200"), *target))] == 2
    assert parsed[("bastion_connections_active", (("listener", "web"),))] == 4
    assert parsed[("bastion_config_reloads_total", (("result", "applied"),))] == 0
    info = (("sha256", "ab" * 6), ("source", "file gw.yaml"), ("version", ""))
    assert parsed[("bastion_config_info", info)] == 1
    assert parsed[("bastion_workers", (("state", "answering"),))] == 2
