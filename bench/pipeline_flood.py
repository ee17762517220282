#!/usr/bin/env python3
"""The gateway's memory under clients that pipeline requests and never read the responses.

Starts a demo origin and `bastion run` as child processes, opens N connections that each
keep sending pipelined `GET /plain` requests for a while without ever reading, and reports
the gateway's RSS before and after (VmRSS from /proc). Before issue 8 one such connection grew
the gateway by 1.3 GB in 20 s; the bound in docs/design.md says what it costs now.

    .venv/bin/python bench/pipeline_flood.py --connections 1000 --seconds 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REQUEST = b"GET /plain HTTP/1.1\r\nHost: bench\r\n\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def flood(port: int, connections: int, seconds: float) -> dict[str, int]:
    """Keep every connection's send buffer full of requests; never read."""
    selector = selectors.DefaultSelector()
    burst = REQUEST * 64
    socks = []
    for _ in range(connections):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_WRITE)
        socks.append(sock)
    sent = 0
    closed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                sent += sock.send(burst)
            except BlockingIOError:
                pass
            except OSError:
                selector.unregister(sock)
                closed += 1
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    return {"bytes_sent": sent, "closed_by_gateway": closed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    origin_port, gateway_port = free_port(), free_port()
    config = {
        "version": 1,
        "listeners": [{"name": "web", "bind": f"127.0.0.1:{gateway_port}"}],
        "upstreams": {"origin": {"targets": [{"address": f"127.0.0.1:{origin_port}"}], "max_connections": 64}},
        "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "origin"}],
        "log": {"access": False},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flood.json"
        path.write_text(json.dumps(config))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        origin = subprocess.Popen(
            [sys.executable, "-m", "bastion.demo.origin", "--port", str(origin_port), "--name", "o"], env=env
        )
        gateway = subprocess.Popen([sys.executable, "-m", "bastion", "run", str(path)], env=env)
        try:
            wait_port(origin_port)
            wait_port(gateway_port)
            time.sleep(1)
            before = rss_mb(gateway.pid)
            result = flood(gateway_port, args.connections, args.seconds)
            peak_during = rss_mb(gateway.pid)
            time.sleep(1)
            after = rss_mb(gateway.pid)
        finally:
            gateway.terminate()
            origin.terminate()
            gateway.wait(10)
            origin.wait(10)
    row = {
        "connections": args.connections,
        "seconds": args.seconds,
        "rss_before_mb": round(before, 1),
        "rss_at_end_of_flood_mb": round(peak_during, 1),
        "rss_after_close_mb": round(after, 1),
        "added_mb": round(peak_during - before, 1),
        "added_kb_per_connection": round((peak_during - before) * 1024 / args.connections, 1),
        **result,
    }
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
