"""`bastion run --workers 2` with an admin listener: every answer speaks for both workers.

Requests go out on fresh connections, so SO_REUSEPORT spreads them over the two workers;
each admin request also lands on either worker, and every one must report the same totals.
"""

from __future__ import annotations

import http.client
import os
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from lb_support import origin_of, wait_for
from prometheus_client.parser import text_string_to_metric_families

from bastion.demo.origin import OriginHandle
from support import GatewayProcess, free_port, request, write_config

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="workers need fork")


def requests_total(admin_port: int) -> float:
    reply = request(admin_port, "GET", "/metrics")
    assert reply.status == 200
    return sum(
        sample.value
        for family in text_string_to_metric_families(reply.body.decode())
        for sample in family.samples
        if sample.name == "bastion_http_requests_total"
    )


def status(admin_port: int) -> dict[str, Any]:
    reply = request(admin_port, "GET", "/status")
    assert reply.status == 200
    result: dict[str, Any] = reply.json()
    return result


def both_answer(admin_port: int, not_pid: int = 0) -> bool:
    """Both workers answer (and worker 0 is not `not_pid` any more). A connection that reached
    a worker just killed is reset by the kernel: that is "not yet" too."""
    try:
        workers = status(admin_port)["workers"]
    except (OSError, http.client.HTTPException):
        return False
    return [w["answered"] and w["ready"] for w in workers] == [True, True] and workers[0]["pid"] != not_pid


def landed(port: int, count: int) -> Counter[str]:
    return Counter(origin_of(port, "/")[1] for _ in range(count))


def test_with_two_workers_every_endpoint_answers_for_the_whole_gateway(
    origins: Callable[..., OriginHandle], tmp_path: Path
) -> None:
    a, b = origins("a"), origins("b")
    port, admin_port = free_port(), free_port()
    config: dict[str, Any] = {
        "version": 1,
        "listeners": [{"name": "web", "bind": f"127.0.0.1:{port}"}],
        "upstreams": {"app": {"targets": [{"address": a.address}, {"address": b.address}]}},
        "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "app"}],
        "admin": {"bind": f"127.0.0.1:{admin_port}"},
        "log": {"access": False},
    }
    path = write_config(tmp_path / "gw.yaml", config)
    proc = GatewayProcess(path, port, "--workers", "2")
    try:
        wait_for(lambda: both_answer(admin_port), timeout=10)

        sent = 120
        assert sum(landed(port, sent).values()) == sent
        # A worker counts a request just after its last byte left, so the last may still be on its way.
        wait_for(lambda: sum(w["requests"] for w in status(admin_port)["workers"]) == sent, timeout=10)
        per_worker = [w["requests"] for w in status(admin_port)["workers"]]
        assert sum(per_worker) == sent and min(per_worker) > 0, per_worker  # both workers served
        for _ in range(6):  # whichever worker takes the scrape, the count is the gateway's
            assert requests_total(admin_port) == sent
            assert request(admin_port, "GET", "/stats").json()["total"]["requests"] == sent

        failed = [request(port, "GET", "/status/500").header("x-request-id") for _ in range(10)]
        wait_for(lambda: request(admin_port, "GET", "/errors").json()["seen"] == 10, timeout=10)  # as above
        for _ in range(4):  # whichever worker answers: the recent errors of both, newest first
            errors = request(admin_port, "GET", "/errors").json()
            assert errors["seen"] == 10
            assert sorted(e["request_id"] for e in errors["errors"]) == sorted(failed)
            times = [e["at"] for e in errors["errors"]]
            assert times == sorted(times, reverse=True)

        drained = request(admin_port, "POST", f"/upstreams/app/targets/{a.address}/drain")
        assert drained.status == 200
        assert drained.json()["workers_applied"] == 2
        assert landed(port, 30) == Counter({"b": 30})
        (upstream,) = request(admin_port, "GET", "/upstreams").json()["upstreams"]
        target = next(t for t in upstream["targets"] if t["address"] == a.address)
        assert (target["drained"], target["up"], target["workers"]) == (True, False, 2)

        # A worker that dies is replaced, and the replacement knows about the drain.
        victim = status(admin_port)["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: both_answer(admin_port, not_pid=victim), timeout=10)
        assert status(admin_port)["workers"][0]["restarts"] == 1
        assert landed(port, 30) == Counter({"b": 30})

        assert request(admin_port, "POST", f"/upstreams/app/targets/{a.address}/enable").status == 200
        assert "a" in landed(port, 20)

        reloaded = request(admin_port, "POST", "/reload")
        assert reloaded.status == 200 and reloaded.json()["workers"] == 2
        config["routes"][0]["upstream"] = "missing"
        path.write_text(yaml.safe_dump(config))
        refused = request(admin_port, "POST", "/reload")
        assert refused.status == 422
        assert any("routes[0].upstream" in p for p in refused.json()["problems"])
        assert origin_of(port, "/")[0] == 200  # still serving the old config
        assert status(admin_port)["reloads"]["rejected"] >= 1
    finally:
        code, _, err = proc.stop()
    assert code == 0, err
