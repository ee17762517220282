"""Cross-feature review: `bastion check` and `bastion routes` on a config with every kind of
listener (h2c, tcp, udp, tls_passthrough), gRPC and gRPC-Web routes and a grpc_json route."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from bastion.cli import cli

ALL = """\
version: 1
listeners:
  - { name: web, bind: "127.0.0.1:18080", http2: prior_knowledge,
      proxy_protocol: { accept: true, trusted: ["127.0.0.0/8"] } }
  - { name: pg, bind: "127.0.0.1:15432", protocol: tcp, upstream: pg,
      proxy_protocol: { accept: true, trusted: ["127.0.0.0/8"] } }
  - { name: dns, bind: "127.0.0.1:15353", protocol: udp, upstream: dns }
  - name: edge
    bind: "127.0.0.1:19443"
    protocol: tls_passthrough
    sni_routes: [{ hosts: ["DB.Example.com."], upstream: pg }, { hosts: ["*"], upstream: pg }]
upstreams:
  pg: { targets: [{ address: "127.0.0.1:5432" }], send_proxy_protocol: v2 }
  dns: { targets: [{ address: "127.0.0.1:53" }] }
  g:
    protocol: h2c
    targets: [{ address: "127.0.0.1:50051" }]
    health_check: { active: { type: grpc, interval: 2s } }
  h1: { targets: [{ address: "127.0.0.1:8081" }] }
routes:
  - { name: grpc, match: { path: /pkg.Svc/ }, upstream: g, grpc_web: true }
  - { name: web1, match: { path: /web/ }, upstream: h1 }
"""


def test_check_and_routes_on_every_kind_of_listener(tmp_path: Path) -> None:
    path = tmp_path / "all.yaml"
    path.write_text(ALL)
    runner = CliRunner()
    checked = runner.invoke(cli, ["check", str(path)])
    assert checked.exit_code == 0, checked.output
    assert "tls_passthrough" in checked.output and "udp" in checked.output
    assert "db.example.com: pg" in checked.output  # names are shown as matched: lower case, no dot
    table = runner.invoke(cli, ["routes", str(path)])
    assert table.exit_code == 0 and "grpc" in table.output
    grpc = runner.invoke(
        cli, ["routes", str(path), "--explain", "POST http://x/pkg.Svc/Call", "-H", "content-type: application/grpc"]
    )
    assert grpc.exit_code == 0 and "=> route grpc" in grpc.output
    missing = runner.invoke(cli, ["routes", str(path), "--explain", "POST http://x/other.Svc/Call"])
    assert missing.exit_code == 0 and "no route" in missing.output


def test_grpc_web_on_an_http1_upstream_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(ALL.replace("upstream: h1 }", "upstream: h1, grpc_web: true }"))
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code != 0
    assert "bad.yaml:22: routes[1].grpc_web" in result.output
