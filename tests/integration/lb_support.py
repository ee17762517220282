"""Helpers for the load-balancing, reload and worker tests: load, a slow origin, polling."""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from bastion.demo.origin import OriginHandle


def origin_of(port: int, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, str]:
    """(status, X-Origin) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("X-Origin") or ""
    finally:
        conn.close()


def tally(port: int, count: int, path: str = "/") -> Counter[str]:
    """Send `count` requests on one keep-alive connection; count answers by origin (or status)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    seen = Counter[str]()
    try:
        for _ in range(count):
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            seen[resp.getheader("X-Origin") or str(resp.status)] += 1
    finally:
        conn.close()
    return seen


def set_health(origin: OriginHandle, status: int) -> None:
    """What the origin's /healthz answers from now on."""
    origin.call(lambda: setattr(origin.origin, "health_status", status))


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not met in time")


class Load:
    """Client threads sending GETs over keep-alive connections until stopped.

    Each response is recorded as its X-Origin (or status); every failure (a non-200 status or
    a broken connection) is kept with its reason, so a test can assert there were none.
    """

    def __init__(self, port: int, clients: int = 4, path: str = "/", pause: float = 0.0) -> None:
        self.port = port
        self.path = path
        self.pause = pause
        self.seen = Counter[str]()
        self.failures: list[str] = []
        self.count = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def wait_requests(self, count: int, timeout: float = 10.0) -> None:
        target = self.count + count
        wait_for(lambda: self.count >= target, timeout)

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                resp.read()
                failed = None if resp.status == 200 else f"status {resp.status}"
                origin = resp.getheader("X-Origin") or str(resp.status)
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                failed, origin = f"{type(exc).__name__}: {exc}", "error"
                conn.close()
                conn = None
            with self._lock:
                self.count += 1
                self.seen[origin] += 1
                if failed is not None:
                    self.failures.append(failed)
            if self.pause:
                time.sleep(self.pause)
        if conn is not None:
            conn.close()


class SlowOrigin:
    """A minimal keep-alive HTTP/1.1 origin that answers every GET after `delay` seconds."""

    def __init__(self, name: str, delay: float) -> None:
        self.name = name
        self.delay = delay
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        self.port = 0
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait(5)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        started.set()
        try:
            self.loop.run_forever()
        finally:
            server.close()
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = b'{"origin": "%s"}' % self.name.encode()
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await asyncio.sleep(self.delay)
                self.requests += 1
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Origin: %s\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (self.name.encode(), len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def lb_config(targets: list[dict[str, Any]], port: int | str = "PORT", **upstream: Any) -> dict[str, Any]:
    """A whole config: one listener, upstream `app` over `targets`, catch-all route `all`.

    With the default port "PORT", the `gateway` fixture picks a free port.
    """
    return {
        "version": 1,
        "listeners": [{"name": "web", "bind": f"127.0.0.1:{port}"}],
        "upstreams": {"app": {"targets": targets, **upstream}},
        "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "app"}],
        "log": {"access": False},
    }
