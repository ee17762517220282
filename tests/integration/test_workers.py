"""`bastion run` as a real process: SIGTERM drains, --workers N serve, crash, reload and stop."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lb_support import lb_config, origin_of, wait_for

from bastion.demo.origin import OriginHandle
from support import GatewayProcess, free_port, request, write_config


def children(pid: int) -> set[int]:
    """Live child processes of `pid` (from /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def listening_sockets(port: int) -> int:
    """How many sockets listen on 127.0.0.1:port (one per worker with SO_REUSEPORT)."""
    with open("/proc/net/tcp") as handle:
        lines = handle.read().splitlines()[1:]
    return sum(1 for line in lines if line.split()[1] == f"0100007F:{port:04X}" and line.split()[3] == "0A")


def start(tmp_path: Path, config: dict[str, Any], *args: str) -> tuple[GatewayProcess, Path]:
    port = int(config["listeners"][0]["bind"].rsplit(":", 1)[1])
    path = write_config(tmp_path / "gw.yaml", config)
    return GatewayProcess(path, port, *args), path


def slow_request(port: int, path: str, out: list[int]) -> threading.Thread:
    thread = threading.Thread(target=lambda: out.append(request(port, "GET", path).status))
    thread.start()
    return thread


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")
def test_sigterm_drains_an_in_flight_request_then_exits_0(origins: Callable[..., OriginHandle], tmp_path: Path) -> None:
    a = origins("a")
    port = free_port()
    proc, _ = start(tmp_path, lb_config([{"address": a.address}], port=port))
    statuses: list[int] = []
    thread = slow_request(port, "/delay/700", statuses)
    wait_for(lambda: a.call(lambda: a.origin.connections) >= 1)
    time.sleep(0.1)
    proc.signal(signal.SIGTERM)
    wait_for(lambda: listening_sockets(port) == 0, timeout=3)  # stopped accepting at once...
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    thread.join(5)
    assert statuses == [200]  # ...but the request in flight finished
    code, _, err = proc.stop()
    assert code == 0, err
    assert "draining" in err


def cut_request(port: int, path: str, out: list[str]) -> threading.Thread:
    """A request expected to be cut: records its status or the error that ended it."""

    def run() -> None:
        try:
            out.append(str(request(port, "GET", path).status))
        except (OSError, http.client.HTTPException) as exc:
            out.append(type(exc).__name__)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("second_signal", [False, True])
def test_the_drain_ends_at_drain_timeout_or_at_a_second_signal(
    second_signal: bool, origins: Callable[..., OriginHandle], tmp_path: Path
) -> None:
    a = origins("a")
    port = free_port()
    config = lb_config([{"address": a.address}], port=port)
    config["drain_timeout"] = "30s" if second_signal else "300ms"
    proc, _ = start(tmp_path, config)
    outcome: list[str] = []
    thread = cut_request(port, "/delay/5000", outcome)
    wait_for(lambda: a.call(lambda: a.origin.connections) >= 1)
    time.sleep(0.1)
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    if second_signal:
        time.sleep(0.2)
        proc.signal(signal.SIGTERM)
    assert proc.proc.wait(5) == 0
    assert time.monotonic() - started < 2.0  # not the 5 s the request wanted, nor the 30 s drain
    thread.join(5)
    assert outcome and outcome[0] != "200"  # cut: it could not have completed
    proc.stop()


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")
def test_two_workers_serve_and_a_crashed_worker_is_replaced(
    origins: Callable[..., OriginHandle], tmp_path: Path
) -> None:
    a = origins("a")
    port = free_port()
    proc, _ = start(tmp_path, lb_config([{"address": a.address}], port=port), "--workers", "2")
    try:
        wait_for(lambda: listening_sockets(port) == 2 and len(children(proc.proc.pid)) == 2)
        workers = children(proc.proc.pid)
        # Each new connection lands on one of the two listeners; each worker has its own
        # upstream pool, so both serving shows as (at least) two upstream connections.
        assert all(origin_of(port)[0] == 200 for _ in range(40))
        assert a.call(lambda: a.origin.connections) >= 2
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(children(proc.proc.pid) - {victim}) == 2 and listening_sockets(port) == 2)
        assert children(proc.proc.pid) != workers
        assert all(origin_of(port)[0] == 200 for _ in range(20))
    finally:
        code, _, err = proc.stop()
    assert code == 0, err
    assert "died (-9); replacing it" in err


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")
def test_reload_and_shutdown_reach_every_worker(origins: Callable[..., OriginHandle], tmp_path: Path) -> None:
    a, b = origins("a"), origins("b")
    port = free_port()
    config = lb_config([{"address": a.address}], port=port)
    proc, path = start(tmp_path, config, "--workers", "2")
    try:
        wait_for(lambda: listening_sockets(port) == 2)
        assert {origin_of(port)[1] for _ in range(20)} == {"a"}
        config["upstreams"]["app"]["targets"] = [{"address": b.address}]
        write_config(path, config)
        proc.signal(signal.SIGHUP)
        # Every worker switched: forty fresh connections, spread over both, all reach b.
        wait_for(lambda: {origin_of(port)[1] for _ in range(40)} == {"b"}, timeout=5)
        statuses: list[int] = []
        thread = slow_request(port, "/delay/500", statuses)
        wait_for(lambda: b.call(lambda: b.origin.requests) >= 1)
        time.sleep(0.1)
        proc.signal(signal.SIGTERM)
        thread.join(5)
        assert statuses == [200]
        workers = children(proc.proc.pid)
        assert proc.proc.wait(10) == 0
        assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
    finally:
        code, _, err = proc.stop()
    assert code == 0, err
    assert err.count("config reloaded") == 2


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")
def test_health_checks_are_not_multiplied_by_the_workers(origins: Callable[..., OriginHandle], tmp_path: Path) -> None:
    a = origins("a")
    port = free_port()
    checks = {"active": {"path": "/healthz", "interval": "100ms", "timeout": "100ms"}}
    proc, _ = start(tmp_path, lb_config([{"address": a.address}], port=port, health_check=checks), "--workers", "2")
    try:
        wait_for(lambda: listening_sockets(port) == 2)
        time.sleep(0.3)
        before = a.call(lambda: a.origin.requests)
        time.sleep(1.5)
        probes = a.call(lambda: a.origin.requests) - before
    finally:
        proc.stop()
    print(f"2 workers, interval 100ms: {probes} probes in 1.5 s")
    assert 11 <= probes <= 19  # about 15 (one per interval in total), not 30
