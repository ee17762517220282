"""`upstreams.*.protocol` (http1 | h2 | h2c) and the checks that go with it."""

from __future__ import annotations

import pytest

from bastion.config.build import build_snapshot
from bastion.config.loader import load_config_text
from bastion.errors import ConfigError
from bastion.upstream.h2_pool import H2Pool
from bastion.upstream.pool import ConnectionPool
from bastion.upstream.targets import TargetRegistry


def config(upstream: str, route: str = "") -> str:
    return f"""\
version: 1
listeners: [{{name: web, bind: "127.0.0.1:8080"}}]
upstreams:
  app:
    targets: [{{address: "127.0.0.1:9001"}}]
{upstream}
routes:
  - name: all
    match: {{ path: / }}
    upstream: app
{route}
"""


def problems(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        build_snapshot(load_config_text(text, "gw.yaml"), TargetRegistry())
    return str(info.value)


def test_http1_is_the_default_and_each_protocol_gets_its_pool() -> None:
    assert load_config_text(config("")).config.upstreams["app"].protocol == "http1"
    plain = build_snapshot(load_config_text(config("")), TargetRegistry())
    assert isinstance(plain.upstreams["app"].targets[0].pool, ConnectionPool)
    for protocol in ("h2c", "h2"):
        snapshot = build_snapshot(load_config_text(config(f"    protocol: {protocol}")), TargetRegistry())
        assert isinstance(snapshot.upstreams["app"].targets[0].pool, H2Pool)


def test_h2_implies_tls_offering_only_h2() -> None:
    snapshot = build_snapshot(load_config_text(config("    protocol: h2")), TargetRegistry())
    tls = snapshot.upstreams["app"].tls
    assert tls is not None
    assert tls.key[-1] == ("h2",)
    assert build_snapshot(load_config_text(config("    protocol: h2c")), TargetRegistry()).upstreams["app"].tls is None


def test_a_protocol_change_makes_a_fresh_target_state() -> None:
    registry = TargetRegistry()
    before = build_snapshot(load_config_text(config("")), registry).upstreams["app"].targets[0]
    after = build_snapshot(load_config_text(config("    protocol: h2c")), registry).upstreams["app"].targets[0]
    assert before is not after and isinstance(after.pool, H2Pool)


def test_an_unknown_protocol_is_refused() -> None:
    assert "protocol" in problems(config("    protocol: http3"))


def test_tls_on_h2c_is_refused() -> None:
    text = problems(config("    protocol: h2c\n    tls: {verify: false}"))
    assert "upstreams.app" in text and "h2c is cleartext" in text


def test_a_websocket_route_on_an_http2_upstream_is_refused_with_why() -> None:
    text = problems(config("    protocol: h2c", "    websocket: true"))
    assert "routes[0].websocket" in text or "routes.0.websocket" in text
    assert "HTTP/2 has no Upgrade" in text
    build_snapshot(load_config_text(config("", "    websocket: true")), TargetRegistry())  # fine on http1


def test_grpc_checks_need_an_http2_upstream() -> None:
    text = problems(config("    health_check: {active: {type: grpc}}"))
    assert "grpc needs protocol h2 or h2c" in text
    ok = config("    protocol: h2c\n    health_check: {active: {type: grpc, service: users.v1.Users}}")
    active = load_config_text(ok).config.upstreams["app"].health_check.active
    assert active is not None and (active.type, active.service) == ("grpc", "users.v1.Users")
