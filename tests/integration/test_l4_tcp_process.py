"""TCP listeners in a real `bastion run` process: memory under bulk and slow readers, reload,
SIGTERM drain; and TLS terminated in front of a plain TCP target."""

from __future__ import annotations

import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from l4_support import TcpOrigin, access_lines, closed_soon, connect, l4_config, recv_exactly, source, wait_for
from support import GatewayProcess, GatewayThread, free_port, write_config
from tls_support import Pki

MB = 1024 * 1024


def rss(pid: int) -> int:
    """Resident set size of a process, bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RssSampler:
    """The highest RSS of `pid` seen while it runs, sampled every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


@pytest.fixture
def origins() -> Iterator[list[TcpOrigin]]:
    started: list[TcpOrigin] = []
    yield started
    for origin in started:
        origin.kill()


def run_gateway(tmp_path: Path, targets: list[str], **extra: Any) -> GatewayProcess:
    port = free_port()
    config = l4_config(port, targets)
    config["log"] = {"access_file": str(tmp_path / "access.log")}
    config.update(extra)
    return GatewayProcess(write_config(tmp_path / "gw.yaml", config), port)


def warm_up(port: int) -> None:
    with connect(port) as sock:
        recv_exactly(sock, 1)


def test_one_gigabyte_through_one_connection_keeps_memory_flat(tmp_path: Path, origins: list[TcpOrigin]) -> None:
    total = 1 << 30
    origin = TcpOrigin(source(total))
    origins.append(origin)
    gw = run_gateway(tmp_path, [origin.address])
    try:
        baseline = rss(gw.proc.pid)
        sampler = RssSampler(gw.proc.pid)
        started = time.monotonic()
        got = 0
        buffer = bytearray(1 << 20)
        with connect(gw.port, timeout=60) as sock:
            while True:
                size = sock.recv_into(buffer)
                if not size:
                    break
                got += size
        elapsed = time.monotonic() - started
        peak = sampler.stop()
        assert got == total
        assert peak - baseline < 32 * MB, f"RSS grew {(peak - baseline) / MB:.1f} MB"
        assert elapsed < 120
        print(
            f"1 GB in {elapsed:.2f}s ({total / elapsed / MB:.0f} MB/s), "
            f"RSS {baseline / MB:.1f} -> peak {peak / MB:.1f} MB"
        )
    finally:
        gw.stop()


def test_a_client_that_stops_reading_holds_the_target_back(tmp_path: Path, origins: list[TcpOrigin]) -> None:
    origin = TcpOrigin(source(1 << 30))
    origins.append(origin)
    gw = run_gateway(tmp_path, [origin.address])
    try:
        baseline = rss(gw.proc.pid)
        sampler = RssSampler(gw.proc.pid)
        with connect(gw.port) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            assert recv_exactly(sock, 1000) == bytes(1000)
            time.sleep(2.0)  # the target keeps sending; nobody reads
            peak = sampler.stop()
            assert peak - baseline < 32 * MB, f"RSS grew {(peak - baseline) / MB:.1f} MB"
            assert origin.open  # the target is still blocked in its send: 1 GB did not go anywhere
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    finally:
        gw.stop()


def test_sigterm_refuses_new_connections_and_cuts_an_open_one_at_the_drain_timeout(
    tmp_path: Path, origins: list[TcpOrigin]
) -> None:
    origin = TcpOrigin()
    origins.append(origin)
    gw = run_gateway(tmp_path, [origin.address], drain_timeout="1500ms")
    try:
        with connect(gw.port) as sock:
            sock.sendall(b"a")
            assert recv_exactly(sock, 1) == b"a"
            gw.signal(signal.SIGTERM)

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()
                except ConnectionRefusedError:
                    return True
                return False

            wait_for(refused)
            sock.sendall(b"b")  # the open connection still works while the drain runs
            assert recv_exactly(sock, 1) == b"b"
            assert closed_soon(sock, timeout=15)  # cut at the drain timeout
        assert gw.proc.wait(15) == 0
    finally:
        gw.stop()
    [line] = [line for line in access_lines(tmp_path / "access.log") if line["bytes_in"]]
    assert line["close_reason"] == "shutdown" and line["bytes_in"] == 2


def test_sigterm_exits_as_soon_as_the_open_connection_ends(tmp_path: Path, origins: list[TcpOrigin]) -> None:
    origin = TcpOrigin()
    origins.append(origin)
    gw = run_gateway(tmp_path, [origin.address], drain_timeout="60s")
    try:
        with connect(gw.port) as sock:
            sock.sendall(b"a")
            assert recv_exactly(sock, 1) == b"a"
            gw.signal(signal.SIGTERM)
            time.sleep(0.3)
            assert gw.proc.poll() is None  # waiting for this connection
            sock.sendall(b"b")
            assert recv_exactly(sock, 1) == b"b"
        assert gw.proc.wait(15) == 0  # well before the 60 s drain timeout
    finally:
        gw.stop()
    [line] = [line for line in access_lines(tmp_path / "access.log") if line["bytes_in"]]
    assert line["close_reason"] == "client_closed"


def test_an_open_connection_survives_a_reload_and_new_ones_take_the_new_config(
    tmp_path: Path, origins: list[TcpOrigin]
) -> None:
    a, b = TcpOrigin(greeting=b"a\n"), TcpOrigin(greeting=b"b\n")
    origins += [a, b]
    port = free_port()
    path = write_config(tmp_path / "gw.yaml", l4_config(port, [a.address]))
    gw = GatewayThread(path, port)
    try:
        with connect(port) as old:
            assert recv_exactly(old, 2) == b"a\n"
            write_config(path, l4_config(port, [b.address], listener={"timeouts": {"idle": "5m"}}))
            assert gw.reload()
            with connect(port) as new:
                assert recv_exactly(new, 2) == b"b\n"
            old.sendall(b"still here")
            assert recv_exactly(old, 10) == b"still here"
    finally:
        gw.stop()


def test_tls_is_terminated_in_front_of_a_plain_tcp_target(tmp_path: Path, origins: list[TcpOrigin]) -> None:
    pki = Pki(tmp_path)
    cert, key = pki.issue("db", "db.example.com")
    origin = TcpOrigin()
    origins.append(origin)
    port = free_port()
    config = l4_config(port, [origin.address], listener={"tls": {"certificates": [{"cert": cert, "key": key}]}})
    gw = GatewayThread(write_config(tmp_path / "gw.yaml", config), port)
    try:
        context = pki.client_context()
        context.set_alpn_protocols(["h2", "http/1.1"])
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="db.example.com") as tls,
        ):
            # The bytes go to a target the gateway knows nothing of: it agrees to no protocol
            # in ALPN (a client told "h2" would speak HTTP/2 to a server that may not).
            assert tls.selected_alpn_protocol() is None
            tls.sendall(b"over tls")
            assert recv_exactly(tls, 8) == b"over tls"  # type: ignore[arg-type]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
            plain.sendall(b"not tls at all\r\n\r\n")
            assert closed_soon(plain)  # no handshake, no relay
        assert origin.accepted == 1

        handshakes = gw.gateway.metrics.tls_handshakes
        wait_for(lambda: gw.call(_collect()) is None and handshakes.get(("db", "failed")) == 1)
        assert handshakes.get(("db", "completed")) == 1
    finally:
        gw.stop()
    assert isinstance(ssl.PROTOCOL_TLS_CLIENT, int)


async def _collect() -> None:
    import gc

    gc.collect()  # a failed handshake is counted when its protocol object goes
