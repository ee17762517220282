"""Health end to end: active checks, passive ejection, backups, 503 when nothing is healthy."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from lb_support import Load, lb_config, origin_of, set_health, tally, wait_for

from bastion.demo.origin import OriginHandle
from support import GatewayThread, free_port, request

FAST_CHECKS = {"type": "http", "path": "/healthz", "interval": "50ms", "timeout": "200ms", "healthy": 1, "unhealthy": 1}


def test_active_checks_take_a_target_out_and_back(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = origins("a"), origins("b")
    checks = {**FAST_CHECKS, "healthy": 2, "unhealthy": 2}
    gw = gateway(lb_config([{"address": a.address}, {"address": b.address}], health_check={"active": checks}))
    assert tally(gw.port, 10) == {"a": 5, "b": 5}
    with caplog.at_level(logging.WARNING, "bastion.health"):
        set_health(a, 503)
        wait_for(lambda: tally(gw.port, 4) == {"b": 4})
        set_health(a, 200)
        wait_for(lambda: tally(gw.port, 4) == {"a": 2, "b": 2})
    text = caplog.text
    assert f"target {a.address} is DOWN (2 checks failed: status 503)" in text
    assert f"target {a.address} is UP (2 checks passed)" in text


def test_backup_takes_over_and_hands_back(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread]
) -> None:
    primary, backup = origins("primary"), origins("backup")
    targets = [{"address": primary.address}, {"address": backup.address, "backup": True}]
    gw = gateway(lb_config(targets, health_check={"active": FAST_CHECKS}))
    assert tally(gw.port, 10) == {"primary": 10}  # a healthy primary: the backup idles
    set_health(primary, 500)
    wait_for(lambda: tally(gw.port, 3) == {"backup": 3})
    set_health(primary, 200)
    wait_for(lambda: tally(gw.port, 3) == {"primary": 3})


def test_no_healthy_target_is_a_503_json(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread]
) -> None:
    a = origins("a")
    gw = gateway(lb_config([{"address": a.address}], health_check={"active": FAST_CHECKS}))
    set_health(a, 503)
    wait_for(lambda: origin_of(gw.port)[0] == 503)
    reply = request(gw.port, "GET", "/x")
    assert reply.status == 503
    body = reply.json()
    assert body["error"] == "no_healthy_target"
    assert body["request_id"] == reply.header("X-Request-Id")


def test_tcp_checks_and_expected_statuses(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread]
) -> None:
    a, b = origins("a"), origins("b")
    dead = f"127.0.0.1:{free_port()}"
    tcp = gateway(
        lb_config(
            [{"address": dead}, {"address": a.address}],
            health_check={"active": {**FAST_CHECKS, "type": "tcp"}},
        )
    )
    wait_for(lambda: tally(tcp.port, 4) == {"a": 4})
    # /healthz answers 418 on b; 418 is listed as healthy, so b stays in.
    set_health(b, 418)
    statuses = gateway(
        lb_config(
            [{"address": a.address}, {"address": b.address}],
            health_check={"active": {**FAST_CHECKS, "statuses": [200, 418]}},
        )
    )
    wait_for(lambda: statuses.gateway.snapshot.upstreams["app"].targets[1].checks_ok >= 2)
    assert tally(statuses.port, 4) == {"a": 2, "b": 2}


def test_a_target_killed_under_load_costs_no_failed_request(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = origins("a"), origins("b")
    config = lb_config(
        [{"address": a.address}, {"address": b.address}],
        health_check={"passive": {"max_failures": 2, "ejection": "30s"}},
        retries={"attempts": 2},
    )
    gw = gateway(config)
    # Requests take 5 ms at the origin, so several are in flight on b when it dies.
    with caplog.at_level(logging.WARNING, "bastion.upstream"), Load(gw.port, clients=6, path="/delay/5") as load:
        load.wait_requests(200)
        b.stop()  # in-flight requests cut, then connections refused
        load.wait_requests(400)
    print(f"killed b under load: {load.count} requests, {len(load.failures)} failed, by origin {dict(load.seen)}")
    assert not load.failures, load.failures[:5]
    assert f"target {b.address} is EJECTED" in caplog.text
    assert tally(gw.port, 5) == {"a": 5}


def test_post_is_not_retried_after_it_was_sent(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread]
) -> None:
    a, b = origins("a"), origins("b")
    gw = gateway(lb_config([{"address": a.address}, {"address": b.address}], retries={"attempts": 3}))

    def answered() -> int:
        return a.call(lambda: a.origin.requests) + b.call(lambda: b.origin.requests)

    assert request(gw.port, "POST", "/reset", body=b"x").status == 502
    assert answered() == 1  # it may have been applied: never sent twice
    assert request(gw.port, "GET", "/reset").status == 502
    assert answered() == 3  # retried on the other target, then nowhere else to go


def test_retry_on_a_configured_status_goes_to_another_target(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread]
) -> None:
    a, b = origins("a"), origins("b")
    set_health(a, 503)  # a's /healthz answers 503, b's 200
    targets = [{"address": a.address}, {"address": b.address}]
    retrying = gateway(lb_config(targets, retries={"attempts": 1, "on_statuses": [503]}))
    assert {origin_of(retrying.port, "/healthz") for _ in range(6)} == {(200, "b")}
    plain = gateway(lb_config(targets))
    assert {origin_of(plain.port, "/healthz") for _ in range(6)} == {(200, "b"), (503, "a")}
