"""Test support: a real gateway on loopback (in a thread or as a process) and plain clients.

Every server binds 127.0.0.1 on a free port; every client is the standard library talking
over real sockets, so tests see exactly what a user's client would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from bastion.app import Gateway, new_event_loop


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def simple_config(port: int, targets: list[int], **extra: Any) -> dict[str, Any]:
    """One listener, one upstream `app` over `targets`, one catch-all route `all`."""
    config: dict[str, Any] = {
        "version": 1,
        "listeners": [{"name": "web", "bind": f"127.0.0.1:{port}"}],
        "upstreams": {"app": {"targets": [{"address": f"127.0.0.1:{t}"} for t in targets]}},
        "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "app"}],
        "log": {"access": False},
    }
    config.update(extra)
    return config


class GatewayThread:
    """A Gateway running on its own uvloop in a background thread."""

    def __init__(self, config_path: Path, port: int, tls_watch: float | None = None) -> None:
        self.config_path = config_path
        self.port = port
        self.loop = new_event_loop()
        self.gateway = Gateway(str(config_path), tls_watch=tls_watch)
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self.gateway.start())
            except BaseException as exc:
                ready.set_exception(exc)
                return
            ready.set_result(None)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="gateway", daemon=True)
        self.thread.start()
        ready.result(10)

    def call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def reload(self) -> bool:
        return bool(self.call(self.gateway.reload()))

    def stop(self, drain: float = 1.0) -> None:
        if self.loop.is_closed():
            return
        try:
            self.call(self.gateway.shutdown(drain), timeout=drain + 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


class GatewayProcess:
    """`bastion run` as a child process, for signals, workers and the real CLI.

    Its stdout and stderr go to files, so a test can poll what it logged so far (`output()`).
    """

    def __init__(self, config_path: Path | None, port: int, *args: str, env: dict[str, str] | None = None) -> None:
        """`config_path` None: no file argument (`--from-redis URL` in `args`)."""
        self.port = port
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process handle
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process handle
        files = [str(config_path)] if config_path is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bastion", "run", *files, *args],
            stdout=self._out,
            stderr=self._err,
            env={**os.environ, **(env or {})},
        )
        wait_listening(port, proc=self.proc, errors=self._err)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def output(self) -> tuple[str, str]:
        """What the process has written to stdout and stderr so far."""
        return _read_all(self._out), _read_all(self._err)

    def stop(self, timeout: float = 15) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        out, err = self.output()
        return self.proc.returncode, out, err


def _read_all(file: Any) -> str:
    file.seek(0)
    return bytes(file.read()).decode(errors="replace")


def wait_listening(
    port: int, timeout: float = 10, proc: subprocess.Popen[bytes] | None = None, errors: Any = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited early: {_read_all(errors) if errors is not None else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


class Reply:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    method: str = "GET",
    path: str = "/",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    conn: http.client.HTTPConnection | None = None,
    timeout: float = 10,
) -> Reply:
    """One request (on `conn` when given, to reuse a keep-alive connection)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, resp.getheaders(), data)
    finally:
        if own:
            conn.close()


def send_fields(port: int, fields: list[tuple[str, str]], path: str = "/") -> Reply:
    """One request whose header fields are sent exactly as listed (repeated names included)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path)
        for name, value in fields:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return Reply(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, timeout: float = 5.0, read_until_close: bool = True) -> bytes:
    """Send raw bytes, return everything received until the server closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close:
                break
        return b"".join(chunks)


def split_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse back-to-back HTTP/1.1 responses with Content-Length or chunked bodies."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            n = int(headers["content-length"])
            body, data = rest[:n], rest[n:]
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    _, _, rest = rest.partition(b"\r\n")
                    break
                body += rest[:size]
                rest = rest[size + 2 :]
            data = rest
        else:
            body, data = rest, b""
        out.append((status, headers, body))
    return out


class CannedOrigin:
    """A raw upstream that answers every request with fixed bytes: for malformed or unusual
    responses that a well-behaved origin never sends. It records what it received."""

    def __init__(self, response: bytes, close: bool = False) -> None:
        self.response = response
        self.close_after = close
        self.received: list[bytes] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                if b"\r\n\r\n" in buf:
                    self.received.append(buf)
                    buf = b""
                    conn.sendall(self.response)
                    if self.close_after:
                        return

    def stop(self) -> None:
        self.sock.close()
