"""The admin API's pieces without sockets: drained targets in every balancer, config checks on
`admin`, what `GET /config` masks, and the OpenAPI document against the endpoint table."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner
from openapi_spec_validator import validate

from bastion.admin.api import ENDPOINTS
from bastion.admin.node import AdminNode
from bastion.admin.openapi import document
from bastion.admin.redact import REDACTED, redact
from bastion.cli import cli
from bastion.config.loader import load_config_text
from bastion.config.schema import Upstream
from bastion.http.model import Headers, Request
from bastion.observability.metrics import Metrics
from bastion.upstream.balancers import BALANCERS
from bastion.upstream.pool import ConnectionPool, PoolLimits
from bastion.upstream.runtime import UpstreamRuntime
from bastion.upstream.targets import TargetState

# --- drained targets ---------------------------------------------------------------------------


def runtime(balance: str, targets: list[dict[str, Any]], **extra: Any) -> UpstreamRuntime:
    config = Upstream.model_validate(
        {
            "balance": balance,
            "targets": [{"address": f"10.0.0.{i + 1}:80", **t} for i, t in enumerate(targets)],
            **extra,
        }
    )
    limits = PoolLimits(10, 10, 60.0, 1.0)
    states = [
        TargetState(f"app/{t.address}", t.address, ConnectionPool(t.address, limits), "app") for t in config.targets
    ]
    rt = UpstreamRuntime("app", config, states, clock=lambda: 1000.0, rng=random.Random(3))
    rt.activate()
    return rt


def picks(rt: UpstreamRuntime, count: int = 60) -> Counter[str]:
    seen = Counter[str]()
    for n in range(count):
        request = Request("GET", f"/k{n}", "", Headers([]), client_ip=f"192.0.2.{n % 250}")
        seen[rt.pick(request).name] += 1
    return seen


@pytest.mark.parametrize("balance", sorted(BALANCERS))
def test_every_balancer_skips_a_drained_target_until_it_is_enabled(balance: str) -> None:
    rt = runtime(balance, [{}, {}, {}])
    assert set(picks(rt)) == {"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}
    rt.targets[1].admin_drained = True
    assert set(picks(rt)) == {"10.0.0.1:80", "10.0.0.3:80"}
    rt.targets[1].admin_drained = False
    assert "10.0.0.2:80" in picks(rt)


@pytest.mark.parametrize("balance", sorted(BALANCERS))
def test_draining_every_primary_opens_the_backup_tier(balance: str) -> None:
    rt = runtime(balance, [{}, {"backup": True}])
    rt.targets[0].admin_drained = True
    assert set(picks(rt, 10)) == {"10.0.0.2:80"}


def test_a_sticky_pin_to_a_drained_target_is_not_followed() -> None:
    rt = runtime("round_robin", [{}, {}], sticky={"cookie": "pin"})
    pinned = rt.targets[0]
    cookie = rt.sticky_ids[pinned.key]
    request = Request("GET", "/", "", Headers([(b"cookie", f"pin={cookie}".encode())]))
    assert all(rt.pick(request) is pinned for _ in range(5))
    pinned.admin_drained = True
    assert all(rt.pick(request) is rt.targets[1] for _ in range(5))


def test_enabling_a_drained_target_ramps_it_up_like_a_recovery() -> None:
    rt = runtime("round_robin", [{}, {}], slow_start="10s")
    target = rt.targets[0]
    gateway: Any = SimpleNamespace(
        workers=1, worker=0, registry=SimpleNamespace(targets={target.key: target}), metrics=Metrics(), started_at=0.0
    )
    node = AdminNode(gateway)
    assert node._apply_drain(target.key, True) and target.admin_drained
    assert target.ramp(time.monotonic()) == 1.0
    assert node._apply_drain(target.key, False) and not target.admin_drained
    assert target.ramp(time.monotonic()) < 0.5
    assert not node._apply_drain("app/10.9.9.9:80", True)  # not a target of this process


def test_a_drained_target_reports_itself_down_but_healthy() -> None:
    target = runtime("round_robin", [{}]).targets[0]
    target.admin_drained = True
    stats = target.statistics(1000.0)
    assert (stats["up"], stats["healthy"], stats["drained"]) == (False, True, True)


# --- admin config -------------------------------------------------------------------------------

BASE = """version: 1
listeners:
  - name: web
    bind: "127.0.0.1:8080"
upstreams:
  app:
    targets: [{ address: "127.0.0.1:9001" }]
routes:
  - name: all
    upstream: app
"""


def check(tmp_path: Path, admin: str) -> tuple[int, str]:
    path = tmp_path / "gw.yaml"
    path.write_text(BASE + admin)
    result = CliRunner().invoke(cli, ["check", str(path)])
    return result.exit_code, result.output


def test_check_refuses_a_public_admin_bind_without_a_token(tmp_path: Path) -> None:
    code, output = check(tmp_path, 'admin:\n  bind: "0.0.0.0:9901"\n')
    assert code == 1
    assert f"{tmp_path / 'gw.yaml'}:11: admin.token: required when admin.bind is not a loopback address" in output


@pytest.mark.parametrize("bind", ["127.0.0.1:9901", "127.1.2.3:9901", "[::1]:9901", "localhost:9901"])
def test_a_loopback_admin_bind_needs_no_token(tmp_path: Path, bind: str) -> None:
    code, output = check(tmp_path, f'admin:\n  bind: "{bind}"\n')
    assert code == 0, output
    assert "admin: http://" in output and "no token" in output


def test_a_public_admin_bind_with_a_token_passes(tmp_path: Path) -> None:
    code, output = check(tmp_path, 'admin:\n  bind: "0.0.0.0:9901"\n  token: "a-long-enough-token-1234"\n')
    assert code == 0, output
    assert "bearer token" in output


def test_admin_config_mistakes_point_at_their_line(tmp_path: Path) -> None:
    code, output = check(tmp_path, 'admin:\n  bind: "127.0.0.1:8080"\n  token: "short"\n')
    assert code == 1
    assert "gw.yaml:13: admin.token: String should have at least 16 characters" in output
    code, output = check(tmp_path, 'admin:\n  bind: "127.0.0.1:8080"\n')
    assert "gw.yaml:12: admin.bind: 127.0.0.1:8080 is already listeners[0].bind" in output


def test_without_an_admin_section_nothing_is_served(tmp_path: Path) -> None:
    assert load_config_text(BASE).config.admin is None
    code, output = check(tmp_path, "")
    assert code == 0 and "admin: off" in output


# --- GET /config masking ---------------------------------------------------------------------------


def test_secrets_are_masked_wherever_they_are() -> None:
    config = load_config_text(
        BASE
        + """
admin: { token: "admin-token-0123456789" }
cluster: { redis: "redis://user:redis-password@10.0.0.9:6379/0" }
consumers:
  - name: app
    credentials:
      key_auth: [{ key: "app-api-key-secret" }, { key_sha256: "%s" }]
      basic_auth: [{ username: bob, password_hash: "$2b$12$abcdefghijklmnopqrstuv" }]
plugins:
  - jwt: { secret: "jwt-secret-jwt-secret-jwt-secret-00" }
  - rate_limit: { limit: 5, per: 1m, key: consumer }
  - python: { module: "x:Y", config: { api_token: "custom-token", nested: { password: "pw" }, header: X-T } }
"""
        % ("a" * 64)
    ).config
    shown = redact(config.model_dump(mode="json", by_alias=True))
    text = repr(shown)
    for secret in ("admin-token-0123456789", "redis-password", "app-api-key-secret", "a" * 64, "$2b$12$", "jwt-secret"):
        assert secret not in text
    assert "custom-token" not in text and "'pw'" not in text
    assert shown["admin"]["token"] == REDACTED
    assert shown["cluster"]["redis"] == "redis://user:***@10.0.0.9:6379/0"
    assert shown["consumers"][0]["credentials"]["basic_auth"][0]["username"] == "bob"
    assert shown["plugins"][1] == {"rate_limit": {"limit": 5, "per": "1m", "key": "consumer"}}  # not a secret
    assert shown["plugins"][2]["python"]["config"]["header"] == "X-T"
    assert shown["upstreams"]["app"]["targets"][0]["address"] == "127.0.0.1:9001"


# --- OpenAPI ------------------------------------------------------------------------------------


def test_the_openapi_document_is_valid_and_lists_exactly_the_endpoints() -> None:
    doc = document()
    validate(doc)
    table = {("/" + "/".join(pattern), verb.lower()) for verb, pattern, _ in ENDPOINTS}
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert documented == table


def test_tracing_exporter_headers_are_redacted() -> None:
    shown = redact({"tracing": {"otlp_endpoint": "http://c:4318", "headers": {"api-key": "s3cret", "x-team": "a"}}})
    assert shown["tracing"]["headers"] == {"api-key": "<redacted>", "x-team": "<redacted>"}
    assert shown["tracing"]["otlp_endpoint"] == "http://c:4318"
