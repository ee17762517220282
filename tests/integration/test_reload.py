"""Reload without loss: under load, mid-request, on keep-alive connections, with a broken file."""

from __future__ import annotations

import http.client
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lb_support import Load, lb_config, set_health, tally, wait_for

from bastion.demo.origin import OriginHandle
from support import GatewayProcess, GatewayThread, free_port, request, write_config

CHECKS = {"path": "/healthz", "interval": "50ms", "timeout": "200ms", "healthy": 1, "unhealthy": 1}


def rewrite(gw: GatewayThread, config: dict[str, Any]) -> None:
    config["listeners"][0]["bind"] = f"127.0.0.1:{gw.port}"
    write_config(gw.config_path, config)


def test_reloads_under_load_lose_no_request(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread]
) -> None:
    a, b, c = origins("a"), origins("b"), origins("c")
    config = lb_config([{"address": a.address}, {"address": b.address}])
    gw = gateway(config)
    variants: list[dict[str, Any]] = [
        {"targets": [{"address": a.address}, {"address": b.address}, {"address": c.address}]},
        {"targets": [{"address": a.address, "weight": 5}, {"address": c.address}], "balance": "least_connections"},
        {"targets": [{"address": c.address}], "balance": "p2c_ewma"},
        {"targets": [{"address": b.address}, {"address": c.address}], "balance": "random"},
    ]
    with Load(gw.port, clients=4, path="/delay/2") as load:
        for variant in variants:
            load.wait_requests(60)
            config["upstreams"]["app"] = variant
            rewrite(gw, config)
            assert gw.reload()
        load.wait_requests(60)
    print(f"{len(variants)} reloads under load: {load.count} requests, {len(load.failures)} failed")
    assert not load.failures, load.failures[:5]
    assert set(tally(gw.port, 10)) == {"b", "c"}


def test_a_request_in_flight_and_a_keep_alive_connection_survive_a_reload(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread]
) -> None:
    a, b = origins("a"), origins("b")
    config = lb_config([{"address": a.address}])
    gw = gateway(config)
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    assert request(gw.port, path="/", conn=conn).json()["origin"] == "a"
    slow: list[int] = []
    thread = threading.Thread(target=lambda: slow.append(request(gw.port, path="/delay/400").status))
    thread.start()
    target = gw.gateway.snapshot.upstreams["app"].targets[0]
    wait_for(lambda: target.in_flight == 1)  # the slow request is at a
    config["upstreams"]["app"]["targets"] = [{"address": b.address}]
    rewrite(gw, config)
    assert gw.reload()
    # The same client connection, the new config: b now.
    assert request(gw.port, path="/", conn=conn).json()["origin"] == "b"
    thread.join(5)
    assert slow == [200]  # finished on the old snapshot's target
    conn.close()


def test_a_broken_config_is_rejected_and_the_old_one_keeps_serving(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread], caplog: pytest.LogCaptureFixture
) -> None:
    a = origins("a")
    config = lb_config([{"address": a.address}])
    gw = gateway(config)
    with caplog.at_level(logging.ERROR, "bastion"):
        config["upstreams"]["app"]["targets"] = [{"address": "not-an-address"}]
        rewrite(gw, config)
        assert not gw.reload()
        gw.config_path.write_text("version: 1\nlisteners: [unclosed\n")
        assert not gw.reload()
    assert "reload rejected, the running config stays" in caplog.text
    assert "upstreams.app.targets[0].address: not host:port" in caplog.text
    assert tally(gw.port, 3) == {"a": 3}


def test_live_target_state_survives_a_reload(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread]
) -> None:
    a, b = origins("a"), origins("b")
    config = lb_config([{"address": a.address}, {"address": b.address}], health_check={"active": CHECKS})
    gw = gateway(config)
    set_health(b, 503)
    wait_for(lambda: tally(gw.port, 2) == {"a": 2})
    state = {t.key: t for t in gw.gateway.snapshot.upstreams["app"].targets}
    connections = a.call(lambda: a.origin.connections)
    config["upstreams"]["app"]["targets"][0]["weight"] = 2  # a changed setting, same targets
    rewrite(gw, config)
    assert gw.reload()
    after = {t.key: t for t in gw.gateway.snapshot.upstreams["app"].targets}
    assert all(after[key] is state[key] for key in state)  # the same live objects
    assert tally(gw.port, 6) == {"a": 6}  # b is still down: health was not reset
    assert a.call(lambda: a.origin.connections) == connections  # pooled connections reused
    assert len(gw.gateway.health.tasks) == 2  # checkers kept, not doubled


def test_sighup_and_a_changed_file_reload_the_running_process(
    origins: Callable[..., OriginHandle], tmp_path: Path
) -> None:
    a, b = origins("a"), origins("b")
    port = free_port()
    path = tmp_path / "gw.yaml"
    config = lb_config([{"address": a.address}], port=port)
    write_config(path, config)
    proc = GatewayProcess(path, port)
    try:
        assert tally(port, 2) == {"a": 2}
        # A changed file is noticed by the watcher (polls every second).
        config["upstreams"]["app"]["targets"] = [{"address": b.address}]
        write_config(path, config)
        wait_for(lambda: tally(port, 1) == {"b": 1}, timeout=5)
        # A broken file is rejected: b keeps serving.
        path.write_text(path.read_text().replace("version: 1", "version: 1\nbogus_key: 1"))
        proc.signal(signal.SIGHUP)
        wait_for(lambda: "reload rejected" in proc.output()[1], timeout=5)
        config["upstreams"]["app"]["targets"] = [{"address": a.address}]
        assert tally(port, 3) == {"b": 3}
        # SIGHUP after a fix: a again.
        write_config(path, config)
        proc.signal(signal.SIGHUP)
        wait_for(lambda: tally(port, 1) == {"a": 1}, timeout=5)
    finally:
        code, _, err = proc.stop()
    assert code == 0, err
    assert "reload rejected" in err and "bogus_key" in err
