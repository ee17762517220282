"""A real redis-server for tests: started on a free loopback port, no persistence, killed at the end.

Never a mock: the cluster code is tested against the server it will meet. When redis-server
is not installed the tests fail with a message saying so (CI installs it in .ci/run).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

import pytest
import redis

from support import free_port


def redis_server_path() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(
            "redis-server is not installed: the cluster tests need a real one "
            "(apt-get install redis-server; .ci/run installs it)",
            pytrace=False,
        )
    return path


class RedisServer:
    """One redis-server process; `kill()` and `start()` again on the same port for outages."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.TemporaryDirectory(prefix="bastion-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [
                redis_server_path(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir.name,
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start ({self.proc.returncode}) on port {self.port}")
            try:
                if self.client(timeout=0.5).ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: the server vanishes as in a crash (connections reset, nothing saved)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
        self.dir.cleanup()

    def info(self, section: str) -> dict[str, Any]:
        return dict(self.client().info(section))
