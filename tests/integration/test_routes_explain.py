"""`bastion routes --explain` and the running gateway pick the same route for the same request.

Each route forwards to its own origin, and the origins echo their names: for every request
below, the route the explanation names is the one whose origin answered the real request.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from bastion.cli import cli
from bastion.demo.origin import OriginHandle
from support import GatewayThread, free_port, raw_exchange, split_responses, write_config

ROUTES = ["exact", "wildcard", "anyhost"]


@pytest.fixture
def table(tmp_path: Path, origins: Callable[..., OriginHandle]) -> tuple[Path, int]:
    """A host-based table: exact host, then wildcard, then any host, all for path /v1."""
    started = {name: origins(name) for name in ROUTES}
    port = free_port()
    config = {
        "version": 1,
        "listeners": [{"name": "web", "bind": f"127.0.0.1:{port}"}],
        "upstreams": {name: {"targets": [{"address": f"127.0.0.1:{o.port}"}]} for name, o in started.items()},
        "routes": [
            {"name": "anyhost", "match": {"path": "/v1"}, "upstream": "anyhost"},
            {"name": "wildcard", "match": {"hosts": ["*.example.com"], "path": "/v1"}, "upstream": "wildcard"},
            {"name": "exact", "match": {"hosts": ["api.example.com"], "path": "/v1"}, "upstream": "exact"},
        ],
        "log": {"access": False},
    }
    return write_config(tmp_path / "gw.yaml", config), port


def explained(config: Path, request: str, *headers: str) -> str:
    args = ["routes", str(config), "--explain", request]
    for header in headers:
        args += ["-H", header]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result.stdout.rstrip().splitlines()[-1]


def served(port: int, target: str, *headers: str) -> str:
    """What the gateway does with `GET target` and these header lines: the origin's name or the status."""
    head = f"GET {target} HTTP/1.1\r\n" + "".join(f"{h}\r\n" for h in headers) + "Connection: close\r\n\r\n"
    ((status, _, body),) = split_responses(raw_exchange(port, head.encode()))
    return str(json.loads(body)["origin"]) if status == 200 else str(status)


@pytest.mark.parametrize(
    ("host", "route"),
    [
        ("api.example.com", "exact"),
        ("API.Example.COM.", "exact"),  # case and a trailing dot do not matter
        ("api.example.com.:8080", "exact"),
        ("a.example.com", "wildcard"),
        ("example.com", "anyhost"),
        ("[::1]:80", "anyhost"),
    ],
)
def test_explain_honours_the_host_header_as_the_gateway_does(table: tuple[Path, int], host: str, route: str) -> None:
    config, port = table
    gateway = GatewayThread(config, port)
    try:
        assert served(port, "/v1/x", f"Host: {host}") == route
    finally:
        gateway.stop()
    assert explained(config, "GET /v1/x", f"Host: {host}") == f"=> route {route}"
    # The URL's host is the Host header curl sends, unless -H 'Host: ...' replaces it.
    assert explained(config, "GET http://127.0.0.1:8080/v1/x", f"Host: {host}") == f"=> route {route}"
    if not host.startswith("["):
        assert explained(config, f"GET http://{host}/v1/x") == f"=> route {route}"


def test_explain_prints_the_host_it_routes_on(table: tuple[Path, int]) -> None:
    config, _ = table
    result = CliRunner().invoke(cli, ["routes", str(config), "--explain", "GET /v1/x", "-H", "Host: API.example.com."])
    assert "GET host=api.example.com path=/v1/x" in result.stdout
    result = CliRunner().invoke(cli, ["routes", str(config), "--explain", "GET /v1/x"])
    assert "GET host=(none) path=/v1/x" in result.stdout
    assert result.stdout.rstrip().endswith("=> route anyhost")


@pytest.mark.parametrize(
    "headers",
    [
        ("Host: a.example.com,b.example.com",),
        ("Host: user@api.example.com",),
        ("Host: api.example.com:99999",),
        ("Host: api.example.com", "Host: a.example.com"),
    ],
)
def test_explain_refuses_the_hosts_the_gateway_refuses(table: tuple[Path, int], headers: tuple[str, ...]) -> None:
    config, port = table
    gateway = GatewayThread(config, port)
    try:
        assert served(port, "/v1/x", *headers) == "400"
    finally:
        gateway.stop()
    verdict = explained(config, "GET /v1/x", *headers)
    assert verdict.startswith(("=> 400 The Host ", "=> 400 The request has more than one Host")), verdict
