"""The plugin framework without sockets: ordering, hook splitting, build-time errors, Context, Reply."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from click.testing import CliRunner

from bastion.cli import cli
from bastion.config.build import RouteRuntime, check_config, order_plugins
from bastion.config.loader import load_config_text
from bastion.config.schema import Consumer
from bastion.errors import ConfigError
from bastion.http.model import Headers, Request, Response
from bastion.pipeline import BuildEnv, Context, Plugin, PluginError, Reply, plugin_failed
from bastion.plugins import PLUGINS, register
from bastion.plugins.consumers import ConsumerIndex
from bastion.store.memory import LocalStore

ENV = BuildEnv(ConsumerIndex(), LocalStore())
GOOD_HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()

HEAD = """\
version: 1
listeners: [{ name: web, bind: "127.0.0.1:8080" }]
upstreams: { app: { targets: [{ address: "127.0.0.1:9001" }] } }
routes:
  - name: all
    match: { path: / }
    upstream: app
"""


def problems(text: str) -> list[str]:
    loaded = load_config_text(HEAD + textwrap.dedent(text), "gw.yaml")
    with pytest.raises(ConfigError) as caught:
        check_config(loaded)
    return caught.value.problems


class Recorder(Plugin):
    def __init__(self, label: str, stage: int) -> None:
        super().__init__(None, ENV)
        self.label = label
        self.stage = stage  # type: ignore[misc]

    def __repr__(self) -> str:
        return self.label


def test_stages_order_auth_before_authz_and_traffic_global_before_route() -> None:
    g_rate = Recorder("g_rate", Plugin.TRAFFIC)
    g_auth = Recorder("g_auth", Plugin.AUTHENTICATION)
    g_tx = Recorder("g_tx", Plugin.TRANSFORM)
    r_acl = Recorder("r_acl", Plugin.AUTHORIZATION)
    r_auth = Recorder("r_auth", Plugin.AUTHENTICATION)
    r_ip = Recorder("r_ip", Plugin.NETWORK)
    ordered = order_plugins([g_rate, g_auth, g_tx], [r_acl, r_auth, r_ip])
    assert [p.label for p in ordered] == ["r_ip", "g_auth", "r_auth", "r_acl", "g_rate", "g_tx"]  # type: ignore[attr-defined]


class OnlyRequest(Plugin):
    async def on_request(self, ctx: Context) -> Reply | None:
        return None


class OnlyResponse(Plugin):
    async def on_response(self, ctx: Context, response: Response) -> None:
        return None


class OnlyLog(Plugin):
    def on_log(self, ctx: Context, record: dict[str, Any]) -> None:
        return None


def test_route_runtime_keeps_only_overriding_plugins_per_hook() -> None:
    loaded = load_config_text(HEAD, "gw.yaml")
    route = loaded.config.routes[0]
    a, b, c, d = OnlyRequest(None, ENV), OnlyResponse(None, ENV), OnlyLog(None, ENV), OnlyResponse(None, ENV)
    runtime = RouteRuntime(route, None, [a, b, c, d])  # type: ignore[arg-type]
    assert runtime.request_plugins == (a,)
    assert runtime.response_plugins == (d, b)  # reverse
    assert runtime.log_plugins == (c,)


def test_a_route_without_plugins_has_empty_chains() -> None:
    loaded = load_config_text(HEAD, "gw.yaml")
    runtime = RouteRuntime(loaded.config.routes[0], None, [])  # type: ignore[arg-type]
    assert runtime.request_plugins == runtime.response_plugins == runtime.log_plugins == ()


# --- build-time errors --------------------------------------------------------------------------


def test_unknown_plugin_suggests_the_closest_name() -> None:
    assert problems("plugins:\n  - kee_auth: {}\n") == [
        "gw.yaml:9: plugins[0].kee_auth: unknown plugin (did you mean 'key_auth'?)"
    ]
    assert problems("plugins:\n  - ratelimit: { limit: 1, per: 1s }\n") == [
        "gw.yaml:9: plugins[0].ratelimit: unknown plugin (did you mean 'rate_limit'?)"
    ]


def test_unknown_plugin_far_from_any_name_lists_the_known_ones() -> None:
    (problem,) = problems("plugins:\n  - oauth2: {}\n")
    assert problem.startswith("gw.yaml:9: plugins[0].oauth2: unknown plugin (expected one of: acl, basic_auth,")
    assert "key_auth" in problem


def test_unknown_plugin_keys_get_did_you_mean() -> None:
    found = problems(
        """\
        plugins:
          - rate_limit: { limit: 1, per: 1s, kye: ip }
          - key_auth: { inn: ["header:X-Key"] }
          - cors: { origins: ["*"], colour: red }
        """
    )
    assert found == [
        "gw.yaml:9: plugins[0].rate_limit.kye: unknown key (did you mean 'key'?)",
        "gw.yaml:10: plugins[1].key_auth.inn: unknown key (did you mean 'in'?)",
        "gw.yaml:11: plugins[2].cors.colour: unknown key (expected one of: origins, methods, headers, "
        "expose_headers, credentials, max_age)",
    ]


def test_plugin_values_from_the_environment_are_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIMIT_SECRET", "hunter2")
    monkeypatch.setenv("LIMIT_PLAIN", "hunter3")
    found = problems('plugins:\n  - rate_limit: { limit: "${LIMIT_SECRET}", per: 1s }\n')
    assert found == [
        "gw.yaml:9: plugins[0].rate_limit.limit: Input should be a valid integer, unable to parse string as an integer"
    ]
    found = problems("plugins:\n  - rate_limit: { limit: hunter3, per: 1s }\n")
    assert found == [
        "gw.yaml:9: plugins[0].rate_limit.limit: Input should be a valid integer, unable to parse string as an integer "
        "(got 'hunter3')"
    ]


def test_plugin_config_errors_have_lines_and_key_paths() -> None:
    found = problems(
        """\
        plugins:
          - rate_limit: { limit: 0, per: often, colour: red }
          - key_auth:
              in: ["header:X-Api-Key", "body:key"]
          - jwt: { secret: short }
          - {}
          - { acl: {}, cors: {} }
        """
    )
    text = "\n".join(found)
    assert "gw.yaml:9: plugins[0].rate_limit.limit: Input should be greater than or equal to 1 (got 0)" in text
    assert "gw.yaml:9: plugins[0].rate_limit.per: not a duration: 'often'" in text
    assert "gw.yaml:9: plugins[0].rate_limit.colour: unknown key (expected one of: limit, per, key," in text
    assert re.search(r"gw\.yaml:11: plugins\[1\]\.key_auth\.in: .*'body:key'", text)
    assert "gw.yaml:12: plugins[2].jwt.secret: an HMAC secret must be at least 32 bytes" in text
    assert "gw.yaml:13: plugins[3]: a plugin entry is {NAME: {...config}}" in text
    assert "gw.yaml:14: plugins[4]: a plugin entry is {NAME: {...config}}" in text


def test_route_plugin_errors_point_into_the_route() -> None:
    text = HEAD.replace("    upstream: app\n", "    upstream: app\n    plugins:\n      - body_limit: { max: lots }\n")
    loaded = load_config_text(text, "gw.yaml")
    with pytest.raises(ConfigError) as caught:
        check_config(loaded)
    assert caught.value.problems == [
        "gw.yaml:9: routes[0].plugins[0].body_limit.max: not a size: 'lots' (use 512KB, 8MB, 1GB or a number of bytes)"
    ]


def test_consumer_problems_never_show_the_key() -> None:
    found = problems(
        f"""\
        consumers:
          - name: a
            credentials:
              key_auth: [{{ key: topsecret-1 }}]
              basic_auth: [{{ username: u, password_hash: "{GOOD_HASH}" }}, {{ username: v, password_hash: "md5:a" }}]
          - name: b
            credentials:
              key_auth: [{{ key: topsecret-1 }}]
              basic_auth: [{{ username: u, password_hash: "$2b$04$abc" }}]
              jwt: [{{ subject: s }}, {{ subject: s }}]
        """
    )
    text = "\n".join(found)
    assert "topsecret" not in text
    assert "gw.yaml:15: consumers[1].credentials.key_auth[0].key: key already used by consumer 'a'" in text
    assert "gw.yaml:12: consumers[0].credentials.basic_auth[1].password_hash: not a bcrypt" in text
    assert "consumers[1].credentials.basic_auth[0].username: username already used by consumer 'a'" in text
    assert "consumers[1].credentials.jwt[1].subject: subject already used by consumer 'b'" in text


def test_acl_without_authentication_is_refused() -> None:
    (problem,) = problems("plugins:\n  - acl: { allow_groups: [x] }\n")
    assert problem == (
        "gw.yaml:9: plugins[0].acl: acl needs an authentication plugin (key_auth, basic_auth or jwt) "
        "before it (route 'all')"
    )


def test_acl_without_authentication_is_reported_with_the_other_problems() -> None:
    found = problems(
        """\
        plugins:
          - rate_limit: { limit: 0, per: 1s }
          - acl: { allow_groups: [x] }
        """
    )
    assert found == [
        "gw.yaml:9: plugins[0].rate_limit.limit: Input should be greater than or equal to 1 (got 0)",
        "gw.yaml:10: plugins[1].acl: acl needs an authentication plugin (key_auth, basic_auth or jwt) "
        "before it (route 'all')",
    ]


def test_acl_after_an_authentication_entry_with_problems_is_not_refused() -> None:
    # The key_auth entry is wrong, but it is there: acl has its authentication plugin.
    found = problems("plugins:\n  - key_auth: { hide_credential: true }\n  - acl: { allow_groups: [x] }\n")
    assert found == ["gw.yaml:9: plugins[0].key_auth.hide_credential: unknown key (did you mean 'hide_credentials'?)"]


def test_acl_next_to_an_unknown_plugin_is_not_judged() -> None:
    # `key_authh` may have been meant as the authentication plugin: only the name is reported.
    found = problems("plugins:\n  - key_authh: {}\n  - acl: { allow_groups: [x] }\n")
    assert found == ["gw.yaml:9: plugins[0].key_authh: unknown plugin (did you mean 'key_auth'?)"]


def test_acl_next_to_a_failing_python_plugin_is_not_judged() -> None:
    # The custom class might have been the authentication plugin: its class is unknown.
    found = problems('plugins:\n  - python: { module: "no_such_module_here:Auth" }\n  - acl: { allow_groups: [x] }\n')
    assert len(found) == 1
    assert found[0].startswith("gw.yaml:9: plugins[0].python.module: cannot import no_such_module_here")


def test_jwt_refuses_none_and_mixed_key_types() -> None:
    secret = "x" * 32
    text = "\n".join(
        problems(
            f"""\
            plugins:
              - jwt: {{ secret: "{secret}", algorithms: [none] }}
              - jwt: {{ secret: "{secret}", algorithms: [RS256] }}
              - jwt: {{ jwks_uri: "https://id.test/jwks", algorithms: [HS256] }}
              - jwt: {{ secret: "{secret}", jwks_uri: "https://id.test/jwks" }}
              - jwt: {{ jwks_uri: "ftp://id.test/jwks" }}
              - jwt: {{ public_key: "not a pem" }}
            """
        )
    )
    assert 'plugins[0].jwt: algorithm "none" is never accepted' in text
    assert "plugins[1].jwt: RS256 cannot be verified with a secret (key confusion)" in text
    assert "plugins[2].jwt: HS256 cannot be verified with public keys (key confusion)" in text
    assert "plugins[3].jwt: give exactly one of secret, public_key, jwks_uri" in text
    assert "plugins[4].jwt.jwks_uri: must be an http:// or https:// URL" in text
    assert "plugins[5].jwt: not a PEM public key" in text


def test_bastion_check_prints_plugin_suggestions_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        HEAD
        + "    plugins:\n      - rate_limit: { limit: 5, per: 1m, kye: ip }\n      - acl: { allow_groups: [x] }\n"
        + "plugins:\n  - cors: { origins: ['*'], credential: true }\n"
    )
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"{path}:9: routes[0].plugins[0].rate_limit.kye: unknown key (did you mean 'key'?)",
        f"{path}:10: routes[0].plugins[1].acl: acl needs an authentication plugin (key_auth, basic_auth or jwt) "
        "before it (route 'all')",
        f"{path}:12: plugins[0].cors.credential: unknown key (did you mean 'credentials'?)",
        f"3 problems in {path}",
    ]
    path.write_text(HEAD + "plugins:\n  - basic_auht: {}\n")
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.output.splitlines() == [
        f"{path}:9: plugins[0].basic_auht: unknown plugin (did you mean 'basic_auth'?)",
        f"1 problem in {path}",
    ]


def test_bastion_check_reports_plugin_problems(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(HEAD + "plugins:\n  - rate_limit: { limit: 5, per: 1m, key: cookie }\n")
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 1
    assert f"{path}:9: plugins[0].rate_limit.key: must be consumer, ip, route or header:NAME" in result.output
    assert "1 problem in" in result.output
    path.write_text(HEAD + "plugins:\n  - rate_limit: { limit: 5, per: 1m }\n")
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 0, result.output


def test_bastion_run_refuses_plugin_problems_before_starting(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(HEAD + "plugins:\n  - body_limit: { max: lots }\n")
    result = CliRunner().invoke(cli, ["run", str(path)])
    assert result.exit_code == 1
    assert f"{path}:9: plugins[0].body_limit.max: not a size" in result.output
    assert "Traceback" not in result.output


def test_register_needs_a_name() -> None:
    class Nameless(Plugin):
        pass

    with pytest.raises(ValueError, match="has no name"):
        register(Nameless)
    assert "Nameless" not in PLUGINS


# --- Context, Reply, failures --------------------------------------------------------------------


def request(headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    return Request("GET", "/", "", Headers(list(headers or [])), client_ip="192.0.2.1")


def test_authenticate_sets_exactly_one_x_consumer() -> None:
    ctx = Context(request([(b"x-consumer", b"forged"), (b"accept", b"*/*")]), "r", None)
    assert ctx.client_ip == "192.0.2.1"
    ctx.authenticate(Consumer(name="first"))
    ctx.authenticate(Consumer(name="second"))
    assert ctx.request.headers.get_all("x-consumer") == ["second"]
    assert ctx.consumer is not None and ctx.consumer.name == "second"
    assert ctx.request.headers.get("accept") == "*/*"


def test_reply_error_is_the_contract_shape() -> None:
    reply = Reply.error(403, "forbidden", "No.", Headers([(b"x-a", b"1")]))
    assert reply.status == 403
    assert json.loads(reply.body) == {"error": "forbidden", "message": "No."}
    assert reply.headers.get("x-a") == "1"
    assert Reply(204).headers.items == []


def test_plugin_failed_logs_the_plugin_and_makes_a_500(caplog: pytest.LogCaptureFixture) -> None:
    class Named(Plugin):
        name = "named"

    error = plugin_failed(Named(None, ENV), "request", RuntimeError("x"), "req-1")
    assert isinstance(error, PluginError)
    assert (error.status, error.word) == (500, "plugin_error")
    assert "plugin named failed in its request hook (request req-1)" in caplog.text
