"""The command line: exit codes and what a user reads on stdout and stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

import bastion
from bastion.cli import cli

GOOD = """\
version: 1
listeners:
  - name: web
    bind: "127.0.0.1:8080"
upstreams:
  users:
    balance: least_connections
    targets:
      - { address: "127.0.0.1:9001", weight: 3 }
      - { address: "127.0.0.1:9002", backup: true }
  orders:
    targets: [{ address: "127.0.0.1:9003" }]
routes:
  - { name: users, upstream: users, match: { path: /v1/users, methods: [GET] } }
  - { name: orders, upstream: orders, match: { hosts: [api.example.com], path: /v1/orders } }
  - { name: beta, upstream: orders, match: { path: /v1/orders, headers: { X-Beta: "1" } } }
plugins:
  - rate_limit: { limit: 100, per: 1m }
"""

BAD = """\
version: 1
listeners:
  - name: web
    bind: "127.0.0.1"
upstreams:
  users:
    targets: [{ address: "127.0.0.1:9001", wieght: 3 }]
"""


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD)
    return path


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    return path


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"bastion {bastion.__version__}\n"
    assert bastion.__version__ == "0.1.0"


def test_python_dash_m_works() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bastion", "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "bastion 0.1.0\n"


def test_check_ok(good: Path) -> None:
    result = CliRunner().invoke(cli, ["check", str(good)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "web" in out and "127.0.0.1:8080" in out
    assert "least_connections" in out and "2 targets (1 backup)" in out
    assert "round_robin" in out and "1 target" in out
    assert "routes: 3" in out
    assert "global plugins: 1" in out
    assert "consumers: 0" in out
    assert out.rstrip().endswith("config OK")
    assert result.stderr == ""


def test_check_bad_reports_every_problem_on_stderr(bad: Path) -> None:
    result = CliRunner().invoke(cli, ["check", str(bad)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{bad}:4: listeners[0].bind: not host:port",
        f"{bad}:7: upstreams.users.targets[0].wieght: unknown key (did you mean 'weight'?)",
        f"2 problems in {bad}",
    ]


def test_check_one_problem_count_line(tmp_path: Path) -> None:
    path = tmp_path / "one.yaml"
    path.write_text(GOOD.replace("version: 1", "version: 2"))
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == f"1 problem in {path}"


def test_check_missing_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["check", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert "cannot read the file" in result.stderr


def test_schema_is_json_schema() -> None:
    result = CliRunner().invoke(cli, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["title"] == "Bastion config"
    assert {"version", "listeners", "upstreams", "routes"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def _fake_module(monkeypatch: pytest.MonkeyPatch, name: str, **attrs: object) -> None:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)


def test_run_loads_then_hands_over(monkeypatch: pytest.MonkeyPatch, good: Path) -> None:
    calls: list[tuple[str, int]] = []

    def run_gateway(path: str, workers: int = 1) -> int:
        calls.append((path, workers))
        return 0

    _fake_module(monkeypatch, "bastion.workers", run_gateway=run_gateway)
    runner = CliRunner()
    assert runner.invoke(cli, ["run", str(good)]).exit_code == 0
    assert runner.invoke(cli, ["run", str(good), "--workers", "3"]).exit_code == 0
    assert runner.invoke(cli, ["run", str(good), "-w", "auto"]).exit_code == 0
    assert calls == [(str(good), 1), (str(good), 3), (str(good), os.cpu_count() or 1)]


def test_run_exit_code_is_the_gateways(monkeypatch: pytest.MonkeyPatch, good: Path) -> None:
    _fake_module(monkeypatch, "bastion.workers", run_gateway=lambda path, workers=1: 3)
    assert CliRunner().invoke(cli, ["run", str(good)]).exit_code == 3


def test_run_refuses_bad_config_and_bad_workers(monkeypatch: pytest.MonkeyPatch, good: Path, bad: Path) -> None:
    def run_gateway(path: str, workers: int = 1) -> int:
        raise AssertionError("must not start")

    _fake_module(monkeypatch, "bastion.workers", run_gateway=run_gateway)
    result = CliRunner().invoke(cli, ["run", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:4: listeners[0].bind: not host:port" in result.stderr
    for value in ("0", "many"):
        result = CliRunner().invoke(cli, ["run", str(good), "--workers", value])
        assert result.exit_code == 2
        assert "--workers" in result.stderr


def test_demo_hands_over(monkeypatch: pytest.MonkeyPatch) -> None:
    import bastion.demo

    monkeypatch.setattr(bastion.demo, "run_demo", lambda: 0)
    assert CliRunner().invoke(cli, ["demo"]).exit_code == 0


def test_routes_table_in_match_order(good: Path) -> None:
    result = CliRunner().invoke(cli, ["routes", str(good)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["#", "NAME", "HOSTS", "PATH", "METHODS", "HEADERS", "UPSTREAM"]
    names = [line.split()[1] for line in lines[1:]]
    # exact host first, then more conditions before fewer
    assert names[0] == "orders"
    assert sorted(names) == ["beta", "orders", "users"]
    # columns are aligned: every row starts its NAME at the same offset
    offset = lines[0].index("NAME")
    assert all(line[offset - 2 : offset] == "  " and line[offset] != " " for line in lines[1:])


def test_routes_explain_match(good: Path) -> None:
    args = ["routes", str(good), "--explain", "GET http://API.Example.com:8080/v1/orders/7?x=1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "host=api.example.com path=/v1/orders/7" in result.stdout
    assert result.stdout.rstrip().endswith("=> route orders")
    assert "users:" in result.stdout  # a verdict for every route


def test_routes_explain_uses_headers(good: Path) -> None:
    args = ["routes", str(good), "--explain", "GET /v1/orders", "-H", "X-Beta: 1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip().endswith("=> route beta")


def test_routes_explain_405_and_404(good: Path) -> None:
    result = CliRunner().invoke(cli, ["routes", str(good), "--explain", "POST http://x/v1/users"])
    assert result.stdout.rstrip().splitlines()[-1].startswith("=> 405 (Allow: GET")
    result = CliRunner().invoke(cli, ["routes", str(good), "--explain", "GET http://x/nope"])
    assert result.stdout.rstrip().endswith("=> 404 no route")


def test_routes_explain_bad_input(good: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["routes", str(good), "--explain", "GET"]).exit_code == 2
    result = runner.invoke(cli, ["routes", str(good), "--explain", "GET /", "-H", "no-colon"])
    assert result.exit_code == 2
    assert runner.invoke(cli, ["routes", str(good), "-H", "A: b"]).exit_code == 2
    result = runner.invoke(cli, ["routes", str(good), "--explain", "GET /a/%2F/b"])
    assert result.stdout.rstrip().endswith("=> 400 The request path has an encoded slash, backslash or NUL.")


def test_routes_bad_config(bad: Path) -> None:
    result = CliRunner().invoke(cli, ["routes", str(bad)])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == f"2 problems in {bad}"
