"""The loader's promise: every problem at once, each as `FILE:LINE: key.path: message`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bastion.config.loader import LoadedConfig, expand_env, format_loc, load_config, load_config_text
from bastion.errors import ConfigError

BASE = """\
version: 1
listeners:
  - name: web
    bind: "127.0.0.1:8080"
upstreams:
  users:
    targets:
      - { address: "127.0.0.1:9001", weight: 3 }
      - { address: "127.0.0.1:9002" }
routes:
  - name: users
    upstream: users
    match: { path: /v1/users }
"""


def with_weight(value: str) -> str:
    """BASE with the first target in block style (a plain ${..} is not allowed inside { })."""
    return BASE.replace(
        '{ address: "127.0.0.1:9001", weight: 3 }', f'address: "127.0.0.1:9001"\n        weight: {value}'
    )


def load(text: str, env: dict[str, str] | None = None, filename: str = "gw.yaml") -> LoadedConfig:
    return load_config_text(textwrap.dedent(text), filename, env={} if env is None else env)


def problems(text: str, env: dict[str, str] | None = None, filename: str = "gw.yaml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text, env, filename)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_valid_config_loads_with_lines() -> None:
    loaded = load(BASE)
    assert loaded.path == "gw.yaml"
    assert loaded.source_text == BASE
    assert loaded.config.upstreams["users"].targets[0].weight == 3
    assert loaded.line_of(("upstreams", "users", "targets", 1, "address")) == 9
    assert loaded.line_of(("routes", 0, "match", "path")) == 13
    # a key the file does not have falls back to its nearest ancestor
    assert loaded.line_of(("upstreams", "users", "retries", "attempts")) == 6
    assert loaded.where(("routes", 0, "upstream"), "boom") == "gw.yaml:12: routes[0].upstream: boom"
    assert loaded.where((), "boom") == "gw.yaml:1: boom"


def test_where_points_into_plugin_config_for_the_snapshot_builder() -> None:
    loaded = load(BASE + "plugins:\n  - rate_limit:\n      limit: 10\n      per: 1m\n")
    assert loaded.where(("plugins", 0, "rate_limit", "limit"), "must be positive") == (
        "gw.yaml:16: plugins[0].rate_limit.limit: must be positive"
    )


def test_format_loc() -> None:
    assert format_loc(("upstreams", "users", "targets", 1, "address")) == "upstreams.users.targets[1].address"
    assert format_loc(("upstreams", "api.v1", "balance")) == 'upstreams["api.v1"].balance'
    assert format_loc(()) == ""


def test_unknown_key_top_level_suggests() -> None:
    text = BASE.replace("routes:", "route:")
    assert problems(text) == ["gw.yaml:10: route: unknown key (did you mean 'routes'?)"]


def test_unknown_key_nested_suggests_and_reports_missing_at_parent() -> None:
    text = BASE.replace("    targets:\n", "    target:\n")
    assert problems(text) == [
        "gw.yaml:6: upstreams.users.targets: missing required key",
        "gw.yaml:7: upstreams.users.target: unknown key (did you mean 'targets'?)",
    ]


def test_unknown_key_without_close_match_lists_known_keys() -> None:
    out = problems(BASE + "zzz: 1\n")
    assert out == [
        "gw.yaml:14: zzz: unknown key (expected one of: version, listeners, upstreams, routes, plugins, "
        "consumers, admin, cluster, tracing, log, drain_timeout)"
    ]


def test_wrong_type_echoes_the_value() -> None:
    out = problems(BASE.replace("weight: 3", "weight: heavy"))
    assert len(out) == 1
    assert out[0].startswith("gw.yaml:8: upstreams.users.targets[0].weight: Input should be a valid integer")
    assert out[0].endswith("(got 'heavy')")


def test_number_where_a_string_is_wanted_says_to_quote_it() -> None:
    out = problems(BASE.replace("{ path: /v1/users }", "{ headers: { X-Api-Version: 1 } }"))
    assert out == [
        "gw.yaml:13: routes[0].match.headers.X-Api-Version: Input should be a valid string "
        "(got 1; quote it to make it a string)"
    ]


def test_bad_address_matches_the_contract_example() -> None:
    out = problems(BASE.replace('"127.0.0.1:9002"', '"127.0.0.1"'))
    assert out == ["gw.yaml:9: upstreams.users.targets[1].address: not host:port"]


def test_bad_duration_and_size() -> None:
    text = BASE + "drain_timeout: 30\n"
    text = text.replace(
        '    bind: "127.0.0.1:8080"\n',
        '    bind: "127.0.0.1:8080"\n    limits:\n      max_header_bytes: 12XB\n',
    )
    out = problems(text)
    assert out[0].startswith("gw.yaml:6: listeners[0].limits.max_header_bytes: not a size: '12XB'")
    assert out[1].startswith("gw.yaml:16: drain_timeout: not a duration: 30")
    assert len(out) == 2


def test_custom_validator_messages_have_no_pydantic_prefix() -> None:
    out = problems(BASE.replace("{ path: /v1/users }", "{ path: v1/users }"))
    assert out == ["gw.yaml:13: routes[0].match.path: must start with /"]


def test_literal_choice() -> None:
    out = problems(BASE.replace("    targets:\n", "    balance: fastest\n    targets:\n"))
    assert len(out) == 1
    assert out[0].startswith("gw.yaml:7: upstreams.users.balance: Input should be 'round_robin'")
    assert out[0].endswith("(got 'fastest')")


def test_missing_required_at_top_level_points_at_the_root() -> None:
    out = problems("listeners:\n  - { name: web, bind: '127.0.0.1:80' }\n")
    assert out == ["gw.yaml:1: version: missing required key"]


def test_duplicate_yaml_key() -> None:
    out = problems(BASE.replace("    upstream: users\n", "    upstream: users\n    upstream: users\n"))
    assert out == ["gw.yaml:13: routes[0].upstream: duplicate key (first at line 12)"]


def test_duplicate_route_name_from_cross_check() -> None:
    out = problems(BASE + "  - name: users\n    upstream: users\n")
    assert out == ["gw.yaml:14: routes[1].name: duplicate name users"]


def test_route_naming_unknown_upstream() -> None:
    out = problems(BASE.replace("    upstream: users\n", "    upstream: user\n"))
    assert out == ["gw.yaml:12: routes[0].upstream: no upstream named 'user' (users)"]


def test_env_default_plain_scalar_becomes_typed() -> None:
    loaded = load(with_weight("${W:-5}"))
    assert loaded.config.upstreams["users"].targets[0].weight == 5
    loaded = load(with_weight("${W:-5}"), env={"W": "7"})
    assert loaded.config.upstreams["users"].targets[0].weight == 7


def test_env_quoted_default_is_converted_by_the_model() -> None:
    loaded = load(BASE.replace("weight: 3", 'weight: "${W:-3}"'))
    assert loaded.config.upstreams["users"].targets[0].weight == 3


def test_env_plain_block_value_resolves_bool() -> None:
    text = BASE.replace(
        '      - { address: "127.0.0.1:9002" }\n', '      - address: "127.0.0.1:9002"\n        backup: ${B}\n'
    )
    assert load(text, env={"B": "true"}).config.upstreams["users"].targets[1].backup is True


def test_env_inside_a_longer_string_and_escape() -> None:
    text = BASE.replace('bind: "127.0.0.1:8080"', 'bind: "${HOST:-127.0.0.1}:${PORT}"')
    text = text.replace("{ path: /v1/users }", '{ headers: { X-Lit: "$${NOT_A_VAR}", X-Mix: "a-${T}-b" } }')
    loaded = load(text, env={"PORT": "9090", "T": "x"})
    assert str(loaded.config.listeners[0].bind) == "127.0.0.1:9090"
    assert loaded.config.routes[0].match.headers == {"X-Lit": "${NOT_A_VAR}", "X-Mix": "a-x-b"}


def test_env_unset_is_an_error_at_its_line() -> None:
    text = BASE.replace('bind: "127.0.0.1:8080"', 'bind: "127.0.0.1:${PORT}"')
    out = problems(text)
    assert out == [
        "gw.yaml:4: listeners[0].bind: environment variable PORT is not set (give a default with ${PORT:-...})"
    ]


def test_expand_env_rules() -> None:
    assert expand_env("${A:-d}", {"A": ""}) == ("d", [])
    assert expand_env("${A}", {"A": ""}) == ("", [])
    assert expand_env("$argon2id$v=19$x", {}) == ("$argon2id$v=19$x", [])
    assert expand_env("$${A}", {"A": "no"}) == ("${A}", [])
    assert expand_env("${A:-x:-y}", {}) == ("x:-y", [])
    assert expand_env("${A", {})[1] == ["unclosed ${ (write $${ for a literal ${)"]
    assert expand_env("${1A}", {})[1] == ["bad variable reference ${1A} (use ${NAME} or ${NAME:-default})"]


def test_env_values_are_not_echoed_in_errors() -> None:
    out = problems(with_weight("${W}"), env={"W": "s3cret"})
    assert len(out) == 1
    assert "s3cret" not in out[0]
    assert out[0].startswith("gw.yaml:9: upstreams.users.targets[0].weight: Input should be a valid integer")


def test_json_input_with_lines_and_tabs() -> None:
    text = (
        "{\n"
        '\t"version": 1,\n'
        '\t"listeners": [{"name": "web", "bind": "127.0.0.1:8080"}],\n'
        '\t"upstreams": {"users": {"targets": [{"address": "127.0.0.1:9001"}]}},\n'
        '\t"routes": [\n'
        '\t\t{"name": "a", "upstream": "users"},\n'
        '\t\t{"name": "b", "upstream": "users", "strip_prefx": "/x"}\n'
        "\t]\n"
        "}\n"
    )
    out = problems(text, filename="gw.json")
    assert out == ["gw.json:7: routes[1].strip_prefx: unknown key (did you mean 'strip_prefix'?)"]
    loaded = load(text.replace('"strip_prefx"', '"strip_prefix"'), filename="gw.json")
    assert loaded.config.routes[1].strip_prefix == "/x"


def test_json_duplicate_key() -> None:
    text = '{"version": 1,\n "version": 1,\n "listeners": [{"name": "web", "bind": "127.0.0.1:80"}]}'
    assert problems(text, filename="gw.json") == ["gw.json:2: version: duplicate key (first at line 1)"]


def test_all_problems_at_once_in_line_order() -> None:
    text = """\
        version: 2
        listeners:
          - name: web
            bind: "nowhere"
            protocl: http
        upstreams:
          users:
            targets: []
        admin: { bind: "${ADMIN}" }
        """
    out = problems(text)
    assert [line.split(":")[1] for line in out] == ["1", "4", "5", "8", "9"]
    assert out[0].startswith("gw.yaml:1: version: Input should be 1")
    assert out[1] == "gw.yaml:4: listeners[0].bind: not host:port"
    assert out[2] == "gw.yaml:5: listeners[0].protocl: unknown key (did you mean 'protocol'?)"
    assert out[3].startswith("gw.yaml:8: upstreams.users.targets: List should have at least 1 item")
    assert out[4].startswith("gw.yaml:9: admin.bind: environment variable ADMIN is not set")


def test_yaml_syntax_error_has_a_line() -> None:
    out = problems(BASE.replace("  users:\n", "  users:\n   bad: [1, 2\n"))
    assert len(out) == 1
    assert out[0].startswith("gw.yaml:")
    assert "YAML syntax error" in out[0]
    line = int(out[0].split(":")[1])
    assert 7 <= line <= 9


def test_plain_env_reference_inside_flow_mapping_gets_a_hint() -> None:
    out = problems(BASE.replace("weight: 3", "weight: ${W}"))
    assert out == [
        "gw.yaml:8: YAML syntax error: did not find expected ',' or '}' (while parsing a flow mapping)"
        " (quote values that use ${...} inside { } or [ ])"
    ]


def test_yaml_syntax_error_names_the_line_of_a_bad_indent() -> None:
    out = problems("version: 1\nlisteners:\n  - name: web\n bind: x\n")
    assert out[0].startswith("gw.yaml:4: YAML syntax error")


def test_empty_file_and_wrong_top_level() -> None:
    assert problems("") == ["gw.yaml:1: the file is empty (a config needs at least version: 1 and listeners)"]
    assert problems("# only a comment\n")[0].startswith("gw.yaml:1: the file is empty")
    assert problems("- a\n- b\n") == [
        "gw.yaml:1: the top level must be a mapping of keys (version, listeners, ...), not a list"
    ]


def test_multiple_documents_are_an_error() -> None:
    out = problems(BASE + "---\nversion: 1\n")
    assert out[0].startswith("gw.yaml:14: YAML syntax error")


def test_merge_keys_and_aliases() -> None:
    text = BASE.replace(
        "upstreams:\n",
        "x-defaults: &defaults\n  balance: random\nupstreams:\n",
    ).replace("    targets:\n", "    <<: *defaults\n    targets:\n")
    # the extension key itself is unknown, so it must be reported, but merging works
    out = problems(text)
    assert out == [
        "gw.yaml:5: x-defaults: unknown key (expected one of: version, listeners, upstreams, routes, plugins, "
        "consumers, admin, cluster, tracing, log, drain_timeout)"
    ]
    text = BASE.replace("    targets:\n", "    <<: {balance: random}\n    targets:\n")
    assert load(text).config.upstreams["users"].balance == "random"


def test_keys_are_kept_as_written() -> None:
    text = BASE.replace("{ path: /v1/users }", "{ headers: { on: 'x' } }")
    assert load(text).config.routes[0].match.headers == {"on": "x"}


def test_load_config_from_files(tmp_path: Path) -> None:
    good = tmp_path / "gw.yaml"
    good.write_text(BASE)
    loaded = load_config(good, env={})
    assert loaded.path == str(good)
    assert loaded.config.listeners[0].name == "web"

    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.replace("weight: 3", "weight: -1"))
    with pytest.raises(ConfigError) as info:
        load_config(bad, env={})
    assert info.value.problems[0].startswith(f"{bad}:8: upstreams.users.targets[0].weight: ")

    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    assert info.value.problems == [f"{tmp_path / 'missing.yaml'}: cannot read the file: No such file or directory"]

    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"version: 1\n\xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        load_config(binary)
    assert info.value.problems == [f"{binary}:2: the file is not UTF-8 text"]


def test_environment_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_TEST_WEIGHT", "9")
    loaded = load_config_text(with_weight("${BASTION_TEST_WEIGHT}"), "gw.yaml")
    assert loaded.config.upstreams["users"].targets[0].weight == 9


def test_bad_route_template_is_reported_with_its_line() -> None:
    text = """version: 1
listeners: [{name: w, bind: "127.0.0.1:1"}]
upstreams: {u: {targets: [{address: "127.0.0.1:2"}]}}
routes:
  - name: r
    match:
      path: "/a/{x}y"
    upstream: u
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "gw.yaml")
    (problem,) = info.value.problems
    assert problem.startswith("gw.yaml:7: routes[0].match.path: segment '{x}y'")


def test_only_one_path_kind_per_route() -> None:
    text = """version: 1
listeners: [{name: w, bind: "127.0.0.1:1"}]
upstreams: {u: {targets: [{address: "127.0.0.1:2"}]}}
routes: [{name: r, upstream: u, match: {path: /a, path_exact: /a}}]
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "gw.yaml")
    assert "give one of path, path_exact or path_regex" in info.value.problems[0]
