"""`bastion schema`: what an editor gets. Plugin settings are described and checked like the rest."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from bastion.cli import cli
from bastion.plugins import plugin_names

CONFIG = """\
version: 1
listeners: [{ name: web, bind: "127.0.0.1:8080" }]
upstreams: { app: { targets: [{ address: "127.0.0.1:9001" }] } }
consumers:
  - { name: app, credentials: { key_auth: [{ key: k }] } }
plugins:
  - key_auth: { in: ["header:X-Api-Key"], hide_credentials: true }
  - basic_auth:
  - rate_limit: { limit: 10, per: 1s, key: ip }
  - cors: { origins: ["https://app.example.com"], max_age: 10m }
  - body_limit: { max: 1MB }
  - response_headers: { remove: [Server] }
  - python: { module: "pkg.mod:Class", config: { anything: [1, 2] } }
routes:
  - name: all
    match: { path: / }
    upstream: app
    plugins:
      - jwt: { secret: "${JWT_SECRET}", leeway: 0, forward_claims: { X-User: sub } }
      - acl: { allow_groups: [staff] }
"""


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["schema"])
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(document)
    return document


def errors(schema: dict[str, Any], text: str) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [error.message for error in validator.iter_errors(yaml.safe_load(text))]


def test_the_schema_accepts_a_correct_config(schema: dict[str, Any]) -> None:
    assert errors(schema, CONFIG) == []


@pytest.mark.parametrize(
    ("change", "wrong"),
    [
        ("rate_limit: { limit: 10, per: 1s, key: ip }", "rate_limit: { limit: 10, per: 1s, kye: ip }"),
        ("rate_limit: { limit: 10, per: 1s, key: ip }", "rate_limit: { limit: 10, per: often }"),
        ("rate_limit: { limit: 10, per: 1s, key: ip }", "rate_limit: { per: 1s }"),
        ("body_limit: { max: 1MB }", "body_limit: { max: lots }"),
        ("key_auth: { in:", "key_auth: { inn:"),
        ("cors: {", "corz: {"),
        ("acl: { allow_groups: [staff] }", "acl: { allow_groups: staff }"),
        ("basic_auth:\n", "basic_auth: yes\n"),
    ],
)
def test_the_schema_refuses_wrong_plugin_settings(schema: dict[str, Any], change: str, wrong: str) -> None:
    assert change in CONFIG
    assert errors(schema, CONFIG.replace(change, wrong, 1))


def test_an_entry_names_one_plugin(schema: dict[str, Any]) -> None:
    assert errors(schema, CONFIG.replace("  - body_limit: { max: 1MB }", "  - { body_limit: { max: 1MB }, cors: {} }"))


def test_every_plugin_is_a_choice_of_the_entry(schema: dict[str, Any]) -> None:
    choices = schema["$defs"]["PluginEntry"]["oneOf"]
    assert [next(iter(choice["properties"])) for choice in choices] == plugin_names()
    for choice in choices:
        assert choice["additionalProperties"] is False
        assert choice["description"]
    route_plugins = schema["$defs"]["Route"]["properties"]["plugins"]
    assert route_plugins["items"] == schema["properties"]["plugins"]["items"] == {"$ref": "#/$defs/PluginEntry"}


def _plugin_properties(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for choice in schema["$defs"]["PluginEntry"]["oneOf"]:
        ((plugin, settings),) = choice["properties"].items()
        ref = settings.get("$ref") or settings["anyOf"][0]["$ref"]
        model = schema["$defs"][ref.rsplit("/", 1)[1]]
        for key, prop in model["properties"].items():
            yield plugin, key, prop


def test_every_plugin_key_has_a_description(schema: dict[str, Any]) -> None:
    found = list(_plugin_properties(schema))
    assert ("key_auth", "in") in [(plugin, key) for plugin, key, _ in found]  # keys as written: aliases
    missing = [f"{plugin}.{key}" for plugin, key, prop in found if not prop.get("description")]
    assert not missing, f"plugin keys without a description: {missing}"


# Core keys still without a description. These models are being changed on other branches
# right now (listeners for TLS, upstreams for HTTP/2, admin, log): their descriptions are added
# there, and this list may only shrink.
UNDESCRIBED = {
    "Admin.bind",
    "Listener.name",
    "Listener.bind",
    "Listener.protocol",
    "Listener.timeouts",
    "Listener.limits",
    "Listener.backlog",
    "Log.level",
    "Upstream.balance",
    "Upstream.targets",
    "Upstream.health_check",
    "Upstream.sticky",
    "Upstream.retries",
    "Upstream.timeouts",
    "Upstream.queue",
    "Config.version",
    "Config.listeners",
    "Config.upstreams",
    "Config.routes",
    "Config.consumers",
    "Config.admin",
    "Config.cluster",
    "Config.log",
}


def test_every_other_key_has_a_description(schema: dict[str, Any]) -> None:
    models = {"Config": schema, **schema["$defs"]}
    missing = {
        f"{model}.{key}"
        for model, body in models.items()
        for key, prop in body.get("properties", {}).items()
        if not prop.get("description")
    }
    assert missing <= UNDESCRIBED, f"keys without a description: {sorted(missing - UNDESCRIBED)}"
