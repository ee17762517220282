#!/usr/bin/env python3
"""Bastion next to nginx, on loopback, in front of the same origin, loaded by wrk.

The origin is nginx itself answering `return 200 "hello"` on two ports, so it is never the
bottleneck. The proxy under test is pinned to one CPU, origin and wrk to another. Rounds
alternate the order of the proxies (bastion first, then nginx first, ...) so slow drift of
the machine does not favour either; each number reported is the median over the rounds.

Scenarios are data (`SCENARIOS`): a new row is a `Scenario(...)` with the plugins and
consumers to add to Bastion's config and the nginx directives that do the same work.

    python bench/run.py                      # 3 rounds of 10 s per scenario and proxy
    python bench/run.py --rounds 5 --duration 20s --workers 1
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROXIES = ("bastion", "nginx")


@dataclass(frozen=True)
class Scenario:
    """One row of the table. The extra fields make Bastion and nginx do the same extra work."""

    name: str
    connections: int
    kind: str = "throughput"  # "throughput": compare rps; "latency": compare p50 (and show direct)
    path: str = "/plain"
    route_plugins: list[dict[str, Any]] = field(default_factory=list)
    global_plugins: list[dict[str, Any]] = field(default_factory=list)
    consumers: list[dict[str, Any]] = field(default_factory=list)
    wrk_headers: list[str] = field(default_factory=list)
    nginx_location: str = ""  # extra directives in nginx's proxy `location /`
    nginx_http: str = ""  # extra directives in nginx's `http` block (e.g. limit_req_zone)


SCENARIOS: list[Scenario] = [
    Scenario("plain proxy", connections=64),
    Scenario("added latency", connections=1, kind="latency"),
    # When the plugins exist, uncomment (limits high enough that nothing is actually refused):
    # Scenario(
    #     "rate_limit + headers",
    #     connections=64,
    #     route_plugins=[
    #         {"rate_limit": {"limit": 100_000_000, "per": "1m", "key": "ip"}},
    #         {"request_headers": {"set": {"X-Env": "bench"}}},
    #         {"response_headers": {"set": {"X-Frame-Options": "DENY"}, "remove": ["Server"]}},
    #     ],
    #     nginx_http="limit_req_zone $binary_remote_addr zone=bench:1m rate=10000000r/s;",
    #     nginx_location='limit_req zone=bench burst=1000000 nodelay; proxy_set_header X-Env bench; '
    #     'add_header X-Frame-Options DENY; proxy_hide_header Server;',
    # ),
    # Scenario(
    #     "key_auth + rate_limit",
    #     connections=64,
    #     route_plugins=[{"key_auth": {}}, {"rate_limit": {"limit": 100_000_000, "per": "1m", "key": "consumer"}}],
    #     consumers=[{"name": "bench", "credentials": {"key_auth": [{"key": "bench-key"}]}}],
    #     wrk_headers=["X-Api-Key: bench-key"],
    #     nginx_http='map $http_x_api_key $bench_ok { "bench-key" 1; default 0; }\n'
    #     "limit_req_zone $http_x_api_key zone=bench:1m rate=10000000r/s;",
    #     nginx_location="if ($bench_ok = 0) { return 401; } limit_req zone=bench burst=1000000 nodelay;",
    # ),
]


# --- tools -----------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def ensure_tools() -> dict[str, str]:
    """nginx, wrk and taskset, installed with apt-get (non-interactive) when missing."""
    packages = {"nginx": "nginx", "wrk": "wrk", "taskset": "util-linux"}
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


# --- the processes ---------------------------------------------------------------------------


NGINX_COMMON = """\
worker_processes 1;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_timeout 120s;
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
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Request-Id $request_id;
            {location_extra}
        }}
    }}"""


def bastion_config(port: int, admin_port: int, origin_ports: tuple[int, int], scenario: Scenario) -> dict[str, Any]:
    route: dict[str, Any] = {"name": "bench", "upstream": "origin"}
    if scenario.route_plugins:
        route["plugins"] = scenario.route_plugins
    config: dict[str, Any] = {
        "version": 1,
        "listeners": [{"name": "bench", "bind": f"127.0.0.1:{port}"}],
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
    """Origin nginx, nginx as proxy and Bastion, for one scenario; `close()` stops them all."""

    def __init__(self, tools: dict[str, str], workdir: Path, args: argparse.Namespace) -> None:
        self.tools = tools
        self.workdir = workdir
        self.args = args
        self.processes: list[subprocess.Popen[bytes]] = []
        self.origin_ports = (free_port(), free_port())
        self.ports: dict[str, int] = {}

    def _spawn(self, name: str, cpus: str, command: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [self.tools["taskset"], "-c", cpus, *command],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only us; we stop the children in close()
            )
        self.processes.append(process)
        return process, log

    def _nginx(self, name: str, cpus: str, body: str, port: int) -> None:
        directory = self.workdir / name
        directory.mkdir(exist_ok=True)
        conf = directory / "nginx.conf"
        conf.write_text(NGINX_COMMON.format(dir=directory, body=body))
        command = [self.tools["nginx"], "-p", str(directory), "-e", "stderr", "-c", str(conf), "-g", "daemon off;"]
        process, log = self._spawn(name, cpus, command)
        wait_listening(port, process, name, log)

    def start_origin(self) -> None:
        port1, port2 = self.origin_ports
        self._nginx("origin", self.args.load_cpus, ORIGIN_HTTP.format(port1=port1, port2=port2), port1)

    def start_proxies(self, scenario: Scenario) -> None:
        port1, port2 = self.origin_ports
        self.ports["nginx"] = free_port()
        body = PROXY_HTTP.format(
            port=self.ports["nginx"],
            port1=port1,
            port2=port2,
            http_extra=scenario.nginx_http,
            location_extra=scenario.nginx_location,
        )
        self._nginx(f"nginx-{slug(scenario.name)}", self.args.proxy_cpus, body, self.ports["nginx"])

        self.ports["bastion"] = free_port()
        config = bastion_config(self.ports["bastion"], free_port(), self.origin_ports, scenario)
        path = self.workdir / f"bastion-{slug(scenario.name)}.json"
        path.write_text(json.dumps(config, indent=2))
        command = [sys.executable, "-m", "bastion", "run", str(path)]
        if self.args.workers is not None:
            command += ["--workers", str(self.args.workers)]
        process, log = self._spawn(f"bastion-{slug(scenario.name)}", self.args.proxy_cpus, command)
        wait_listening(self.ports["bastion"], process, "bastion", log)

        for proxy in PROXIES:
            check_answers(proxy, self.ports[proxy], scenario)

    def stop_proxies(self) -> None:
        keep = self.processes[:1]  # the origin
        for process in self.processes[1:]:
            stop(process)
        self.processes = keep

    def close(self) -> None:
        for process in reversed(self.processes):
            stop(process)
        self.processes = []


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
    command.append(f"http://127.0.0.1:{port}{scenario.path}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


# --- rounds and the report -------------------------------------------------------------------


def parse_seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 10s)")
    return float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]


def contenders(scenario: Scenario) -> list[str]:
    return [*PROXIES, "direct"] if scenario.kind == "latency" else list(PROXIES)


def measure(tools: dict[str, str], stack: Stack, scenario: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    ports = {**stack.ports, "direct": stack.origin_ports[0]}
    for proxy in PROXIES:  # warm up pools, caches and branch predictors before anything counts
        run_wrk(tools, args.load_cpus, ports[proxy], scenario, args.warmup)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in contenders(scenario)}
    for round_index in range(args.rounds):
        order = contenders(scenario)
        if round_index % 2:
            order = [order[1], order[0], *order[2:]]
        for name in order:
            result = run_wrk(tools, args.load_cpus, ports[name], scenario, args.duration)
            runs[name].append(result)
            print(
                f"  round {round_index + 1} {name:8} rps {result['rps']:>9.0f}  p50 {result['p50']:7.3f} ms"
                f"  p99 {result['p99']:7.3f} ms  errors {result['errors']:.0f}",
                flush=True,
            )
            time.sleep(0.5)
    medians = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]} for name, results in runs.items()
    }
    return {"scenario": asdict(scenario), "runs": runs, "medians": medians}


def report(results: list[dict[str, Any]]) -> str:
    header = ["scenario", "c", "proxy", "rps", "p50 ms", "p99 ms", "rps vs nginx", "p50 - nginx"]
    rows: list[list[str]] = []
    for entry in results:
        scenario, medians = entry["scenario"], entry["medians"]
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
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join(lines)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per scenario (default 3)")
    parser.add_argument("--duration", type=parse_seconds, default=10.0, help="wrk run length (default 10s)")
    parser.add_argument("--warmup", type=parse_seconds, default=2.0, help="unmeasured run per proxy (default 2s)")
    parser.add_argument("--workers", type=int, default=None, help="bastion run --workers N")
    parser.add_argument("--only", action="append", default=[], help="run only this scenario (repeatable)")
    parser.add_argument("--proxy-cpus", default="0", help="taskset CPU list for the proxies (default 0)")
    parser.add_argument("--load-cpus", default="1", help="taskset CPU list for origin and wrk (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write raw results here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with configs and logs")
    args = parser.parse_args(argv)

    scenarios = [s for s in SCENARIOS if not args.only or s.name in args.only]
    if not scenarios:
        parser.error(f"no scenario named {args.only}; known: {', '.join(s.name for s in SCENARIOS)}")
    tools = ensure_tools()
    info = machine(tools)
    total = sum(len(contenders(s)) * args.rounds * args.duration + 2 * args.warmup for s in scenarios)
    print(f"bench: {', '.join(f'{k} {v}' for k, v in info.items())}")
    print(f"bench: {len(scenarios)} scenarios x {args.rounds} rounds, about {total / 60:.1f} min of load", flush=True)

    results = []
    with workdir(args.keep) as directory:
        stack = Stack(tools, directory, args)
        try:
            stack.start_origin()
            for scenario in scenarios:
                print(f"{scenario.name} (c={scenario.connections})", flush=True)
                stack.start_proxies(scenario)
                try:
                    results.append(measure(tools, stack, scenario, args))
                finally:
                    stack.stop_proxies()
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
            return 130
        finally:
            stack.close()

    table = report(results)
    print()
    print(table)
    errors = [(e["scenario"]["name"], name) for e in results for name, m in e["medians"].items() if m["errors"]]
    if errors:
        print(f"\nWARNING: errors or non-2xx responses in {errors}: those numbers are not comparable")
    output = args.json or ROOT / "bench" / "results" / f"{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"machine": info, "args": sys.argv[1:], "results": results}, indent=2))
    print(f"\nraw results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
