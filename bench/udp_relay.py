#!/usr/bin/env python3
"""Datagrams per second through a udp listener, against the same exchange without the gateway.

Starts a UDP echo target (a thread on a plain socket) and `bastion run` with one udp
listener in front of it, then for each path (direct, through the gateway) runs clients that
each keep `--window` datagrams of `--size` bytes in flight for `--seconds`, and prints the
echoed datagrams per second and the median round trip of a lone datagram. Everything is on
loopback; on a shared machine, compare the two rows, not absolute numbers.

    python bench/udp_relay.py --clients 4 --window 32 --seconds 5
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml


def echo_target() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    def serve() -> None:
        while True:
            try:
                data, source = sock.recvfrom(65535)
                sock.sendto(data, source)
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    return sock, int(sock.getsockname()[1])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def client(port: int, window: int, size: int, seconds: float, counts: list[int]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(0.5)
    payload = b"x" * size
    for _ in range(window):
        sock.send(payload)
    received = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock.recv(65535)
        except TimeoutError:
            for _ in range(window):  # datagrams lost: refill the window
                sock.send(payload)
            continue
        received += 1
        sock.send(payload)
    counts.append(received)
    sock.close()


def rate(port: int, clients: int, window: int, size: int, seconds: float) -> float:
    counts: list[int] = []
    threads = [threading.Thread(target=client, args=(port, window, size, seconds, counts)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / seconds


def round_trip(port: int, size: int, samples: int = 2000) -> float:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(1)
    payload = b"x" * size
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        sock.send(payload)
        sock.recv(65535)
        times.append(time.perf_counter() - started)
    sock.close()
    return statistics.median(times) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    target, target_port = echo_target()
    port = free_port()
    config = {
        "version": 1,
        "listeners": [{"name": "udp", "bind": f"127.0.0.1:{port}", "protocol": "udp", "upstream": "echo"}],
        "upstreams": {"echo": {"targets": [{"address": f"127.0.0.1:{target_port}"}]}},
        "log": {"access": False, "level": "warning"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gw.yaml"
        path.write_text(yaml.safe_dump(config))
        gateway = subprocess.Popen([sys.executable, "-m", "bastion", "run", str(path)])
        try:
            time.sleep(1.5)
            for name, where in (("direct", target_port), ("bastion", port)):
                per_second = rate(where, args.clients, args.window, args.size, args.seconds)
                rtt = round_trip(where, args.size)
                print(f"{name:8} {per_second:10.0f} datagrams/s echoed   median round trip {rtt:6.0f} us")
        finally:
            gateway.terminate()
            gateway.wait(15)
            target.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
