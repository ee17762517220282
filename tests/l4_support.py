"""Raw TCP origins and clients for the L4 listener tests (tcp, tls_passthrough).

`TcpOrigin` runs a thread per connection with a handler chosen by the test: `echo` sends
every byte back (after an optional greeting that names the origin, so a test can see which
target it reached), `source(n)` sends n bytes and closes, `tls_echo(context)` terminates TLS
with its own certificate and echoes inside it. Every origin counts its connections and can
be killed (listening socket and every open connection closed at once, with a reset).
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[["TcpOrigin", socket.socket], None]


class TcpOrigin:
    def __init__(self, handler: Handler | None = None, greeting: bytes | None = None) -> None:
        self.handler = handler or echo
        self.greeting = greeting
        self.accepted = 0
        self.open: set[socket.socket] = set()
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = int(self.sock.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.open.add(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            if self.greeting is not None:
                conn.sendall(self.greeting)
            self.handler(self, conn)
        except OSError:
            pass
        except BaseException as exc:  # a bug in the test's handler
            self.errors.append(exc)
        finally:
            with self.lock:
                self.open.discard(conn)
            conn.close()

    def kill(self) -> None:
        """Stop listening and reset every open connection."""
        self.sock.close()
        with self.lock:
            conns = list(self.open)
        for conn in conns:
            with contextlib.suppress(OSError):  # its handler thread may have closed it meanwhile
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    stop = kill


def echo(origin: TcpOrigin, conn: socket.socket) -> None:
    """Send back what comes; half-close the way back when the client half-closes."""
    while True:
        data = conn.recv(65536)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)


def source(total: int, chunk: int = 256 * 1024) -> Handler:
    """Send `total` bytes (zeros) as fast as the peer takes them, then close."""

    def handle(origin: TcpOrigin, conn: socket.socket) -> None:
        block = bytes(chunk)
        left = total
        while left > 0:
            size = min(left, chunk)
            conn.sendall(block[:size])
            left -= size

    return handle


def sink(counted: list[int]) -> Handler:
    """Read until EOF, then send back how many bytes came as a decimal line."""

    def handle(origin: TcpOrigin, conn: socket.socket) -> None:
        total = 0
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            total += len(data)
        counted.append(total)
        conn.sendall(b"%d\n" % total)

    return handle


def tls_echo(context: ssl.SSLContext) -> Handler:
    """Terminate TLS with `context` (the origin's own certificate) and echo inside it."""

    def handle(origin: TcpOrigin, conn: socket.socket) -> None:
        conn.settimeout(10)
        with context.wrap_socket(conn, server_side=True) as tls:
            while True:
                data = tls.recv(65536)
                if not data:
                    return
                tls.sendall(data)

    return handle


def connect(port: int, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        data = sock.recv(size - len(out))
        if not data:
            raise EOFError(f"closed after {len(out)} of {size} bytes")
        out += data
    return bytes(out)


def recv_until_close(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        data = sock.recv(65536)
        if not data:
            return bytes(out)
        out += data


def closed_soon(sock: socket.socket, timeout: float = 10) -> bool:
    """True when the peer closes (EOF or reset) within `timeout`, whatever it sent before."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def access_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate: Callable[[], Any], timeout: float = 10, step: float = 0.02) -> Any:
    """Poll `predicate` until it returns something true; that value (fails after timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(step)


def l4_config(port: int, targets: list[str], listener: dict[str, Any] | None = None, **upstream: Any) -> dict[str, Any]:
    """One tcp listener on `port` relaying to upstream `db` over `targets`."""
    return {
        "version": 1,
        "listeners": [
            {"name": "db", "bind": f"127.0.0.1:{port}", "protocol": "tcp", "upstream": "db", **(listener or {})}
        ],
        "upstreams": {"db": {"targets": [{"address": t} for t in targets], **upstream}},
        "log": {"access": False},
    }
