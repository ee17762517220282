"""Config keys of tcp and tls_passthrough listeners: what is accepted and the errors for the rest."""

from __future__ import annotations

from typing import Any

import pytest

from bastion.config.loader import load_config_text
from bastion.errors import ConfigError

UPSTREAMS = """\
upstreams:
  db: {targets: [{address: "127.0.0.1:5432"}]}
  web: {targets: [{address: "127.0.0.1:8443"}]}
"""


def config(listener: str, upstreams: str = UPSTREAMS) -> str:
    return f"version: 1\nlisteners:\n  - {{name: l, bind: '127.0.0.1:15432', {listener}}}\n{upstreams}"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "gw.yaml")
    return info.value.problems


def test_a_tcp_listener_with_defaults() -> None:
    listener = load_config_text(config("protocol: tcp, upstream: db")).config.listeners[0]
    assert listener.upstream == "db"
    assert listener.timeouts.idle == 3600.0
    assert listener.limits.max_connections == 0


def test_a_passthrough_listener_lower_cases_its_hosts() -> None:
    text = config("protocol: tls_passthrough, sni_routes: [{hosts: [DB.Example.com, '*.a.b', '*'], upstream: db}]")
    listener = load_config_text(text).config.listeners[0]
    assert listener.sni_routes is not None
    assert listener.sni_routes[0].hosts == ["db.example.com", "*.a.b", "*"]


@pytest.mark.parametrize(
    ("listener", "message"),
    [
        ("protocol: tcp", "a tcp listener needs upstream: NAME"),
        ("protocol: tls_passthrough", "a tls_passthrough listener needs sni_routes"),
        ("protocol: http, upstream: db", "upstream is for tcp and udp listeners"),
        ("protocol: tcp, upstream: db, sni_routes: [{hosts: ['*'], upstream: db}]", "sni_routes is for"),
        ("protocol: tcp, upstream: db, http2: true", "http2 is for http and https listeners"),
        ("protocol: tcp, upstream: db, timeouts: {keepalive: 1s}", "timeouts.keepalive is for http"),
        ("protocol: tcp, upstream: db, limits: {max_headers: 10}", "limits.max_headers is for http"),
        ("protocol: http, timeouts: {idle: 1s}", "timeouts.idle is for tcp and tls_passthrough"),
        ("protocol: http, limits: {max_connections: 1}", "limits.max_connections is for tcp"),
        ("protocol: udp", "a udp listener needs upstream: NAME"),
        ("protocol: udp, upstream: db, timeouts: {idle: 1s}", "a udp listener sets udp.session_idle"),
        ("protocol: http, udp: {session_idle: 1s}", "udp is for udp listeners"),
        ("protocol: udp, upstream: db, proxy_protocol: {accept: true, trusted: [10.0.0.0/8]}", "not udp"),
        ("protocol: http, proxy_protocol: {accept: true}", "accept: true needs trusted"),
        ("protocol: http, proxy_protocol: {accept: true, trusted: [10.0.0.300/8]}", "not an IP address or CIDR"),
        (
            "protocol: tls_passthrough, sni_routes: [{hosts: ['*'], upstream: db}], "
            "tls: {certificates: [{cert: a, key: b}]}",
            "tls is for https and tcp listeners",
        ),
        ("protocol: tls_passthrough, sni_routes: [{hosts: ['a b'], upstream: db}]", "not a host name"),
        ("protocol: tls_passthrough, sni_routes: [{hosts: ['a.*.b'], upstream: db}]", "not a host name"),
    ],
)
def test_keys_that_do_not_fit_the_protocol_are_errors(listener: str, message: str) -> None:
    [problem] = problems(config(listener))
    assert problem.startswith("gw.yaml:3: listeners[0]")
    assert message in problem


def test_an_unknown_upstream_is_an_error_with_its_key_path() -> None:
    text = config("protocol: tls_passthrough, sni_routes: [{hosts: [a.b], upstream: db}, {hosts: ['*'], upstream: x}]")
    [problem] = problems(text)
    assert "listeners[0].sni_routes[1].upstream: no upstream named 'x' (db, web)" in problem


def test_a_host_in_two_sni_routes_is_an_error() -> None:
    text = config(
        "protocol: tls_passthrough, sni_routes: [{hosts: [a.b], upstream: db}, {hosts: [A.b], upstream: web}]"
    )
    [problem] = problems(text)
    assert "listeners[0].sni_routes[1].hosts: 'a.b' is already in an earlier route" in problem


def test_an_l4_upstream_hashes_on_the_client_ip_only() -> None:
    upstreams = UPSTREAMS.replace("db: {", "db: {balance: consistent_hash, hash_on: 'header:X-Id', ")
    [problem] = problems(config("protocol: tcp, upstream: db", upstreams))
    assert "upstreams.db.hash_on: an L4 upstream (listeners[0].upstream) can only hash on ip" in problem


def test_sticky_on_an_upstream_only_l4_listeners_use_is_an_error() -> None:
    upstreams = UPSTREAMS.replace("db: {", "db: {sticky: {cookie: s}, ")
    [problem] = problems(config("protocol: tcp, upstream: db", upstreams))
    assert "upstreams.db.sticky: not used by an L4 upstream" in problem


def test_check_says_where_each_l4_listener_sends_its_connections(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from bastion.cli import cli

    path = tmp_path / "gw.yaml"
    path.write_text(
        "version: 1\nlisteners:\n"
        "  - {name: pg, bind: '127.0.0.1:15432', protocol: tcp, upstream: db}\n"
        "  - {name: edge, bind: '127.0.0.1:9443', protocol: tls_passthrough,"
        " sni_routes: [{hosts: [a.example.com], upstream: web}, {hosts: ['*'], upstream: db}]}\n" + UPSTREAMS
    )
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["pg", "tcp"] and line.endswith("-> db") for line in lines)
    assert any(line.endswith("-> a.example.com: web, *: db") for line in lines)


def test_send_proxy_protocol_is_refused_on_an_upstream_that_routes_use() -> None:
    text = (
        "version: 1\nlisteners:\n  - {name: web, bind: '127.0.0.1:8080'}\n"
        "upstreams:\n  app: {targets: [{address: '127.0.0.1:9000'}], send_proxy_protocol: v2}\n"
        "routes:\n  - {name: all, match: {path: /}, upstream: app}\n"
    )
    assert any(
        "upstreams.app.send_proxy_protocol: for upstreams of tcp, udp and tls_passthrough listeners" in problem
        for problem in problems(text)
    )


def test_a_udp_listener_with_defaults_and_its_keys() -> None:
    listener = load_config_text(config("protocol: udp, upstream: db")).config.listeners[0]
    assert listener.udp is None  # defaults: session_idle 30s, max_sessions 10000, max_datagram 65535
    text = config("protocol: udp, upstream: db, udp: {session_idle: 2s, max_sessions: 5, max_datagram: 4KB}")
    udp = load_config_text(text).config.listeners[0].udp
    assert udp is not None and (udp.session_idle, udp.max_sessions, udp.max_datagram) == (2.0, 5, 4096)
    assert any("max_datagram" in p for p in problems(config("protocol: udp, upstream: db, udp: {max_datagram: 100}")))


def test_an_http2_protocol_on_an_upstream_only_l4_listeners_use_is_an_error() -> None:
    upstreams = UPSTREAMS.replace("db: {", "db: {protocol: h2c, ")
    [problem] = problems(config("protocol: tcp, upstream: db", upstreams))
    assert "upstreams.db.protocol: h2c is HTTP/2; an L4 upstream (listeners[0].upstream) relays" in problem
