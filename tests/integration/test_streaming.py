"""Bodies stream both ways with backpressure: big transfers never sit in the gateway's memory."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

from support import GatewayProcess, free_port, simple_config, write_config

MB = 1024 * 1024


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _start(tmp_path: Path, origin_port: int) -> GatewayProcess:
    port = free_port()
    path = write_config(tmp_path / "gw.yaml", simple_config(port, [origin_port]))
    return GatewayProcess(path, port)


def test_large_upload_and_download_stay_out_of_memory(origins, tmp_path):
    origin = origins()
    gw = _start(tmp_path, origin.port)
    try:
        baseline = _peak_rss_mb(gw.proc.pid)
        size = 256 * MB
        # upload: Content-Length body, sent as fast as the gateway takes it
        with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock:
            sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % size)
            block = b"u" * MB
            for _ in range(size // MB):
                sock.sendall(block)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200")
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["body_bytes"] == size
        # download: a slow reader first (backpressure must hold the upstream), then full speed
        with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size)
            received = 0
            time.sleep(0.5)  # the gateway must not buffer while the client sleeps
            during_stall = _peak_rss_mb(gw.proc.pid)
            while True:
                chunk = sock.recv(1024 * 1024)
                if not chunk:
                    break
                received += len(chunk)
        assert received > size  # body plus chunk framing and head
        peak = _peak_rss_mb(gw.proc.pid)
        assert during_stall - baseline < 40, (baseline, during_stall)
        assert peak - baseline < 60, (baseline, peak)
    finally:
        code, _, err = gw.stop()
    assert code == 0, err


def test_access_log_line_per_request(origins, tmp_path):
    origin = origins()
    port = free_port()
    config = simple_config(port, [origin.port])
    config["log"] = {"access": True}
    gw = GatewayProcess(write_config(tmp_path / "gw.yaml", config), port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"POST /echo?secret=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
            )
            while sock.recv(65536):
                pass
    finally:
        code, out, err = gw.stop()
    assert code == 0, err
    (line,) = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert line["method"] == "POST"
    assert line["path"] == "/echo"
    assert line["route"] == "all"
    assert line["status"] == 200
    assert line["bytes_in"] == 3
    assert line["bytes_out"] > 0
    assert line["target"] == f"127.0.0.1:{origin.port}"
    assert line["consumer"] is None
    for key in ("time", "request_id", "client", "duration_ms"):
        assert key in line


def test_slow_client_is_not_an_upstream_timeout(origins, gateway):
    """While the gateway holds the upstream back for a slow reader, the response timeout waits."""
    origin = origins()
    gw = gateway(
        targets=[origin.port],
        upstreams={"app": {"targets": [{"address": origin.address}], "timeouts": {"response": "300ms"}}},
    )
    size = 64 * MB
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size)
        time.sleep(1.0)  # more than the response timeout, with the gateway's buffers full
        received = 0
        while chunk := sock.recv(1024 * 1024):
            received += len(chunk)
    assert received > size


def test_slow_upstream_reader_is_not_a_slow_client(gateway):
    """While the gateway holds the client back for a slow upstream, the body timeout waits."""
    size = 16 * MB
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def slow_origin() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            time.sleep(1.0)  # read nothing for longer than the client's body timeout
            got = 0
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            got = len(head.partition(b"\r\n\r\n")[2])
            while got < size:
                got += len(conn.recv(1024 * 1024))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    thread = threading.Thread(target=slow_origin, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    gw = gateway(
        targets=[port],
        listeners=[{"name": "web", "bind": "127.0.0.1:0", "timeouts": {"body": "300ms"}}],
    )
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"b" * MB
        try:
            for _ in range(size // MB):
                sock.sendall(block)
        except OSError as exc:
            raise AssertionError(f"cut while sending: {exc}; got {sock.recv(65536)[:300]!r}") from exc
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    thread.join(5)
    listener.close()
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
