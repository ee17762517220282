"""Helpers for the cluster tests: origin and gateway processes, CLI calls, load with timings."""

from __future__ import annotations

import concurrent.futures
import http.client
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from bastion.cli import cli
from support import GatewayProcess, free_port, wait_listening


class OriginProcess:
    """`python -m bastion.demo.origin` in its own process (off the test's GIL under load)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bastion.demo.origin", "--port", str(self.port), "--name", "origin"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(self.port, proc=self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def bastion(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> tuple[int, str]:
    """Run a CLI command in this process; (exit code, stdout + stderr)."""
    result = CliRunner().invoke(cli, list(args), env=env, input=stdin, catch_exceptions=False)
    return result.exit_code, result.output


def start_gateways(count: int, config: Path | None, *args: str, env: Sequence[dict[str, str]]) -> list[GatewayProcess]:
    """`count` gateway processes started side by side; each listens on its env's GW_PORT."""
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(GatewayProcess, config, int(env[i]["GW_PORT"]), *args, env=env[i]) for i in range(count)]
        return [future.result() for future in futures]


def gateway_env(state: Path, index: int) -> dict[str, str]:
    return {"GW_PORT": str(free_port()), "XDG_STATE_HOME": str(state / f"gw{index}")}


@dataclass
class Sample:
    sent: float
    received: float
    status: int  # 0: the connection failed
    rate_headers: bool
    error: str = ""


class Load:
    """Client threads sending GETs over keep-alive connections, round-robin over gateways,
    until `stop()`; every request is kept as a Sample with monotonic times."""

    def __init__(
        self, ports: Sequence[int], path: str, threads: int = 9, headers: dict[str, str] | None = None
    ) -> None:
        self.ports = list(ports)
        self.path = path
        self.headers = headers or {}
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)
        return sorted(self.samples, key=lambda s: s.sent)

    def _run(self, index: int) -> None:
        conns: dict[int, http.client.HTTPConnection] = {}
        turn = index
        while not self._stop.is_set():
            port = self.ports[turn % len(self.ports)]
            turn += 1
            conn = conns.get(port) or conns.setdefault(port, http.client.HTTPConnection("127.0.0.1", port, timeout=10))
            sent = time.monotonic()
            try:
                conn.request("GET", self.path, headers=self.headers)
                resp = conn.getresponse()
                resp.read()
                sample = Sample(sent, time.monotonic(), resp.status, resp.getheader("RateLimit-Limit") is not None)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conns.pop(port, None)
                sample = Sample(sent, time.monotonic(), 0, False, repr(exc))
            self.samples.append(sample)
        for conn in conns.values():
            conn.close()


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.005) -> float:
    """The moment (time.monotonic) `check()` was seen to hold; AssertionError after `timeout`."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic()
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(interval)


def header_of(port: int, path: str, name: str, headers: dict[str, str] | None = None) -> tuple[int, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader(name)
    finally:
        conn.close()


def until_all(ports: Sequence[int], check: Callable[[int], bool], timeout: float = 5.0) -> list[float]:
    """The moments `check(port)` held, for every port (each polled in its own thread)."""
    with concurrent.futures.ThreadPoolExecutor(len(ports)) as pool:
        return list(pool.map(lambda p: wait_until(lambda: check(p), timeout), ports))
