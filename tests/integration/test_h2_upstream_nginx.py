"""Interop with a real HTTP/2 server: nginx as an h2c and an h2 (TLS, ALPN) target.

nginx closes an HTTP/2 connection with GOAWAY after `keepalive_requests` requests, so a run
of requests crosses many graceful GOAWAYs: none may fail.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import free_port, request, simple_config, wait_listening
from tls_support import Pki

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def _nginx_conf(directory: Path, port: int, tls: tuple[str, str] | None) -> Path:
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = " ".join(f"{kind}_temp_path {directory / kind};" for kind in kinds)
    listen = f"listen 127.0.0.1:{port} http2;"
    if tls is not None:
        listen = f"listen 127.0.0.1:{port} ssl http2; ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};"
    conf = directory / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"};
events {{ worker_connections 256; }}
http {{
  access_log off;
  {temp}
  keepalive_requests 10;
  server {{
    {listen}
    location / {{ return 200 "nginx saw $request_method $request_uri $http_x_request_id\\n"; }}
  }}
}}
"""
    )
    return conf


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Any]:
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (.ci/run installs it)")
    started: list[subprocess.Popen[bytes]] = []

    def start(tls: tuple[str, str] | None = None) -> int:
        port = free_port()
        directory = tmp_path / f"nginx{len(started)}"
        directory.mkdir()
        conf = _nginx_conf(directory, port, tls)
        errors = (directory / "stderr.log").open("w+b")
        proc = subprocess.Popen([NGINX, "-c", str(conf)], stderr=errors)
        started.append(proc)
        wait_listening(port, proc=proc, errors=errors)
        return port

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(10)


def _run(port: int, count: int) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        return list(pool.map(lambda i: request(port, "GET", f"/n{i}?q={i}"), range(count)))


def _gateway(gateway: Any, port: int, **upstream: Any) -> Any:
    config = simple_config(0, [port])
    config["listeners"][0]["bind"] = "127.0.0.1:PORT"
    config["upstreams"]["app"].update(upstream)
    return gateway(config)


def test_h2c_to_nginx_across_its_goaways(gateway: Any, nginx: Any) -> None:
    gw = _gateway(gateway, nginx(), protocol="h2c")
    replies = _run(gw.port, 60)
    assert [r.status for r in replies] == [200] * 60
    for i, reply in enumerate(replies):
        assert reply.body.startswith(f"nginx saw GET /n{i}?q={i} ".encode())
        assert reply.body.strip().endswith(reply.header("x-request-id").encode())
    (target,) = gw.gateway.registry.targets.values()
    assert target.pool.opened_total >= 6  # nginx closed a connection every 10 requests


def test_h2_over_tls_to_nginx(gateway: Any, nginx: Any, tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    cert, key = pki.issue("nginx", "127.0.0.1")
    gw = _gateway(gateway, nginx((cert, key)), protocol="h2", tls={"ca": str(pki.ca_file)})
    replies = _run(gw.port, 30)
    assert [r.status for r in replies] == [200] * 30
