"""The L4 rows of bench/run.py: Bastion's tcp listener next to HAProxy in `mode tcp`.

Both proxies relay to the same nginx origin (its own instance, pinned with the load), and
both are pinned to the proxy CPU with HAProxy on one thread (`nbthread 1`). The load is wrk
on the load CPU, because a C load generator must not be what limits HAProxy:

- "tcp bulk": one connection (`wrk -c1`) fetching a 64 MB file again and again over
  keep-alive; the rate is wrk's `Transfer/sec`, bytes per second through one relay.
- "tcp connect echo": 16 clients each sending a small request with `Connection: close`
  and reading the 5-byte answer, so every request is a new client connection, a new
  connection to the origin, a few bytes each way and two closes: new connections per
  second through the proxy.

Rounds alternate which proxy goes first; each number is the median over the rounds. The
functions take run.py's `Stack` and arguments (duck-typed: no import of run.py).
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import time
from dataclasses import asdict
from typing import Any

PROXIES = ("bastion", "haproxy")
BULK_SIZE = 64 * 1024 * 1024
KINDS = ("tcp_bulk", "tcp_connect")

ORIGIN = """\
    server {{
        listen 127.0.0.1:{port1};
        listen 127.0.0.1:{port2};
        keepalive_requests 10000000;
        location = /bulk {{ alias {bulk}; sendfile on; }}
        location / {{ return 200 "hello"; }}
    }}"""

HAPROXY = """\
global
    nbthread 1
    maxconn 8000
    pidfile {dir}/haproxy.pid
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend bench
    bind 127.0.0.1:{port}
    default_backend origin
backend origin
    balance roundrobin
    server o1 127.0.0.1:{port1}
    server o2 127.0.0.1:{port2}
"""

_TRANSFER = re.compile(r"^Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_SCALE = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def bastion_config(port: int, origin_ports: tuple[int, int]) -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": [{"name": "bench", "bind": f"127.0.0.1:{port}", "protocol": "tcp", "upstream": "origin"}],
        "upstreams": {"origin": {"targets": [{"address": f"127.0.0.1:{p}"} for p in origin_ports]}},
        "log": {"access": False, "level": "warning"},
    }


def start_origin(stack: Any, free_port: Any) -> tuple[int, int]:
    """An nginx origin with the bulk file, pinned with the load (stopped with the stack)."""
    ports = getattr(stack, "l4_origin_ports", None)
    if ports is not None:
        return ports  # type: ignore[no-any-return]
    bulk = stack.workdir / "bulk.bin"
    with bulk.open("wb") as out:
        block = bytes(range(256)) * 4096
        for _ in range(BULK_SIZE // len(block)):
            out.write(block)
    bulk.chmod(0o644)
    stack.workdir.chmod(0o755)  # nginx's workers (not root) read the file through it
    ports = (free_port(), free_port())
    body = ORIGIN.format(port1=ports[0], port2=ports[1], bulk=bulk)
    stack._nginx("l4-origin", stack.args.load_cpus, body, ports[0])
    stack.l4_origin_ports = ports
    return ports


def start_proxies(stack: Any, origin: tuple[int, int], free_port: Any, wait_listening: Any) -> dict[str, int]:
    ports = {"bastion": free_port(), "haproxy": free_port()}
    directory = stack.workdir / "haproxy"
    directory.mkdir(exist_ok=True)
    conf = directory / "haproxy.cfg"
    conf.write_text(HAPROXY.format(dir=directory, port=ports["haproxy"], port1=origin[0], port2=origin[1]))
    process, log = stack._spawn("haproxy", stack.args.proxy_cpus, [stack.tools["haproxy"], "-db", "-f", str(conf)])
    wait_listening(ports["haproxy"], process, "haproxy", log)
    stack.pids["haproxy"] = process.pid
    path = stack.workdir / "bastion-l4.json"
    path.write_text(json.dumps(bastion_config(ports["bastion"], origin), indent=2))
    bastion = stack.args.bastion
    process, log = stack._spawn(
        "bastion-l4", stack.args.proxy_cpus, [*bastion.argv, "run", str(path)], env=bastion.environ()
    )
    wait_listening(ports["bastion"], process, "bastion", log)
    stack.pids["bastion"] = process.pid
    return ports


def run_wrk(tools: dict[str, str], cpus: str, port: int, kind: str, seconds: float) -> dict[str, float]:
    command = [tools["taskset"], "-c", cpus, tools["wrk"], "-t1", "--timeout", "10s", f"-d{max(1, round(seconds))}s"]
    if kind == "tcp_bulk":
        command += ["-c1", f"http://127.0.0.1:{port}/bulk"]
    else:
        command += ["-c16", "-H", "Connection: close", f"http://127.0.0.1:{port}/"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    out = done.stdout
    errors = sum(int(n) for n in _ERRORS.search(out).groups()) if _ERRORS.search(out) else 0
    non_2xx = _NON_2XX.search(out)
    errors += int(non_2xx.group(1)) if non_2xx else 0
    rps = float(_RPS.search(out).group(1)) if _RPS.search(out) else 0.0
    transfer = _TRANSFER.search(out)
    rate = float(transfer.group(1)) * _SCALE[transfer.group(2)] if transfer else 0.0
    # Connection: close rows: wrk counts the closes it sees as read errors on some versions.
    if kind == "tcp_connect":
        errors = int(non_2xx.group(1)) if non_2xx else 0
    return {"rate": rate if kind == "tcp_bulk" else rps, "rps": rps, "errors": float(errors)}


def measure(tools: dict[str, str], stack: Any, scenario: Any, args: Any, helpers: dict[str, Any]) -> dict[str, Any]:
    """One L4 row: alternating rounds of wrk through Bastion and HAProxy; medians."""
    kind = scenario.kind
    origin = start_origin(stack, helpers["free_port"])
    ports = start_proxies(stack, origin, helpers["free_port"], helpers["wait_listening"])
    for proxy in PROXIES:
        run_wrk(tools, args.load_cpus, ports[proxy], kind, args.warmup)
    runs: dict[str, list[dict[str, float]]] = {proxy: [] for proxy in PROXIES}
    for index in range(args.rounds):
        order = PROXIES if index % 2 == 0 else PROXIES[::-1]
        for proxy in order:
            cpu_seconds = helpers["cpu_seconds"]
            before, started = cpu_seconds(stack.pids[proxy]), time.monotonic()
            result = run_wrk(tools, args.load_cpus, ports[proxy], kind, args.duration)
            used = cpu_seconds(stack.pids[proxy]) - before
            result["cpu"] = used / (time.monotonic() - started)
            result["per_cpu_s"] = result["rate"] / used if used > 0 else 0.0
            runs[proxy].append(result)
            shown = f"{result['rate'] / 2**20:9.1f} MB/s" if kind == "tcp_bulk" else f"{result['rate']:9.0f} conn/s"
            print(
                f"  round {index + 1} {proxy:8} {shown}  proxy cpu {result['cpu']:4.0%}  errors {result['errors']:.0f}",
                flush=True,
            )
            time.sleep(0.5)
    medians = {proxy: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for proxy, rs in runs.items()}
    return {"scenario": asdict(scenario), "runs": runs, "medians": medians}


def ratio(entry: dict[str, Any]) -> tuple[float, bool]:
    """Bastion's rate as a share of HAProxy's, and whether both ran clean."""
    medians = entry["medians"]
    clean = not any(m["errors"] for m in medians.values())
    return medians["bastion"]["rate"] / medians["haproxy"]["rate"], clean


def report(results: list[dict[str, Any]], table: Any) -> str:
    rows: list[list[str]] = []
    for entry in results:
        scenario = entry["scenario"]
        if scenario["kind"] not in KINDS or "medians" not in entry:
            continue
        medians = entry["medians"]
        haproxy = medians["haproxy"]
        for proxy, m in medians.items():
            rate = f"{m['rate'] / 2**20:.0f} MB/s" if scenario["kind"] == "tcp_bulk" else f"{m['rate']:.0f} conn/s"
            cost = f"{m['per_cpu_s'] / haproxy['per_cpu_s']:.2f}x" if haproxy.get("per_cpu_s") else ""
            rows.append(
                [
                    scenario["name"],
                    str(scenario["connections"]),
                    proxy,
                    rate,
                    f"{m['rate'] / haproxy['rate']:.2f}x",
                    f"{m['cpu']:.0%}",
                    cost,
                    f"{m['errors']:.0f}",
                ]
            )
    header = ["scenario", "c", "proxy", "rate", "vs haproxy", "proxy CPU", "per CPU-s vs haproxy", "errors"]
    return table(header, rows) if rows else ""
