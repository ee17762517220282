#!/usr/bin/env python3
"""Bastion next to nginx, on loopback, in front of the same origin, loaded by wrk.

The origin is nginx itself answering `return 200 "hello"` on two ports, so it is never the
bottleneck. The proxy under test is pinned to one CPU, origin and wrk to another. Rounds
alternate the order of the proxies (bastion first, then nginx first, ...) so slow drift of
the machine does not favour either; each number reported is the median over the rounds.

Scenarios are data (`SCENARIOS`): a new row is a `Scenario(...)` with the plugins and
consumers to add to Bastion's config and the nginx directives that do the same work. A row
whose plugins the gateway cannot load (`bastion.plugins.plugin_class`, probed in a
subprocess) is printed as skipped. Besides the wrk rows there are two memory rows: "idle
connections" (RSS with 10,000 idle keep-alive clients, held by `idle_clients.py`) and "soak"
(RSS sampled during 60 s of full load). The TLS and WebSocket rows (issue 9) use one
certificate made for the run and served by both proxies: "https keep-alive" (wrk over
HTTPS), "tls handshakes" (`openssl s_time -new`: a full handshake per request, no
resumption) and "websocket echo" (`ws_load.py` ping-pong through each proxy to
`ws_echo.py`, and straight to it). Those rows also report the CPU the proxy used. The L4
rows (issue 11: "tcp bulk", "tcp connect echo") put a tcp listener next to HAProxy in mode
tcp (`l4_bench.py`). The run ends with the targets of issues 5, 9 and 11, PASS/FAIL.

    python bench/run.py                      # 3 rounds of 10 s per scenario and proxy
    python bench/run.py --rounds 5 --duration 20s --workers 1
    python bench/run.py --bastion "PYTHONPATH=/tmp/wt/src python -m bastion" --soak 0
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import selectors
import shlex
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import l4_bench

ROOT = Path(__file__).resolve().parent.parent
PROXIES = ("bastion", "nginx")
MB = 1024 * 1024  # memory is reported in MiB, written "MB"
SOAK_SAMPLE = 5.0  # seconds between RSS samples in the soak
SOAK_WARMUP = 10.0  # soak growth is counted from the first sample at or after this
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Bastion's TLS 1.2 suites (docs/tls.md), given to nginx too; TLS 1.3 keeps OpenSSL's suites on both.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL"
WS_MESSAGE = 32  # payload bytes of each WebSocket message


@dataclass(frozen=True)
class Scenario:
    """One row of the table. The extra fields make Bastion and nginx do the same extra work."""

    name: str
    connections: int
    # "throughput": compare rps; "latency": compare p50 (and show direct); "idle": RSS with
    # `connections` idle keep-alive clients; "soak": Bastion's RSS during one long wrk run;
    # "handshakes": new TLS connections/s from `connections` s_time clients; "websocket":
    # echo messages/s over `connections` WebSockets (and direct to the echo origin); "h2":
    # requests/s from h2load over HTTP/2 (TLS, ALPN h2), `streams` at once per connection
    kind: str = "throughput"
    tls: bool = False  # clients speak HTTPS to the proxies (the run's certificate)
    path: str = "/plain"
    route_plugins: list[dict[str, Any]] = field(default_factory=list)
    global_plugins: list[dict[str, Any]] = field(default_factory=list)
    consumers: list[dict[str, Any]] = field(default_factory=list)
    wrk_headers: list[str] = field(default_factory=list)
    nginx_location: str = ""  # extra directives in nginx's proxy `location /`
    nginx_http: str = ""  # extra directives in nginx's `http` block (e.g. limit_req_zone)
    keepalive: float = 0.0  # client keep-alive timeout in seconds for both proxies; 0: defaults
    streams: int = 0  # "h2": concurrent streams per connection (h2load -m)

    def plugins(self) -> list[str]:
        """Names of the plugins this row needs the gateway to have."""
        return [name for entry in [*self.global_plugins, *self.route_plugins] for name in entry]


PLAIN = Scenario("plain proxy", connections=64)

SCENARIOS: list[Scenario] = [
    PLAIN,
    Scenario("added latency", connections=1, kind="latency"),
    # Limits high enough that nothing is actually refused: the cost of the check is measured.
    Scenario(
        "rate_limit + headers",
        connections=64,
        route_plugins=[
            {"rate_limit": {"limit": 100_000_000, "per": "1m", "key": "ip"}},
            {"request_headers": {"set": {"X-Env": "bench"}}},
            {"response_headers": {"set": {"X-Frame-Options": "DENY"}, "remove": ["Server"]}},
        ],
        nginx_http="limit_req_zone $binary_remote_addr zone=bench:1m rate=10000000r/s;",
        nginx_location="limit_req zone=bench burst=1000000 nodelay; proxy_set_header X-Env bench; "
        "add_header X-Frame-Options DENY; proxy_hide_header Server;",
    ),
    Scenario(
        "key_auth + rate_limit",
        connections=64,
        route_plugins=[{"key_auth": {}}, {"rate_limit": {"limit": 100_000_000, "per": "1m", "key": "consumer"}}],
        consumers=[{"name": "bench", "credentials": {"key_auth": [{"key": "bench-key"}]}}],
        wrk_headers=["X-Api-Key: bench-key"],
        nginx_http='map $http_x_api_key $bench_ok { "bench-key" 1; default 0; }\n'
        "limit_req_zone $http_x_api_key zone=bench:1m rate=10000000r/s;",
        nginx_location="if ($bench_ok = 0) { return 401; } limit_req zone=bench burst=1000000 nodelay;",
    ),
    # Issue 9. TLS 1.3 with the same ECDSA P-256 certificate on both proxies.
    Scenario("https keep-alive", connections=64, tls=True),
    # Issue 10. HTTP/2 over TLS (ALPN h2) from h2load: 4 connections, 32 streams each.
    Scenario("http2 h2load", connections=4, kind="h2", tls=True, streams=32),
    # Each s_time client does one full handshake (no session reuse) and GET per connection.
    Scenario("tls handshakes", connections=16, kind="handshakes", tls=True),
    # 32-byte binary messages, one in flight per WebSocket.
    Scenario("websocket echo", connections=64, kind="websocket", path="/ws"),
    # `connections` is --idle-connections; keep-alive long enough that none expires meanwhile.
    Scenario("idle connections", connections=10_000, kind="idle", keepalive=600.0),
    # The length is --soak; the load is the plain-proxy row's.
    Scenario("soak", connections=PLAIN.connections, kind="soak"),
    # Issue 11, against HAProxy in mode tcp (bench/l4_bench.py).
    Scenario("tcp bulk", connections=1, kind="tcp_bulk"),
    Scenario("tcp connect echo", connections=16, kind="tcp_connect"),
    # Issue 10: unary gRPC calls (h2load, one framed message) through Bastion (h2c both ways)
    # and straight to the grpcio origin; no nginx (bench/grpc_unary.py).
    Scenario("grpc unary", connections=4, kind="grpc"),
]
GRPC_STREAMS = 16  # calls in flight per connection on the grpc unary row


# --- tools -----------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def ensure_tools() -> dict[str, str]:
    """nginx, wrk, taskset, openssl, h2load and haproxy, installed with apt-get (non-interactive) when missing."""
    packages = {
        "nginx": "nginx",
        "wrk": "wrk",
        "taskset": "util-linux",
        "openssl": "openssl",
        "h2load": "nghttp2-client",
        "haproxy": "haproxy",
    }
    missing = [pkg for tool, pkg in packages.items() if find_tool(tool) is None]
    if missing:
        if shutil.which("apt-get") is None:
            sys.exit(f"bench: missing {', '.join(missing)} and no apt-get to install them")
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        print(f"bench: installing {' '.join(missing)} with apt-get", flush=True)
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    tools = {tool: find_tool(tool) for tool in packages}
    absent = [tool for tool, path in tools.items() if path is None]
    if absent:
        sys.exit(f"bench: still missing after install: {', '.join(absent)}")
    return {tool: path for tool, path in tools.items() if path is not None}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(port: int, process: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    sys.exit(f"bench: {what} did not start listening on 127.0.0.1:{port}\n{tail}")


# --- the gateway under test --------------------------------------------------------------------


@dataclass(frozen=True)
class BastionCommand:
    """How to start Bastion: `--bastion "[NAME=value ...] COMMAND"`, e.g.
    `"PYTHONPATH=/tmp/wt/src python -m bastion"` to run a clean checkout."""

    argv: list[str]
    env: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> BastionCommand:
        words = shlex.split(text)
        env: dict[str, str] = {}
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        if not words:
            raise argparse.ArgumentTypeError(f"no command in {text!r}")
        return cls(words, env)

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def python(self) -> list[str] | None:
        """The interpreter that runs Bastion: `PYTHON -m bastion`, or a script's #! line."""
        if self.argv[-2:] == ["-m", "bastion"]:
            return self.argv[:-2]
        script = shutil.which(self.argv[0])
        if len(self.argv) == 1 and script:
            with contextlib.suppress(OSError, UnicodeDecodeError), open(script, encoding="utf-8") as file:
                first = file.readline()
                if first.startswith("#!"):
                    return shlex.split(first[2:])
        return None


PROBE = """
import json
out = {}
try:
    import bastion
    out["file"] = bastion.__file__
    import bastion.plugins
    out["plugins"] = [n for n in bastion.plugins.plugin_names() if bastion.plugins.plugin_class(n)]
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def probe_bastion(command: BastionCommand) -> dict[str, Any]:
    """Import `bastion.plugins` the way the gateway will: source file, plugins, commit or error."""
    python = command.python()
    if python is None:
        return {"error": f"cannot tell which Python runs {shlex.join(command.argv)!r}; use 'PYTHON -m bastion'"}
    try:
        done = subprocess.run(
            [*python, "-c", PROBE], capture_output=True, text=True, timeout=60, env=command.environ(), check=False
        )
        found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return {"error": f"probe failed: {exc}"}
    if "file" in found:
        source = Path(found["file"]).parent
        git = ["git", "-C", str(source)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True, check=False)
        if commit.returncode == 0:
            state = "modified" if dirty.stdout.strip() else "clean"
            found["commit"] = f"{commit.stdout.strip()} ({state} src)"
    return found


def missing_plugins(scenario: Scenario, probe: dict[str, Any]) -> list[str]:
    available = set(probe.get("plugins", []))
    return [name for name in scenario.plugins() if name not in available]


# --- resources of a process tree -------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (the workers of `bastion run --workers N`, nginx's worker)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def rss_bytes(pid: int) -> int:
    """Resident set size summed over the process tree (VmRSS of each, from /proc/PID/status)."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by the process tree (from /proc/PID/stat)."""
    ticks = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / CLOCK_TICKS


@dataclass(frozen=True)
class CpuUse:
    at: float  # time.monotonic()
    proxy: float  # CPU seconds of the proxy's process tree
    load: float  # CPU seconds of the load side: the origin's tree, and our finished children (the load tools)
    proxy_cpus: tuple[float, float]  # cpu_busy() of --proxy-cpus
    load_cpus: tuple[float, float]  # cpu_busy() of --load-cpus

    def since(self, before: CpuUse) -> dict[str, float]:
        """Shares of one CPU used meanwhile by the proxy (`cpu`) and the load side (`load_cpu`),
        and how busy the proxy's and the load's CPUs were with everything that ran on them."""
        elapsed = self.at - before.at
        shares = {"cpu": (self.proxy - before.proxy) / elapsed, "load_cpu": (self.load - before.load) / elapsed}
        for name, now, then in (
            ("proxy_cpus_busy", self.proxy_cpus, before.proxy_cpus),
            ("load_cpus_busy", self.load_cpus, before.load_cpus),
        ):
            shares[name] = (now[0] - then[0]) / max(1e-9, now[1] - then[1])
        return shares


def cpu_list(text: str) -> list[int]:
    """A taskset CPU list ("1", "0,2", "0-3") -> the CPU numbers."""
    cpus: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return cpus


def cpu_busy(cpus: list[int]) -> tuple[float, float]:
    """(busy, total) seconds of these CPUs since boot, whoever ran on them (/proc/stat): on a
    shared machine, busy minus our processes' share is what other work took from the run."""
    busy = total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy / CLOCK_TICKS, total / CLOCK_TICKS


def cpu_use(proxy: int | None, origin: int, args: argparse.Namespace) -> CpuUse:
    """A snapshot to subtract from a later one. The load tools (wrk, s_time, ws_load.py) are
    children of this process, counted by RUSAGE_CHILDREN once they have exited; the proxies
    and origins are reaped only at the end, so they never count there."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = children.ru_utime + children.ru_stime + cpu_seconds(origin)
    proxy_cpus, load_cpus = cpu_busy(cpu_list(args.proxy_cpus)), cpu_busy(cpu_list(args.load_cpus))
    return CpuUse(time.monotonic(), cpu_seconds(proxy) if proxy else 0.0, load, proxy_cpus, load_cpus)


def open_files_limit(pid: int) -> str:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return line.split()[3]
    return "unknown"


def raise_open_files(needed: int) -> Callable[[], None]:
    """A preexec_fn: raise the soft RLIMIT_NOFILE of the child to `needed` (up to the hard limit).
    10,000 clients need more than 1024 fds; nginx does not raise its own limit."""

    def preexec() -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))

    return preexec


# --- the processes ---------------------------------------------------------------------------


NGINX_COMMON = """\
worker_processes 1;
pid {dir}/nginx.pid;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_timeout {keepalive}s;
    keepalive_requests 10000000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{body}
}}
"""

ORIGIN_HTTP = """\
    server {{
        listen 127.0.0.1:{port1};
        listen 127.0.0.1:{port2};
        location / {{ return 200 "hello"; }}
    }}"""

# The same request-side work Bastion does by contract (X-Forwarded-*, X-Request-Id, Host).
PROXY_HTTP = """\
    {http_extra}
    upstream origin {{
        server 127.0.0.1:{port1};
        server 127.0.0.1:{port2};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port}{ssl};
        {server_extra}
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            {connection}
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Request-Id $request_id;
            {location_extra}
        }}
    }}"""


# The TLS side of an https listener as Bastion has it (docs/tls.md): TLS 1.2 and 1.3, ECDHE with
# AEAD suites for 1.2, the server's order, no compression or renegotiation (nginx's defaults).
NGINX_TLS = """ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {ciphers};
        ssl_prefer_server_ciphers on;"""

NGINX_CONNECTION = 'proxy_set_header Connection "";'
NGINX_UPGRADE = 'proxy_set_header Upgrade $http_upgrade;\n            proxy_set_header Connection "upgrade";'


def bastion_config(
    port: int,
    admin_port: int,
    origin_ports: tuple[int, int],
    scenario: Scenario,
    certificate: tuple[Path, Path] | None = None,
) -> dict[str, Any]:
    route: dict[str, Any] = {"name": "bench", "upstream": "origin"}
    if scenario.route_plugins:
        route["plugins"] = scenario.route_plugins
    if scenario.kind == "websocket":
        route["websocket"] = True
    listener: dict[str, Any] = {"name": "bench", "bind": f"127.0.0.1:{port}"}
    if scenario.keepalive:
        listener["timeouts"] = {"keepalive": f"{scenario.keepalive:g}s"}
    if certificate is not None:
        cert, key = certificate
        listener["protocol"] = "https"
        listener["tls"] = {"certificates": [{"cert": str(cert), "key": str(key)}]}
    config: dict[str, Any] = {
        "version": 1,
        "listeners": [listener],
        "upstreams": {
            "origin": {
                "balance": "round_robin",
                "targets": [{"address": f"127.0.0.1:{p}"} for p in origin_ports],
            }
        },
        "routes": [route],
        "admin": {"bind": f"127.0.0.1:{admin_port}"},
        "log": {"access": False, "level": "warning"},
    }
    if scenario.global_plugins:
        config["plugins"] = scenario.global_plugins
    if scenario.consumers:
        config["consumers"] = scenario.consumers
    return config


class Stack:
    """The origins (nginx; the WebSocket echo origin and the certificate when a row needs them),
    nginx as proxy and Bastion, for one scenario; `close()` stops them all."""

    def __init__(self, tools: dict[str, str], workdir: Path, args: argparse.Namespace) -> None:
        self.tools = tools
        self.workdir = workdir
        self.args = args
        self.origins: list[subprocess.Popen[bytes]] = []
        self.processes: list[subprocess.Popen[bytes]] = []  # the proxies of the current row
        self.origin_ports = (free_port(), free_port())
        self.ws_origin_ports: tuple[int, int] | None = None
        self.certificate: tuple[Path, Path] | None = None
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}
        self.tls_seen: dict[str, str] = {}  # proxy -> the TLS version and suite it negotiated
        self.origin_pids: dict[str, int] = {}  # "http" (nginx) and "websocket" (ws_echo.py)

    def _spawn(
        self,
        name: str,
        cpus: str,
        command: list[str],
        env: dict[str, str] | None = None,
        open_files: int = 0,
        origin: bool = False,
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [self.tools["taskset"], "-c", cpus, *command],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches only us; we stop the children in close()
                preexec_fn=raise_open_files(open_files) if open_files else None,
            )
        (self.origins if origin else self.processes).append(process)
        return process, log

    def _nginx(self, name: str, cpus: str, body: str, port: int, scenario: Scenario | None = None) -> int:
        directory = self.workdir / name
        directory.mkdir(exist_ok=True)
        conf = directory / "nginx.conf"
        clients = scenario.connections if scenario else 0
        keepalive = scenario.keepalive if scenario and scenario.keepalive else 120.0
        conf.write_text(
            NGINX_COMMON.format(
                dir=directory, body=body, worker_connections=max(4096, 2 * clients + 1024), keepalive=f"{keepalive:g}"
            )
        )
        command = [self.tools["nginx"], "-p", str(directory), "-e", "stderr", "-c", str(conf), "-g", "daemon off;"]
        process, log = self._spawn(name, cpus, command, open_files=open_files_needed(clients), origin=scenario is None)
        wait_listening(port, process, name, log)
        return process.pid

    def start_origin(self) -> None:
        port1, port2 = self.origin_ports
        body = ORIGIN_HTTP.format(port1=port1, port2=port2)
        self.origin_pids["http"] = self._nginx("origin", self.args.load_cpus, body, port1)

    def start_ws_origin(self) -> tuple[int, int]:
        """`ws_echo.py` on two ports, pinned with the load; started by the first WebSocket row."""
        if self.ws_origin_ports is None:
            ports = (free_port(), free_port())
            command = [sys.executable, str(ROOT / "bench" / "ws_echo.py"), "--port", str(ports[0])]
            command += ["--port", str(ports[1])]
            process, log = self._spawn("ws-origin", self.args.load_cpus, command, origin=True)
            wait_listening(ports[0], process, "ws-origin", log)
            self.origin_pids["websocket"] = process.pid
            self.ws_origin_ports = ports
        return self.ws_origin_ports

    def make_certificate(self) -> tuple[Path, Path]:
        """One self-signed ECDSA P-256 certificate for the run (for 127.0.0.1 and localhost),
        served by both proxies."""
        if self.certificate is None:
            cert, key = self.workdir / "bench-cert.pem", self.workdir / "bench-key.pem"
            command = [self.tools["openssl"], "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
            command += ["-nodes", "-days", "2", "-subj", "/CN=localhost"]
            command += ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"bench: openssl could not make the certificate: {done.stderr.strip()}")
            self.certificate = (cert, key)
        return self.certificate

    def upstream_ports(self, scenario: Scenario) -> tuple[int, int]:
        return self.start_ws_origin() if scenario.kind == "websocket" else self.origin_ports

    def origin_pid(self, scenario: Scenario) -> int:
        return self.origin_pids["websocket" if scenario.kind == "websocket" else "http"]

    def start_proxies(self, scenario: Scenario, proxies: tuple[str, ...] = PROXIES) -> None:
        """Start the proxies of this row (`pids`, `ports`), and check each answers `200 hello`
        (or, on a WebSocket row, upgrades and echoes)."""
        port1, port2 = upstream = self.upstream_ports(scenario)
        certificate = self.make_certificate() if scenario.tls else None
        if "nginx" in proxies:
            self.ports["nginx"] = free_port()
            server_extra = ""
            if certificate is not None:
                server_extra = NGINX_TLS.format(cert=certificate[0], key=certificate[1], ciphers=TLS12_CIPHERS)
            body = PROXY_HTTP.format(
                port=self.ports["nginx"],
                # nginx 1.22 switches HTTP/2 on in `listen` (1.25 has an `http2 on;` directive)
                ssl=(" ssl http2" if scenario.kind == "h2" else " ssl") if certificate else "",
                server_extra=server_extra,
                connection=NGINX_UPGRADE if scenario.kind == "websocket" else NGINX_CONNECTION,
                port1=port1,
                port2=port2,
                http_extra=scenario.nginx_http,
                location_extra=scenario.nginx_location,
            )
            name = f"nginx-{slug(scenario.name)}"
            self.pids["nginx"] = self._nginx(name, self.args.proxy_cpus, body, self.ports["nginx"], scenario)

        if "bastion" in proxies:
            self.ports["bastion"] = free_port()
            config = bastion_config(self.ports["bastion"], free_port(), upstream, scenario, certificate)
            path = self.workdir / f"bastion-{slug(scenario.name)}.json"
            path.write_text(json.dumps(config, indent=2))
            bastion: BastionCommand = self.args.bastion
            command = [*bastion.argv, "run", str(path)]
            if self.args.workers is not None:
                command += ["--workers", str(self.args.workers)]
            process, log = self._spawn(
                f"bastion-{slug(scenario.name)}",
                self.args.proxy_cpus,
                command,
                env=bastion.environ(),
                open_files=open_files_needed(scenario.connections),
            )
            wait_listening(self.ports["bastion"], process, "bastion", log)
            self.pids["bastion"] = process.pid

        self.tls_seen.clear()
        for proxy in proxies:
            if scenario.kind == "websocket":
                check_websocket(proxy, self.ports[proxy], scenario.path)
            elif certificate is not None:
                self.tls_seen[proxy] = check_answers_tls(proxy, self.ports[proxy], scenario, certificate[0])
                print(f"  {proxy:8} {self.tls_seen[proxy]}", flush=True)
            else:
                check_answers(proxy, self.ports[proxy], scenario)

    def alive(self, proxy: str) -> bool:
        return any(p.pid == self.pids[proxy] and p.poll() is None for p in self.processes)

    def stop_proxies(self) -> None:
        for process in self.processes:
            stop(process)
        self.processes = []
        self.ports.clear()
        self.pids.clear()

    def close(self) -> None:
        for process in reversed([*self.origins, *self.processes]):
            stop(process)
        self.origins, self.processes = [], []


def open_files_needed(clients: int) -> int:
    """File descriptors for `clients` client connections, as many upstream ones, and slack;
    0 (leave the limit alone) for the ordinary rows."""
    return 2 * clients + 1024 if clients > 1000 else 0


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def check_answers(proxy: str, port: int, scenario: Scenario) -> None:
    """One request before measuring: a proxy that answers errors would win every race."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers = dict(h.split(": ", 1) for h in scenario.wrk_headers)
    conn.request("GET", scenario.path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    if response.status != 200 or body != b"hello":
        sys.exit(f"bench: {proxy} answered {response.status} {body[:200]!r} to GET {scenario.path}")


def check_answers_tls(proxy: str, port: int, scenario: Scenario, cafile: Path) -> str:
    """The same check over TLS, verifying the run's certificate, with the request s_time sends
    (HTTP/1.0, see `s_time_page`), so every TLS row is checked with it.
    -> what was negotiated, e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384" """
    context = ssl.create_default_context(cafile=str(cafile))
    headers = "".join(f"{h}\r\n" for h in scenario.wrk_headers)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        conn.sendall(f"GET {s_time_page(scenario.path)} HTTP/1.0\r\n{headers}\r\n".encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        version, cipher = conn.version(), conn.cipher()
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")) or body != b"hello":
        sys.exit(f"bench: {proxy} answered {answer[:300]!r} to GET {scenario.path} over TLS")
    return f"{version} {cipher[0] if cipher else '?'}"


def check_websocket(proxy: str, port: int, path: str) -> None:
    """One WebSocket handshake and one echoed message through `proxy`, before measuring."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    message = os.urandom(WS_MESSAGE)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key.decode()}\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := conn.recv(65536)):
            answer += chunk
        head, _, rest = answer.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101") or accept not in head:
            sys.exit(f"bench: {proxy} answered {head[:300]!r} to a WebSocket handshake on {path}")
        conn.sendall(bytes((0x82, 0x80 | WS_MESSAGE)) + b"\0\0\0\0" + message)
        expected = bytes((0x82, WS_MESSAGE)) + message
        while len(rest) < len(expected) and (chunk := conn.recv(65536)):
            rest += chunk
        if rest != expected:
            sys.exit(f"bench: {proxy} did not echo a WebSocket message: {rest[:100]!r}")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --- wrk ---------------------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_REQUESTS = re.compile(r"^\s*(\d+) requests in", re.MULTILINE)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_wrk(output: str) -> dict[str, float]:
    """wrk --latency output -> rps, p50/p75/p90/p99 in ms, requests, errors."""
    rps = _RPS.search(output)
    if rps is None:
        raise ValueError(f"no Requests/sec in wrk output:\n{output}")
    result = {"rps": float(rps.group(1))}
    for percent, value, unit in _PERCENTILE.findall(output):
        result[f"p{percent}"] = float(value) * _UNITS[unit]
    requests = _REQUESTS.search(output)
    result["requests"] = float(requests.group(1)) if requests else 0.0
    socket_errors = _SOCKET_ERRORS.search(output)
    non_2xx = _NON_2XX.search(output)
    result["errors"] = float(sum(map(int, socket_errors.groups())) if socket_errors else 0) + float(
        int(non_2xx.group(1)) if non_2xx else 0
    )
    return result


def run_wrk(tools: dict[str, str], cpus: str, port: int, scenario: Scenario, seconds: float) -> dict[str, float]:
    command = [tools["taskset"], "-c", cpus, tools["wrk"], "-t1", f"-c{scenario.connections}"]
    command += [f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "5s"]
    for header in scenario.wrk_headers:
        command += ["-H", header]
    scheme = "https" if scenario.tls else "http"
    command.append(f"{scheme}://127.0.0.1:{port}{scenario.path}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


_S_TIME = re.compile(r"^(\d+) connections in [\d.]+s;", re.MULTILINE)


def s_time_page(path: str) -> str:
    """s_time sends `GET {page} HTTP/1.0` and nothing else; a request without Host reaches the
    origin without one through both proxies, and the origin refuses it. So the page carries a
    Host line, and the trailing " HTTP/1.0" lands in the value of a dummy field."""
    return f"{path} HTTP/1.0\r\nHost: localhost\r\nX-Bench: s_time"


def run_s_time(tools: dict[str, str], cpus: str, port: int, scenario: Scenario, seconds: float) -> dict[str, float]:
    """`scenario.connections` `openssl s_time -new` clients at once, each doing, one after the
    other, connect + full TLS handshake (no session reuse) + `GET path HTTP/1.0` + close.
    wrk cannot do this: it resumes the session on every reconnect. -> rps = handshakes/s."""
    command = [tools["taskset"], "-c", cpus, tools["openssl"], "s_time", "-connect", f"127.0.0.1:{port}"]
    command += ["-new", "-time", str(max(1, round(seconds))), "-www", s_time_page(scenario.path)]
    command += ["-no-CApath", "-no-CAfile", "-no-CAstore"]  # nothing to verify against: no lookups
    started = time.monotonic()
    clients = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(scenario.connections)
    ]
    handshakes, errors = 0, 0
    for client in clients:
        try:
            output, _ = client.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            client.kill()
            output, _ = client.communicate()
        done = _S_TIME.search(output)
        handshakes += int(done.group(1)) if done else 0
        errors += 1 if client.returncode or done is None else 0  # s_time stops at its first failure
    elapsed = time.monotonic() - started
    return {"rps": handshakes / elapsed, "requests": float(handshakes), "errors": float(errors)}


def run_ws_load(tools: dict[str, str], cpus: str, port: int, scenario: Scenario, seconds: float) -> dict[str, float]:
    """`ws_load.py`: `scenario.connections` WebSockets doing ping-pong -> rps = messages/s."""
    command = [tools["taskset"], "-c", cpus, sys.executable, str(ROOT / "bench" / "ws_load.py"), "--port", str(port)]
    command += ["--path", scenario.path, "--connections", str(scenario.connections)]
    command += ["--duration", f"{seconds:g}", "--size", str(WS_MESSAGE)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"ws_load.py failed ({done.returncode}): {done.stderr[-2000:]}") from None
    if result["error_kinds"]:
        print(f"    ws_load errors: {result['error_kinds']}", flush=True)
    return {
        "rps": result["rate"],
        "p50": result["p50"],
        "p99": result["p99"],
        "requests": float(result["messages"]),
        "errors": float(result["errors"]),
    }


_H2LOAD_RATE = re.compile(r"finished in [\d.]+s, ([\d.]+) req/s")
_H2LOAD_REQUESTS = re.compile(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed")
_H2LOAD_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_H2LOAD_TIME = re.compile(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)")


def run_h2load(tools: dict[str, str], cpus: str, port: int, scenario: Scenario, seconds: float) -> dict[str, float]:
    """h2load over TLS: `connections` HTTP/2 connections, `streams` requests in flight on each,
    for `seconds`. -> rps, mean request time (h2load prints no percentiles), requests, errors.
    A run that did not negotiate h2 is an error (it would measure HTTP/1.1)."""
    command = [tools["taskset"], "-c", cpus, tools["h2load"], "-t1", f"-c{scenario.connections}"]
    command += [f"-m{scenario.streams}", f"-D{max(1, round(seconds))}", f"https://127.0.0.1:{port}{scenario.path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=False)
    output = done.stdout
    rate, requests, status = _H2LOAD_RATE.search(output), _H2LOAD_REQUESTS.search(output), _H2LOAD_STATUS.search(output)
    if done.returncode != 0 or rate is None or requests is None or status is None:
        raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr or output}")
    if "Application protocol: h2" not in output:
        raise RuntimeError(f"h2load did not negotiate h2:\n{output}")
    result = {"rps": float(rate.group(1)), "requests": float(requests.group(2))}
    result["errors"] = float(int(requests.group(4)) + sum(int(n) for n in status.groups()[1:]))
    took = _H2LOAD_TIME.search(output)
    if took is not None:  # e.g. 3.54ms, 812us, 1.02s
        number, unit = re.fullmatch(r"([\d.]+)([a-z]+)", took.group(3)).groups()  # type: ignore[union-attr]
        result["mean_ms"] = float(number) * _UNITS[unit]
    return result


def run_load(tools: dict[str, str], cpus: str, port: int, scenario: Scenario, seconds: float) -> dict[str, float]:
    """One measured run of the row's load generator against `port`."""
    if scenario.kind == "h2":
        return run_h2load(tools, cpus, port, scenario, seconds)
    if scenario.kind == "handshakes":
        return run_s_time(tools, cpus, port, scenario, seconds)
    if scenario.kind == "websocket":
        return run_ws_load(tools, cpus, port, scenario, seconds)
    return run_wrk(tools, cpus, port, scenario, seconds)


# --- rounds and the report -------------------------------------------------------------------


def parse_seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 10s)")
    return float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]


def contenders(scenario: Scenario) -> list[str]:
    """Who is measured: both proxies, and the origin straight (`direct`) on latency and
    WebSocket rows (for the WebSocket row, the rate the load side manages on its own CPU)."""
    return [*PROXIES, "direct"] if scenario.kind in ("latency", "websocket") else list(PROXIES)


def measure_rounds(tools: dict[str, str], stack: Stack, scenario: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    """Throughput, latency, handshake and WebSocket rows: alternating rounds of the row's load
    generator, medians per contender. `cpu` is the share of one CPU the proxy used meanwhile."""
    stack.start_proxies(scenario)
    ports = {**stack.ports, "direct": stack.upstream_ports(scenario)[0]}
    for proxy in PROXIES:  # warm up pools, caches and branch predictors before anything counts
        run_load(tools, args.load_cpus, ports[proxy], scenario, args.warmup)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in contenders(scenario)}
    for round_index in range(args.rounds):
        order = contenders(scenario)
        if round_index % 2:
            order = [order[1], order[0], *order[2:]]
        for name in order:
            pid = stack.pids.get(name)
            before = cpu_use(pid, stack.origin_pid(scenario), args)
            result = run_load(tools, args.load_cpus, ports[name], scenario, args.duration)
            shares = cpu_use(pid, stack.origin_pid(scenario), args).since(before)
            if not pid:
                del shares["cpu"]
            elif shares["cpu"] > 0:  # steadier than rps on a busy machine: see report_tls_websocket
                shares["per_cpu_s"] = result["rps"] / shares["cpu"]
            result.update(shares)
            runs[name].append(result)
            latency = f"  p50 {result['p50']:7.3f} ms  p99 {result['p99']:7.3f} ms" if "p50" in result else ""
            cpu = f"  proxy cpu {result['cpu']:4.0%}" if "cpu" in result else ""
            print(
                f"  round {round_index + 1} {name:8} rps {result['rps']:>9.0f}{latency}{cpu}"
                f"  load cpu {result['load_cpu']:4.0%}  (cpus busy: proxy {result['proxy_cpus_busy']:4.0%},"
                f" load {result['load_cpus_busy']:4.0%})  errors {result['errors']:.0f}",
                flush=True,
            )
            time.sleep(0.5)
    medians = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]} for name, results in runs.items()
    }
    entry: dict[str, Any] = {"scenario": asdict(scenario), "runs": runs, "medians": medians}
    if stack.tls_seen:
        entry["tls"] = dict(stack.tls_seen)
    return entry


class LineReader:
    """JSON lines from a child's stdout, each awaited with a deadline."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        self.fd = process.stdout.fileno()
        self.buffer = b""

    def read(self, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select_readable(self.fd, remaining):
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message


def select_readable(fd: int, timeout: float) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        return bool(selector.select(timeout))


def hold_idle(stack: Stack, proxy: str, scenario: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    """Open `scenario.connections` idle keep-alive clients to `proxy` from a separate process,
    then read the proxy's RSS (summed over its processes) while they are held."""
    pid = stack.pids[proxy]
    result: dict[str, Any] = {"rss_before": rss_bytes(pid), "processes": len(process_tree(pid))}
    result["open_files_limit"] = open_files_limit(pid)
    command = [stack.tools["taskset"], "-c", args.load_cpus, sys.executable, str(ROOT / "bench" / "idle_clients.py")]
    command += ["--port", str(stack.ports[proxy]), "--connections", str(scenario.connections), "--batch", "500"]
    command += ["--path", scenario.path, "--timeout", f"{args.idle_timeout:g}"]
    for header in scenario.wrk_headers:
        command += ["--header", header]
    client = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert client.stdin is not None
    lines = LineReader(client)
    try:
        opened = lines.read(args.idle_timeout + 15)
        if opened is None:
            result["error"] = "the client process did not report (crashed or timed out)"
            return result
        result.update({key: opened[key] for key in ("opened", "failed", "seconds", "errors")})
        time.sleep(2.0)  # let the proxy settle (timers, pools) before reading its memory
        result["rss_with"] = rss_bytes(pid)
        client.stdin.write(b"check\n")
        client.stdin.flush()
        checked = lines.read(30) or {}
        result["open"] = checked.get("open", 0)
        result["dropped"] = checked.get("dropped", result["opened"])
        result["alive"] = stack.alive(proxy)
        return result
    finally:
        with contextlib.suppress(OSError):
            client.stdin.write(b"close\n")
            client.stdin.close()
        try:
            client.wait(timeout=30)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait()
        stderr = client.stderr.read().decode(errors="replace") if client.stderr else ""
        if client.returncode and stderr:
            result.setdefault("error", stderr.strip()[-500:])


def measure_idle(tools: dict[str, str], stack: Stack, scenario: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    stack.start_proxies(scenario)
    held = {}
    for proxy in PROXIES:
        held[proxy] = entry = hold_idle(stack, proxy, scenario, args)
        if "rss_with" in entry:
            print(
                f"  {proxy:8} {entry['opened']} connections opened in {entry['seconds']:.1f} s"
                f" ({entry['failed']} failed), {entry['open']} still open; RSS {entry['rss_before'] / MB:.1f} MB"
                f" before, {entry['rss_with'] / MB:.1f} MB with them",
                flush=True,
            )
        else:
            print(f"  {proxy:8} failed: {entry.get('error')}", flush=True)
        time.sleep(1.0)
    return {"scenario": asdict(scenario), "idle": held}


def measure_soak(tools: dict[str, str], stack: Stack, scenario: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    """One long wrk run against Bastion alone; its RSS every `SOAK_SAMPLE` seconds."""
    stack.start_proxies(scenario, proxies=("bastion",))
    pid, seconds = stack.pids["bastion"], max(1, round(args.soak))
    command = [tools["taskset"], "-c", args.load_cpus, tools["wrk"], "-t1", f"-c{scenario.connections}"]
    command += [f"-d{seconds}s", "--latency", "--timeout", "5s"]
    for header in scenario.wrk_headers:
        command += ["-H", header]
    command.append(f"http://127.0.0.1:{stack.ports['bastion']}{scenario.path}")
    started = time.monotonic()
    samples: list[tuple[float, int]] = []
    wrk = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        next_sample = started
        while wrk.poll() is None and time.monotonic() < started + seconds + 30:
            now = time.monotonic()
            if now >= next_sample:
                samples.append((round(now - started, 1), rss_bytes(pid)))
                print(f"  {now - started:5.1f} s  RSS {samples[-1][1] / MB:6.1f} MB", flush=True)
                next_sample += SOAK_SAMPLE
            time.sleep(min(0.2, max(0.0, next_sample - time.monotonic())))
        output, errors = wrk.communicate(timeout=30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    samples.append((round(time.monotonic() - started, 1), rss_bytes(pid)))
    if wrk.returncode != 0:
        raise RuntimeError(f"wrk failed ({wrk.returncode}): {errors or output}")
    result: dict[str, Any] = {**parse_wrk(output)}
    alive = stack.alive("bastion")
    if alive:
        check_answers("bastion", stack.ports["bastion"], scenario)
    warmup = min(SOAK_WARMUP, seconds / 2)  # a short --soak still has something to compare
    warm = next((rss for at, rss in samples if at >= warmup), samples[-1][1])
    end = samples[-1][1]
    result.update({"samples": samples, "rss_warm": warm, "rss_end": end, "rss_peak": max(r for _, r in samples)})
    result["alive"] = alive
    print(f"  rps {result['rps']:.0f}, errors {result['errors']:.0f}, RSS {warm / MB:.1f} -> {end / MB:.1f} MB")
    return {"scenario": asdict(scenario), "soak": result}


def measure_grpc(tools: dict[str, str], stack: Stack, scenario: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    """The grpc unary row: bench/grpc_unary.py's origin, gateway and h2load rounds."""
    import grpc_unary  # beside this script

    bastion: BastionCommand = args.bastion
    result = grpc_unary.measure(
        bastion.argv,
        bastion.environ(),
        args.proxy_cpus,
        args.load_cpus,
        args.rounds,
        args.duration,
        args.warmup,
        scenario.connections,
        GRPC_STREAMS,
        stack.workdir,
    )
    if "skipped" in result:
        return {"scenario": asdict(scenario), "skipped": result["skipped"]}
    return {"scenario": asdict(scenario), "grpc": result}


Measure = Callable[[dict[str, str], Stack, Scenario, argparse.Namespace], dict[str, Any]]
MEASURES: dict[str, Measure] = {
    "grpc": measure_grpc,
    "throughput": measure_rounds,
    "latency": measure_rounds,
    "handshakes": measure_rounds,
    "websocket": measure_rounds,
    "h2": measure_rounds,
    "idle": measure_idle,
    "soak": measure_soak,
    "tcp_bulk": lambda tools, stack, scenario, args: l4_bench.measure(
        tools,
        stack,
        scenario,
        args,
        {"free_port": free_port, "wait_listening": wait_listening, "cpu_seconds": cpu_seconds},
    ),
    "tcp_connect": lambda tools, stack, scenario, args: l4_bench.measure(
        tools,
        stack,
        scenario,
        args,
        {"free_port": free_port, "wait_listening": wait_listening, "cpu_seconds": cpu_seconds},
    ),
}


def tls_or_websocket(scenario: dict[str, Any]) -> bool:
    return bool(scenario["tls"]) or scenario["kind"] in ("handshakes", "websocket")


def report(results: list[dict[str, Any]]) -> str:
    """The plain HTTP wrk rows as a table; skipped rows say why."""
    header = ["scenario", "c", "proxy", "rps", "p50 ms", "p99 ms", "rps vs nginx", "p50 - nginx"]
    rows: list[list[str]] = []
    for entry in results:
        scenario = entry["scenario"]
        if scenario["kind"] not in ("throughput", "latency") or tls_or_websocket(scenario):
            continue
        if "skipped" in entry:
            rows.append([scenario["name"], str(scenario["connections"]), entry["skipped"], "", "", "", "", ""])
            continue
        medians = entry["medians"]
        nginx = medians["nginx"]
        for name, m in medians.items():
            rows.append(
                [
                    scenario["name"],
                    str(scenario["connections"]),
                    name,
                    f"{m['rps']:.0f}",
                    f"{m['p50']:.3f}",
                    f"{m['p99']:.3f}",
                    f"{m['rps'] / nginx['rps']:.2f}x",
                    f"{m['p50'] - nginx['p50']:+.3f} ms",
                ]
            )
    return table(header, rows) if rows else ""


UNITS = {"handshakes": "handshakes/s", "websocket": "messages/s"}


def report_tls_websocket(results: list[dict[str, Any]]) -> str:
    """The TLS and WebSocket rows: the rate, its ratio to nginx, the share of a CPU the proxy
    used, the rate per CPU-second of the proxy (median over the rounds) as a ratio to nginx's,
    and the share of a CPU the load side (load tool and origin) used.

    Per CPU-second is what the proxy costs per request, handshake or message, whether or not
    it was the limit. On a machine shared with other work, the rate moves with what the
    others leave to each run, while the cost per unit holds: that ratio is the steadier one."""
    header = [
        "scenario",
        "c",
        "proxy",
        "rate",
        "unit",
        "p50 ms",
        "p99 ms",
        "vs nginx",
        "proxy CPU",
        "per CPU-s vs nginx",
        "load CPU",
    ]
    rows: list[list[str]] = []
    for entry in results:
        scenario = entry["scenario"]
        if not tls_or_websocket(scenario):
            continue
        if "skipped" in entry:
            rows.append([scenario["name"], str(scenario["connections"]), entry["skipped"], *[""] * 8])
            continue
        medians = entry["medians"]
        nginx = medians["nginx"]
        for name, m in medians.items():
            cost = ""
            if "per_cpu_s" in m and "per_cpu_s" in nginx:
                cost = f"{m['per_cpu_s'] / nginx['per_cpu_s']:.2f}x"
            rows.append(
                [
                    scenario["name"],
                    str(scenario["connections"]),
                    name,
                    f"{m['rps']:.0f}",
                    UNITS.get(scenario["kind"], "requests/s"),
                    f"{m['p50']:.3f}" if "p50" in m else "",
                    f"{m['p99']:.3f}" if "p99" in m else "",
                    f"{m['rps'] / nginx['rps']:.2f}x",
                    f"{m['cpu']:.0%}" if "cpu" in m else "",
                    cost,
                    f"{m['load_cpu']:.0%}" if "load_cpu" in m else "",
                ]
            )
    return table(header, rows) if rows else ""


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join(lines)


def report_memory(results: list[dict[str, Any]]) -> str:
    lines = []
    for entry in results:
        name = entry["scenario"]["name"]
        if "skipped" in entry and entry["scenario"]["kind"] in ("idle", "soak"):
            lines.append(f"{name}: {entry['skipped']}")
        for proxy, held in entry.get("idle", {}).items():
            if "rss_with" not in held:
                lines.append(f"{name}, {proxy}: failed: {held.get('error')}")
                continue
            added = (held["rss_with"] - held["rss_before"]) / max(1, held["opened"])
            lines.append(
                f"{name}, {proxy}: {held['opened']} opened in {held['seconds']:.1f} s, {held['failed']} failed,"
                f" {held['open']} still open at the end; RSS {held['rss_before'] / MB:.1f} MB before,"
                f" {held['rss_with'] / MB:.1f} MB with them ({added / 1024:.1f} KB per connection);"
                f" {held['processes']} process(es), open files limit {held['open_files_limit']}"
                + (f"; errors {held['errors']}" if held["errors"] else "")
            )
        if "soak" in entry:
            soak = entry["soak"]
            samples = ", ".join(f"{at:.0f}s {rss / MB:.1f}" for at, rss in soak["samples"])
            growth = (soak["rss_end"] - soak["rss_warm"]) / MB
            lines.append(
                f"{name}: {entry['scenario']['connections']} connections for {soak['samples'][-1][0]:.0f} s:"
                f" {soak['rps']:.0f} rps, {soak['errors']:.0f} errors; RSS {soak['rss_warm'] / MB:.1f} MB after"
                f" warm-up, {soak['rss_end'] / MB:.1f} MB at the end ({growth:+.1f} MB),"
                f" peak {soak['rss_peak'] / MB:.1f} MB\n  RSS samples (MB): {samples}"
            )
    return "\n".join(lines)


# --- the targets of issues 5 and 9 ---------------------------------------------------------


def rps_ratio(entry: dict[str, Any]) -> tuple[float, bool]:
    medians = entry["medians"]
    return medians["bastion"]["rps"] / medians["nginx"]["rps"], not any(m["errors"] for m in medians.values())


def added_latency_us(entry: dict[str, Any]) -> tuple[float, bool]:
    medians = entry["medians"]
    clean = not any(m["errors"] for m in medians.values())
    return (medians["bastion"]["p50"] - medians["nginx"]["p50"]) * 1000, clean


def idle_rss_mb(entry: dict[str, Any]) -> tuple[float, bool]:
    held = entry["idle"]["bastion"]
    complete = "rss_with" in held and held["opened"] == entry["scenario"]["connections"] and not held["dropped"]
    return held.get("rss_with", 0) / MB, complete and held["alive"]


def soak_growth_mb(entry: dict[str, Any]) -> tuple[float, bool]:
    soak = entry["soak"]
    return (soak["rss_end"] - soak["rss_warm"]) / MB, not soak["errors"] and soak["alive"]


@dataclass(frozen=True)
class Target:
    scenario: str
    text: str
    value: Callable[[dict[str, Any]], tuple[float, bool]]  # -> measured, and whether the run was clean
    unit: str
    limit: Callable[[dict[str, Any]], float]
    at_least: bool = False  # the measured value must be >= limit (else <=)
    connections: int = 0  # the row must have run with at least this many connections to count


TARGETS = [
    Target("plain proxy", "plain proxy rps >= 0.30x nginx", rps_ratio, "x", lambda e: 0.30, at_least=True),
    Target("rate_limit + headers", "rate_limit + headers rps >= 0.20x nginx", rps_ratio, "x", lambda e: 0.20, True),
    Target("key_auth + rate_limit", "key_auth + rate_limit rps >= 0.20x nginx", rps_ratio, "x", lambda e: 0.20, True),
    Target("added latency", "added latency (c=1 p50 - nginx) <= 60 us", added_latency_us, " us", lambda e: 60.0),
    Target("https keep-alive", "https keep-alive rps >= 0.25x nginx", rps_ratio, "x", lambda e: 0.25, at_least=True),
    Target("http2 h2load", "http2 h2load rps >= 0.25x nginx", rps_ratio, "x", lambda e: 0.25, at_least=True),
    Target(
        "idle connections",
        "10,000 idle keep-alive connections in <= 100 MB RSS",
        idle_rss_mb,
        " MB",
        lambda e: 100.0,
        connections=10_000,
    ),
    Target("tcp bulk", "tcp bulk bytes/s >= 0.30x HAProxy", l4_bench.ratio, "x", lambda e: 0.30, at_least=True),
    Target("tcp connect echo", "tcp connect echo conn/s >= 0.30x HAProxy", l4_bench.ratio, "x", lambda e: 0.30, True),
    Target(
        "soak",
        "soak: no RSS growth after warm-up (<= max(5 MB, 5%)), no errors",
        soak_growth_mb,
        " MB",
        lambda e: max(5.0, 0.05 * e["soak"]["rss_warm"] / MB),
    ),
]


def report_targets(results: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """The targets table, and the verdict of each (PASS, FAIL or SKIP)."""
    by_name = {entry["scenario"]["name"]: entry for entry in results}
    rows, verdicts = [], []
    for target in TARGETS:
        entry = by_name.get(target.scenario)
        if entry is None or "skipped" in entry:
            reason = entry["skipped"] if entry else "not run"
            rows.append([target.text, reason, "SKIP"])
            verdicts.append("SKIP")
            continue
        if entry["scenario"]["connections"] < target.connections:
            rows.append(
                [target.text, f"not comparable: ran with {entry['scenario']['connections']} connections", "SKIP"]
            )
            verdicts.append("SKIP")
            continue
        try:
            value, clean = target.value(entry)
        except (KeyError, ZeroDivisionError) as exc:
            rows.append([target.text, f"no measurement ({exc})", "FAIL"])
            verdicts.append("FAIL")
            continue
        limit = target.limit(entry)
        within = value >= limit if target.at_least else value <= limit
        digits = 2 if target.unit == "x" else 1
        measured = f"{value:.{digits}f}{target.unit} (limit {limit:.{digits}f}{target.unit})"
        if target.scenario == "idle connections":
            measured += f" for {entry['idle']['bastion'].get('open', 0)} connections"
        if not clean:
            measured += "; errors, dropped connections or a dead gateway"
        verdict = "PASS" if within and clean else "FAIL"
        rows.append([target.text, measured, verdict])
        verdicts.append(verdict)
    return table(["target", "measured", "result"], rows), verdicts


def machine(tools: dict[str, str]) -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nginx = subprocess.run([tools["nginx"], "-v"], capture_output=True, text=True, check=False).stderr.strip()
    wrk = subprocess.run([tools["wrk"], "-v"], capture_output=True, text=True, check=False).stdout.splitlines()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} CPUs",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": nginx.removeprefix("nginx version: "),
        "wrk": wrk[0].split(" [")[0] if wrk else "unknown",
    }


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"bench: configs and logs kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def select_scenarios(args: argparse.Namespace) -> list[Scenario]:
    """The rows to run, with the command-line sizes applied."""
    chosen = []
    for scenario in SCENARIOS:
        if args.only and scenario.name not in args.only:
            continue
        if scenario.kind == "idle":
            if not args.idle_connections:
                continue
            scenario = replace(scenario, connections=args.idle_connections)
        if scenario.kind == "soak" and not args.soak:
            continue
        chosen.append(scenario)
    return chosen


def planned_seconds(scenarios: list[Scenario], args: argparse.Namespace) -> float:
    total = 0.0
    for scenario in scenarios:
        if scenario.kind == "idle":
            total += 2 * 15  # opening 10,000 connections takes seconds; --idle-timeout bounds it
        elif scenario.kind == "soak":
            total += args.soak
        else:
            total += len(contenders(scenario)) * args.rounds * args.duration + 2 * args.warmup
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per scenario (default 3)")
    parser.add_argument("--duration", type=parse_seconds, default=10.0, help="wrk run length (default 10s)")
    parser.add_argument("--warmup", type=parse_seconds, default=2.0, help="unmeasured run per proxy (default 2s)")
    parser.add_argument("--workers", type=int, default=None, help="bastion run --workers N")
    parser.add_argument("--only", action="append", default=[], help="run only this scenario (repeatable)")
    parser.add_argument("--proxy-cpus", default="0", help="taskset CPU list for the proxies (default 0)")
    parser.add_argument("--load-cpus", default="1", help="taskset CPU list for origin and wrk (default 1)")
    parser.add_argument(
        "--bastion",
        type=BastionCommand.parse,
        default=BastionCommand([sys.executable, "-m", "bastion"], {}),
        metavar="CMD",
        help="command that starts bastion, with optional NAME=value prefixes, e.g. "
        "'PYTHONPATH=/tmp/wt/src python -m bastion' (default: this Python, -m bastion)",
    )
    parser.add_argument(
        "--idle-connections", type=int, default=10_000, help="idle keep-alive clients (default 10000; 0 skips)"
    )
    parser.add_argument(
        "--idle-timeout", type=parse_seconds, default=60.0, help="give up opening them after (default 60s)"
    )
    parser.add_argument("--soak", type=parse_seconds, default=60.0, help="soak length (default 60s; 0 skips)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target fails")
    parser.add_argument("--json", type=Path, default=None, help="also write raw results here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with configs and logs")
    args = parser.parse_args(argv)

    scenarios = select_scenarios(args)
    if not scenarios:
        parser.error(f"no scenario named {args.only}; known: {', '.join(s.name for s in SCENARIOS)}")
    tools = ensure_tools()
    info = machine(tools)
    probe = probe_bastion(args.bastion)
    info["bastion"] = f"{shlex.join([*(f'{k}={v}' for k, v in args.bastion.env.items()), *args.bastion.argv])}"
    info["bastion source"] = f"{probe.get('file', '?')} at {probe.get('commit', 'unknown commit')}"
    print(f"bench: {', '.join(f'{k} {v}' for k, v in info.items())}")
    if "error" in probe:
        print(
            f"bench: WARNING: bastion.plugins does not import ({probe['error']}); plugin rows are skipped.\n"
            "bench: if the working tree is mid-edit, run a clean checkout instead:\n"
            "  git worktree add --detach /tmp/bench-wt HEAD\n"
            "  python bench/run.py --bastion 'PYTHONPATH=/tmp/bench-wt/src python -m bastion'",
            flush=True,
        )
    total = planned_seconds(scenarios, args)
    print(f"bench: {len(scenarios)} scenarios, about {total / 60:.1f} min of load", flush=True)

    results: list[dict[str, Any]] = []
    with workdir(args.keep) as directory:
        stack = Stack(tools, directory, args)
        try:
            stack.start_origin()
            for scenario in scenarios:
                missing = missing_plugins(scenario, probe)
                if missing:
                    plural = "s" if len(missing) > 1 else ""
                    skipped = f"skipped: plugin{plural} {', '.join(missing)} not available"
                    print(f"{scenario.name}: {skipped}", flush=True)
                    results.append({"scenario": asdict(scenario), "skipped": skipped})
                    continue
                print(f"{scenario.name} (c={scenario.connections})", flush=True)
                try:
                    results.append(MEASURES[scenario.kind](tools, stack, scenario, args))
                finally:
                    stack.stop_proxies()
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
            return 130
        finally:
            stack.close()

    plain = report(results)
    if plain:
        print()
        print(plain)
    tls_websocket = report_tls_websocket(results)
    if tls_websocket:
        print()
        print(tls_websocket)
        for entry in results:
            if "tls" in entry:
                seen = ", ".join(f"{proxy} {negotiated}" for proxy, negotiated in entry["tls"].items())
                print(f"{entry['scenario']['name']}: {seen}")
    l4 = l4_bench.report(results, table)
    if l4:
        print()
        print(l4)
    for entry in results:
        if "grpc" in entry:
            import grpc_unary

            print()
            print(grpc_unary.report(entry["grpc"]))
    memory = report_memory(results)
    if memory:
        print()
        print(memory)
    errors = [(e["scenario"]["name"], name) for e in results for name, m in e.get("medians", {}).items() if m["errors"]]
    if errors:
        print(f"\nWARNING: errors or non-2xx responses in {errors}: those numbers are not comparable")
    targets, verdicts = report_targets(results)
    print()
    print(targets)
    output = args.json or ROOT / "bench" / "results" / f"{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    raw = {"machine": info, "args": sys.argv[1:], "results": results, "targets": verdicts}
    output.write_text(json.dumps(raw, indent=2))
    print(f"\nraw results: {output}")
    return 1 if args.check and "FAIL" in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
