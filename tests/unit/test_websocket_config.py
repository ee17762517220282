"""The route keys for WebSocket: `websocket`, `websocket_idle_timeout`, `websocket_max_duration`."""

from __future__ import annotations

import textwrap

import pytest

from bastion.config.build import build_snapshot
from bastion.config.loader import load_config_text
from bastion.errors import ConfigError
from bastion.upstream.targets import TargetRegistry

BASE = """\
version: 1
listeners: [{name: web, bind: "127.0.0.1:8080"}]
upstreams: {chat: {targets: [{address: "127.0.0.1:9001"}]}}
routes:
  - name: chat
    match: { path: /ws }
    upstream: chat
"""


def route_config(extra: str) -> str:
    return BASE + textwrap.indent(textwrap.dedent(extra), "    ")


def test_off_by_default_with_a_five_minute_idle_timeout_and_no_duration_limit() -> None:
    route = load_config_text(BASE).config.routes[0]
    assert route.websocket is False
    assert route.websocket_idle_timeout == 300.0
    assert route.websocket_max_duration == 0.0


def test_the_keys_reach_the_route_runtime() -> None:
    text = route_config("websocket: true\nwebsocket_idle_timeout: 90s\nwebsocket_max_duration: 2h\n")
    route = build_snapshot(load_config_text(text), TargetRegistry()).routes[0]
    assert route.websocket is True
    assert route.websocket_idle_timeout == 90.0
    assert route.websocket_max_duration == 7200.0


def test_zero_turns_a_timer_off_in_the_runtime() -> None:
    text = route_config("websocket: true\nwebsocket_idle_timeout: 0\n")
    route = build_snapshot(load_config_text(text), TargetRegistry()).routes[0]
    assert route.websocket_idle_timeout is None
    assert route.websocket_max_duration is None


@pytest.mark.parametrize("key", ["websocket_idle_timeout", "websocket_max_duration"])
def test_a_timeout_without_websocket_true_is_an_error(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(route_config(f"{key}: 1m\n"), "gw.yaml")
    assert info.value.problems == [f"gw.yaml:8: routes[0].{key}: only used with websocket: true"]


def test_a_bad_duration_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(route_config("websocket: true\nwebsocket_idle_timeout: 30\n"), "gw.yaml")
    [problem] = info.value.problems
    assert problem.startswith("gw.yaml:9: routes[0].websocket_idle_timeout: not a duration: 30")


def test_websocket_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(route_config("websocket: sometimes\n"), "gw.yaml")
    [problem] = info.value.problems
    assert problem.startswith("gw.yaml:8: routes[0].websocket:")
