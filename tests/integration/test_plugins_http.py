"""cors, request/response headers, custom Python plugins and plugin failures, through a real gateway."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import Field

from bastion.demo.origin import OriginHandle
from bastion.errors import ConfigError
from bastion.http.model import Response
from bastion.pipeline import BuildEnv, Context, Plugin, PluginConfig, Reply
from docs_support import importable_examples, python_examples
from support import GatewayThread, request

Start = Callable[..., GatewayThread]
HERE = __name__  # the module name the gateway imports these test plugins by


@pytest.fixture
def origin(origins: Callable[..., OriginHandle]) -> OriginHandle:
    return origins("a")


# --- cors ----------------------------------------------------------------------------------------

CORS = {
    "origins": ["https://app.example.com", "https://*.example.org"],
    "methods": ["GET", "POST"],
    "headers": ["Authorization", "X-Api-Key"],
    "expose_headers": ["X-Request-Id"],
    "credentials": True,
    "max_age": "10m",
}


def preflight(port: int, origin: str, **extra: str) -> Any:
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST", **extra}
    return request(port, "OPTIONS", "/things", headers=headers)


def test_preflight_answered_by_the_gateway(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], plugins=[{"cors": CORS}])
    reply = preflight(gw.port, "https://app.example.com", **{"Access-Control-Request-Headers": "authorization"})
    assert reply.status == 204
    assert reply.header("Access-Control-Allow-Origin") == "https://app.example.com"
    assert reply.header("Access-Control-Allow-Methods") == "GET, POST"
    assert reply.header("Access-Control-Allow-Headers") == "Authorization, X-Api-Key"
    assert reply.header("Access-Control-Allow-Credentials") == "true"
    assert reply.header("Access-Control-Max-Age") == "600"
    assert reply.header("Vary") == "Origin"
    assert reply.body == b""
    assert preflight(gw.port, "https://a.b.example.org").status == 204
    assert origin.origin.requests == 0


@pytest.mark.parametrize("bad", ["https://evil.example.com", "http://app.example.com", "https://example.org", "null"])
def test_preflight_from_other_origins(gateway: Start, origin: OriginHandle, bad: str) -> None:
    gw = gateway(targets=[origin.port], plugins=[{"cors": CORS}])
    reply = preflight(gw.port, bad)
    assert reply.status == 403
    assert reply.json()["error"] == "cors_forbidden"
    assert not [k for k, _ in reply.headers if k.lower().startswith("access-control-")]
    assert reply.header_all("Vary") == ["Origin"]  # once, not again by the response hook


def test_actual_requests(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], plugins=[{"cors": CORS}])
    allowed = request(gw.port, headers={"Origin": "https://app.example.com"})
    assert allowed.status == 200
    assert allowed.header("Access-Control-Allow-Origin") == "https://app.example.com"
    assert allowed.header("Access-Control-Allow-Credentials") == "true"
    assert allowed.header("Access-Control-Expose-Headers") == "X-Request-Id"
    other = request(gw.port, headers={"Origin": "https://evil.example.com"})
    assert other.status == 200
    assert other.header("Access-Control-Allow-Origin") is None
    plain = request(gw.port)
    assert plain.header("Access-Control-Allow-Origin") is None
    # A plain OPTIONS request (no preflight headers) goes to the upstream.
    assert request(gw.port, "OPTIONS", "/x").status == 200


def test_cors_runs_before_authentication(gateway: Start, origin: OriginHandle) -> None:
    consumers = [{"name": "c", "credentials": {"key_auth": [{"key": "k"}]}}]
    gw = gateway(targets=[origin.port], consumers=consumers, plugins=[{"key_auth": {}}, {"cors": CORS}])
    assert preflight(gw.port, "https://app.example.com").status == 204
    refused = request(gw.port, headers={"Origin": "https://app.example.com"})
    assert refused.status == 401
    assert refused.header("Access-Control-Allow-Origin") == "https://app.example.com"  # the browser may read the 401


def test_any_origin_without_credentials(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], plugins=[{"cors": {"origins": ["*"]}}])
    assert preflight(gw.port, "https://whoever.test").header("Access-Control-Allow-Origin") == "*"
    assert request(gw.port, headers={"Origin": "https://x.test"}).header("Access-Control-Allow-Origin") == "*"


# --- request_headers / response_headers -----------------------------------------------------------


def test_request_and_response_headers(gateway: Start, origin: OriginHandle) -> None:
    plugins = [
        {"request_headers": {"set": {"X-Env": "prod"}, "add": {"X-Tag": ["a", "b"]}, "remove": ["X-Internal"]}},
        {"response_headers": {"set": {"Strict-Transport-Security": "max-age=31536000"}, "remove": ["X-Origin"]}},
    ]
    gw = gateway(targets=[origin.port], plugins=plugins)
    reply = request(gw.port, headers={"X-Env": "dev", "X-Internal": "secret", "X-Keep": "1"})
    seen = reply.json()["headers"]
    assert seen["x-env"] == "prod"
    assert seen["x-tag"] == ["a", "b"]
    assert "x-internal" not in seen
    assert seen["x-keep"] == "1"
    assert reply.header("X-Origin") is None
    assert reply.header("Strict-Transport-Security") == "max-age=31536000"


def test_response_headers_apply_to_gateway_replies(gateway: Start, origin: OriginHandle) -> None:
    plugins = [
        {"rate_limit": {"limit": 1, "per": "1h", "key": "ip"}},
        {"response_headers": {"set": {"X-Frame-Options": "DENY"}}},
    ]
    gw = gateway(targets=[origin.port], plugins=plugins)
    assert request(gw.port).header("X-Frame-Options") == "DENY"
    limited = request(gw.port)
    assert limited.status == 429
    assert limited.header("X-Frame-Options") == "DENY"


def test_gateway_owned_headers_cannot_be_set(gateway: Start, origin: OriginHandle) -> None:
    with pytest.raises(ConfigError) as caught:
        gateway(targets=[origin.port], plugins=[{"request_headers": {"set": {"X-Consumer": "admin"}}}])
    (problem,) = caught.value.problems
    assert re.search(r"gw0\.yaml:\d+: plugins\[0\]\.request_headers\.set: .*X-Consumer is managed", problem), problem


# --- custom Python plugins ------------------------------------------------------------------------


class StampConfig(PluginConfig):
    header: str = Field(min_length=1)
    value: str = "stamped"


class Stamp(Plugin):
    """Adds a header upstream, refuses ?deny, and records what it saw in every phase."""

    name = "stamp"
    Config = StampConfig
    logged: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, config: StampConfig, env: BuildEnv) -> None:
        super().__init__(config, env)
        self.header = config.header.lower().encode()
        self.value = config.value.encode()

    async def on_request(self, ctx: Context) -> Reply | None:
        if ctx.request.query == "deny":
            return Reply.error(403, "stamped_out", "Denied by the stamp.")
        ctx.request.headers.items.append((self.header, self.value))
        ctx.vars["stamp"] = ctx.params.get("id", "-")
        return None

    async def on_response(self, ctx: Context, response: Response) -> None:
        response.headers.add("X-Stamp-Route", ctx.route_name)

    def on_log(self, ctx: Context, record: dict[str, Any]) -> None:
        Stamp.logged.append({"status": record["status"], "stamp": ctx.vars.get("stamp")})


class Exploding(Plugin):
    name = "exploding"

    async def on_request(self, ctx: Context) -> Reply | None:
        if ctx.request.path == "/boom":
            raise RuntimeError("kaboom")
        return None

    async def on_response(self, ctx: Context, response: Response) -> None:
        if ctx.request.path == "/boom-late":
            raise KeyError("late")


class NotAPlugin:
    pass


def test_python_plugin_runs_in_process(gateway: Start, origin: OriginHandle) -> None:
    Stamp.logged.clear()
    routes = [{"name": "item", "match": {"path": "/items/{id}"}, "upstream": "app"}]
    plugins = [{"python": {"module": f"{HERE}:Stamp", "config": {"header": "X-Stamp"}}}]
    gw = gateway(targets=[origin.port], routes=routes, plugins=plugins)
    reply = request(gw.port, path="/items/7")
    assert reply.json()["headers"]["x-stamp"] == "stamped"
    assert reply.header("X-Stamp-Route") == "item"
    denied = request(gw.port, path="/items/8?deny")
    assert denied.status == 403
    assert denied.json()["error"] == "stamped_out"
    assert denied.header("X-Stamp-Route") == "item"
    assert Stamp.logged == [{"status": 200, "stamp": "7"}, {"status": 403, "stamp": None}]


def test_python_plugin_config_errors_point_at_lines(gateway: Start, origin: OriginHandle) -> None:
    plugins = [
        {"python": {"module": f"{HERE}:Stamp", "config": {"header": "", "colour": "red", "valeu": "x"}}},
        {"python": {"module": "no_such_module_anywhere:Thing"}},
        {"python": {"module": f"{HERE}:NotAPlugin"}},
        {"python": {"module": "not a target"}},
    ]
    with pytest.raises(ConfigError) as caught:
        gateway(targets=[origin.port], plugins=plugins)
    text = "\n".join(caught.value.problems)
    assert re.search(r"gw0\.yaml:\d+: plugins\[0\]\.python\.config\.header: String should have at least 1", text)
    assert re.search(
        r"gw0\.yaml:\d+: plugins\[0\]\.python\.config\.colour: unknown key \(expected one of: header,", text
    )
    assert re.search(r"plugins\[0\]\.python\.config\.valeu: unknown key \(did you mean 'value'\?\)", text)
    assert re.search(r"plugins\[1\]\.python\.module: cannot import no_such_module_anywhere", text)
    assert re.search(r"plugins\[2\]\.python\.module: .* is not a subclass of bastion\.pipeline\.Plugin", text)
    assert re.search(r"plugins\[3\]\.python\.module: String should match pattern", text)


def test_a_raising_plugin_costs_one_request_not_the_gateway(
    gateway: Start, origin: OriginHandle, caplog: pytest.LogCaptureFixture
) -> None:
    gw = gateway(targets=[origin.port], plugins=[{"python": {"module": f"{HERE}:Exploding"}}])
    with caplog.at_level(logging.ERROR, logger="bastion.plugins"):
        boom = request(gw.port, path="/boom")
        late = request(gw.port, path="/boom-late")
    for reply in (boom, late):
        assert reply.status == 500
        assert reply.json()["error"] == "plugin_error"
        assert reply.json()["request_id"] == reply.header("X-Request-Id")
        assert "kaboom" not in reply.body.decode()
    assert request(gw.port, path="/fine").status == 200
    messages = [r.getMessage() for r in caplog.records if r.name == "bastion.plugins"]
    assert any("plugin exploding failed in its request hook" in m for m in messages), messages
    assert any("plugin exploding failed in its response hook" in m for m in messages), messages


@pytest.fixture
def docs_examples(tmp_path: Path) -> Iterator[None]:
    """The custom plugin examples of docs/plugins.md, importable as my_pkg.plugins and my_pkg.caching."""
    assert {"my_pkg/plugins.py", "my_pkg/caching.py"} <= set(python_examples()), "docs/plugins.md lost an example"
    with importable_examples(tmp_path):
        yield


def test_the_documented_example_works(gateway: Start, origin: OriginHandle, docs_examples: None) -> None:
    consumers = [{"name": "acme", "credentials": {"key_auth": [{"key": "acme-key"}]}}]
    plugins = [{"key_auth": {}}, {"python": {"module": "my_pkg.plugins:AddTenant", "config": {"header": "X-Tenant"}}}]
    gw = gateway(targets=[origin.port], consumers=consumers, plugins=plugins)
    reply = request(gw.port, headers={"X-Api-Key": "acme-key", "X-Tenant": "forged"})
    assert reply.json()["headers"]["x-tenant"] == "acme"


def test_the_documented_response_phase_example_works(gateway: Start, origin: OriginHandle, docs_examples: None) -> None:
    consumers = [{"name": "acme", "credentials": {"key_auth": [{"key": "acme-key"}]}}]
    plugins = [
        {"key_auth": {}},
        {"python": {"module": "my_pkg.caching:CacheDefaults", "config": {"max_age": 300}}},
    ]
    gw = gateway(targets=[origin.port], consumers=consumers, plugins=plugins)
    key = {"X-Api-Key": "acme-key"}
    assert request(gw.port, headers=key).header_all("Cache-Control") == ["public, max-age=300"]
    assert request(gw.port, "POST", headers=key, body=b"x").header("Cache-Control") is None
    refused = request(gw.port)  # key_auth's own 401: the hook runs last, so it sees it
    assert refused.status == 401
    assert refused.header_all("Cache-Control") == ["no-store"]
    upstream_error = request(gw.port, path="/status/503", headers=key)
    assert upstream_error.status == 503
    assert upstream_error.header_all("Cache-Control") == ["no-store"]
