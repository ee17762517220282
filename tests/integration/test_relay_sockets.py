"""The byte relay between real TCP connections on loopback, under uvloop and plain asyncio.

Each test builds two connected pairs: the test's "client" talks to the relay's client
transport, the test's "origin" to its upstream transport. The client and origin ends are
blocking sockets driven from threads, so a slow or stalled reader is a thread that does not
call recv. tracemalloc shows what the relay (and the loop's write buffers, which hold Python
bytes objects) kept in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from bastion.net.relay import Relay

MB = 1024 * 1024
SMALL_BUFFER = 64 * 1024  # kernel buffers of the test's own sockets: the relay must hold the rest

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


def run(loop_name: str, main: Callable[[], Awaitable[None]]) -> None:
    loop = LOOPS[loop_name]()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), 50))
    finally:
        loop.close()


def tcp_pair(small: bool = False) -> tuple[socket.socket, socket.socket]:
    """(test end, relay end) of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        outer = socket.socket()
        if small:
            outer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
            outer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        outer.connect(server.getsockname())
        inner, _ = server.accept()
    return outer, inner


async def start_relay(small: bool = False, **options: Any) -> tuple[socket.socket, socket.socket, Relay]:
    loop = asyncio.get_running_loop()
    client, client_inner = tcp_pair(small)
    origin, origin_inner = tcp_pair(small)
    client_transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, client_inner)
    origin_transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, origin_inner)
    relay = Relay(loop, client_transport, origin_transport, **options)  # type: ignore[arg-type]
    relay.start()
    return client, origin, relay


class Sender(threading.Thread):
    """Sends `total` bytes of a known pattern, then half-closes."""

    def __init__(self, sock: socket.socket, total: int) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.total = total
        self.sent = 0
        self.digest = hashlib.sha256()
        self.start()

    def run(self) -> None:
        block = bytes(range(256)) * 256  # 64 KB
        while self.sent < self.total:
            chunk = block[: self.total - self.sent]
            self.sock.sendall(chunk)
            self.digest.update(chunk)
            self.sent += len(chunk)
        self.sock.shutdown(socket.SHUT_WR)


class Receiver(threading.Thread):
    """Reads until EOF; holds off while `gate` is clear."""

    def __init__(self, sock: socket.socket, gate: threading.Event | None = None) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.gate = gate
        self.received = 0
        self.digest = hashlib.sha256()
        self.start()

    def run(self) -> None:
        if self.gate is not None:
            self.gate.wait(30)
        buffer = bytearray(64 * 1024)
        view = memoryview(buffer)
        while True:
            n = self.sock.recv_into(buffer)
            if not n:
                return
            self.digest.update(view[:n])
            self.received += n


async def until(check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_50_mb_each_way_with_flat_memory(loop_name: str) -> None:
    total = 50 * MB

    async def main() -> None:
        client, origin, relay = await start_relay()
        tracemalloc.start()
        try:
            threads = [Sender(client, total), Receiver(origin), Sender(origin, total), Receiver(client)]
            up_send, up_recv, down_send, down_recv = threads
            stats = await relay.wait_closed()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        for thread in threads:
            thread.join(10)
        client.close()
        origin.close()
        assert up_recv.received == total and up_recv.digest.digest() == up_send.digest.digest()
        assert down_recv.received == total and down_recv.digest.digest() == down_send.digest.digest()
        assert (stats.bytes_in, stats.bytes_out) == (total, total)
        assert stats.reason in ("client_closed", "upstream_closed")
        assert peak < 4 * MB, f"traced memory peaked at {peak / MB:.1f} MB while relaying 100 MB"

    run(loop_name, main)


@pytest.mark.parametrize("slow", ["client", "origin"])
@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_stalled_reader_pauses_the_other_side(loop_name: str, slow: str) -> None:
    total = 24 * MB

    async def main() -> None:
        client, origin, relay = await start_relay(small=True)
        writer_sock, reader_sock = (origin, client) if slow == "client" else (client, origin)
        writer_reading = "upstream_reading" if slow == "client" else "client_reading"
        relayed = "bytes_out" if slow == "client" else "bytes_in"
        gate = threading.Event()
        tracemalloc.start()
        try:
            sender = Sender(writer_sock, total)
            receiver = Receiver(reader_sock, gate)
            await until(lambda: not relay.statistics()[writer_reading])
            await asyncio.sleep(0.2)  # let the kernel buffers fill behind the pause
            paused_at = relay.statistics()[relayed]
            assert not relay.statistics()[writer_reading]
            assert paused_at < 12 * MB, f"{paused_at / MB:.1f} MB relayed to a reader that reads nothing"
            assert sender.sent < total, "the writer was never held back"
            assert sender.is_alive()
            gate.set()  # the reader starts reading: everything flows
            await until(lambda: receiver.received == total)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert receiver.digest.digest() == sender.digest.digest()
        assert peak < 4 * MB, f"traced memory peaked at {peak / MB:.1f} MB"
        reader_sock.shutdown(socket.SHUT_WR)
        stats = await relay.wait_closed()
        assert getattr(stats, relayed) == total
        client.close()
        origin.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_half_close_over_tcp(loop_name: str) -> None:
    async def main() -> None:
        client, origin, relay = await start_relay()
        client.sendall(b"request, then EOF")
        client.shutdown(socket.SHUT_WR)
        got = await asyncio.to_thread(read_to_eof, origin)
        assert got == b"request, then EOF"  # the origin saw the client's EOF
        origin.sendall(b"an answer after the client's EOF")
        origin.shutdown(socket.SHUT_WR)
        assert await asyncio.to_thread(read_to_eof, client) == b"an answer after the client's EOF"
        stats = await relay.wait_closed()
        assert stats.reason == "client_closed"
        assert (stats.bytes_in, stats.bytes_out) == (17, 32)
        client.close()
        origin.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_idle_timeout_over_tcp(loop_name: str) -> None:
    async def main() -> None:
        client, origin, relay = await start_relay(idle_timeout=0.3)
        client.sendall(b"x")
        assert await asyncio.to_thread(origin.recv, 10) == b"x"
        stats = await relay.wait_closed()
        assert stats.reason == "idle_timeout"
        assert await asyncio.to_thread(read_to_eof, client) == b""
        assert await asyncio.to_thread(read_to_eof, origin) == b""
        client.close()
        origin.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_an_origin_reset_ends_with_error(loop_name: str) -> None:
    async def main() -> None:
        client, origin, relay = await start_relay()
        origin.sendall(b"partial")
        assert await asyncio.to_thread(client.recv, 100) == b"partial"
        client.sendall(b"unread by the origin")  # unread data makes close() a reset
        await asyncio.sleep(0.05)
        origin.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        origin.close()
        stats = await relay.wait_closed()
        assert stats.reason in ("error", "upstream_closed")
        assert await asyncio.to_thread(read_to_eof, client) == b""
        client.close()

    run(loop_name, main)


def read_to_eof(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
