#!/usr/bin/env python3
"""gRPC unary calls per second: straight to a grpcio server, and through Bastion (h2c both ways).

The origin is a grpcio server with one generic method, `/bench.Echo/Call`, that returns the
request bytes (no .proto needed: the handler's (de)serializers are the identity). The load is
h2load, POSTing one fixed gRPC frame (`-d`, a 5-byte prefix and 64 bytes of payload) with
`content-type: application/grpc` and `te: trailers`, over `--connections` connections with
`--streams` calls in flight on each. Each call is checked once with a grpcio client before
measuring (h2load counts HTTP statuses, not grpc-status). Rounds alternate the order (direct
first, then the gateway first, ...); the numbers are medians.

    python bench/grpc_unary.py                        # 3 rounds of 10 s
    python bench/grpc_unary.py --rounds 5 --duration 20 --connections 4 --streams 32

`run.py` calls `measure()` for its "grpc unary" row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = bytes(range(64))
METHOD = "/bench.Echo/Call"

ORIGIN = """
import sys
from concurrent import futures
import grpc

def call(request, context):
    return request

handler = grpc.method_handlers_generic_handler(
    "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)}
)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
print("ready", flush=True)
server.wait_for_termination()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (its threads included: /proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_listening(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited early ({process.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} does not listen on {port}")


def gateway_config(port: int, origin: int) -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": [{"name": "grpc", "bind": f"127.0.0.1:{port}", "http2": "prior_knowledge"}],
        "upstreams": {"echo": {"protocol": "h2c", "targets": [{"address": f"127.0.0.1:{origin}"}]}},
        "routes": [{"name": "echo", "match": {"path": "/bench.Echo/"}, "upstream": "echo"}],
        "log": {"access": False, "level": "warning"},
    }


def check_call(port: int) -> None:
    """One real gRPC call: a gateway that answers errors would win every race."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        answer = call(PAYLOAD, timeout=10)
    if answer != PAYLOAD:
        raise RuntimeError(f"port {port} answered {answer!r}")


_DONE = re.compile(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored")
_RATE = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_LATENCY = re.compile(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)")


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_h2load(
    h2load: str, taskset: str, cpus: str, port: int, body: Path, seconds: float, connections: int, streams: int
) -> dict[str, float]:
    command = [taskset, "-c", cpus, h2load, "-D", f"{max(1, round(seconds))}", "-c", str(connections)]
    command += ["-m", str(streams), "-t", "1", "-d", str(body)]
    command += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    command.append(f"http://127.0.0.1:{port}{METHOD}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
    counts = _DONE.search(done.stdout)
    rate = _RATE.search(done.stdout)
    if done.returncode != 0 or counts is None or rate is None:
        raise RuntimeError(f"h2load failed ({done.returncode}): {done.stdout[-1500:]} {done.stderr[-500:]}")
    latency = _LATENCY.search(done.stdout)
    result = {
        "rps": float(rate.group(3)),
        "requests": float(counts.group(3)),
        "errors": float(counts.group(4)) + float(counts.group(5)),
    }
    if latency is not None:  # min, max, mean
        result["mean_ms"] = _ms(latency.group(5), latency.group(6))
    return result


def measure(
    bastion: list[str],
    env: dict[str, str] | None,
    proxy_cpus: str,
    load_cpus: str,
    rounds: int,
    duration: float,
    warmup: float,
    connections: int,
    streams: int,
    workdir: Path,
) -> dict[str, Any]:
    """Start the origin and the gateway, alternate rounds, return the runs and medians."""
    taskset, h2load = shutil.which("taskset"), shutil.which("h2load")
    if taskset is None or h2load is None:
        return {"skipped": "skipped: h2load (nghttp2-client) or taskset not installed"}
    body = workdir / "grpc-call.bin"
    body.write_bytes(b"\x00" + len(PAYLOAD).to_bytes(4, "big") + PAYLOAD)
    origin_port, gateway_port = free_port(), free_port()
    script = workdir / "grpc_origin.py"
    script.write_text(ORIGIN)
    config = workdir / "bastion-grpc.json"
    config.write_text(json.dumps(gateway_config(gateway_port, origin_port), indent=2))
    logs = [open(workdir / name, "wb") for name in ("grpc-origin.log", "bastion-grpc.log")]  # noqa: SIM115
    processes = [
        subprocess.Popen(
            [taskset, "-c", load_cpus, sys.executable, str(script), str(origin_port)], stdout=logs[0], stderr=logs[0]
        ),
        subprocess.Popen(
            [taskset, "-c", proxy_cpus, *bastion, "run", str(config)], stdout=logs[1], stderr=logs[1], env=env
        ),
    ]
    try:
        wait_listening(origin_port, processes[0], "the grpcio origin")
        wait_listening(gateway_port, processes[1], "bastion")
        ports = {"direct": origin_port, "bastion": gateway_port}
        # Whose CPU a run costs: the grpcio origin's for direct, the gateway's through Bastion.
        pids = {"direct": processes[0].pid, "bastion": processes[1].pid}
        for port in ports.values():
            check_call(port)
            run_h2load(h2load, taskset, load_cpus, port, body, warmup, connections, streams)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in ports}
        for index in range(rounds):
            order = list(ports) if index % 2 == 0 else list(reversed(ports))
            for name in order:
                before = cpu_seconds(pids[name])
                result = run_h2load(h2load, taskset, load_cpus, ports[name], body, duration, connections, streams)
                spent = cpu_seconds(pids[name]) - before
                if spent > 0:
                    result["cpu_s"] = spent
                    result["per_cpu_s"] = result["requests"] / spent
                runs[name].append(result)
                print(
                    f"  round {index + 1} {name:8} calls/s {result['rps']:>8.0f}  "
                    f"per CPU-s {result.get('per_cpu_s', 0):>8.0f}  errors {result['errors']:.0f}",
                    flush=True,
                )
                time.sleep(0.5)
        medians = {
            name: {key: statistics.median(r[key] for r in rs if key in r) for key in rs[0]} for name, rs in runs.items()
        }
        return {"runs": runs, "medians": medians, "connections": connections, "streams": streams}
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in logs:
            log.close()


def report(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"grpc unary: {result['skipped']}"
    direct = result["medians"]["direct"]["rps"]
    lines = [
        "| grpc unary | c x streams | calls/s | vs direct | mean ms | per CPU-s | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in result["medians"].items():
        mean = f"{m['mean_ms']:.2f}" if "mean_ms" in m else ""
        per_cpu = f"{m['per_cpu_s']:.0f}" if "per_cpu_s" in m else ""
        lines.append(
            f"| {name} | {result['connections']} x {result['streams']} | {m['rps']:.0f} | "
            f"{m['rps'] / direct:.2f}x | {mean} | {per_cpu} | {m['errors']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--streams", type=int, default=16, help="calls in flight per connection")
    parser.add_argument("--proxy-cpus", default="0")
    parser.add_argument("--load-cpus", default="1")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with tempfile.TemporaryDirectory(prefix="bastion-grpc-bench-") as directory:
        result = measure(
            [sys.executable, "-m", "bastion"],
            env,
            args.proxy_cpus,
            args.load_cpus,
            args.rounds,
            args.duration,
            args.warmup,
            args.connections,
            args.streams,
            Path(directory),
        )
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
