"""The access log as a user sees it: a stdout nobody reads does not slow the gateway, a file
is reopened on SIGUSR1 (also through the worker supervisor), every line is the JSON of the
record plugins see, and docs/config.md lists exactly the fields a line has."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from bastion.demo.origin import OriginHandle
from bastion.pipeline import Context, Plugin
from support import GatewayProcess, GatewayThread, free_port, request, simple_config, wait_listening, write_config

HERE = __name__  # the module name the gateway imports the test plugin by
CONFIG_DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"
DROPPED = re.compile(r"access log: (\d+) lines dropped")


def wait_for(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached in {timeout}s"
        time.sleep(0.02)


def json_lines(data: bytes | bytearray | str) -> list[dict[str, Any]]:
    text = data if isinstance(data, str) else bytes(data).decode()
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def log_config(port: int, origin: OriginHandle, **log: Any) -> dict[str, Any]:
    return simple_config(port, [origin.port], log={"access": True, **log})


# --- a stdout nobody reads --------------------------------------------------------------------


class PipedGateway:
    """`bastion run` whose standard output is a pipe the test reads only when it wants to."""

    def __init__(self, config_path: Path, port: int) -> None:
        self.port = port
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bastion", "run", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=self._err,
        )
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.fileno()
        os.set_blocking(self.stdout, False)
        self.out = bytearray()
        wait_listening(port, proc=self.proc, errors=self._err)

    def read_stdout(self) -> bytes:
        """Whatever is in the pipe now (the test becomes a reader, for a moment)."""
        try:
            while chunk := os.read(self.stdout, 1 << 16):
                self.out += chunk
        except BlockingIOError:
            pass
        return bytes(self.out)

    def stderr(self) -> str:
        self._err.seek(0)
        return bytes(self._err.read()).decode(errors="replace")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read_stdout()  # a reader again, so the final flush can finish
            time.sleep(0.02)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.set_blocking(self.stdout, True)
        while chunk := os.read(self.stdout, 1 << 16):
            self.out += chunk
        return self.proc.returncode


def test_a_stdout_nobody_reads_does_not_slow_the_gateway(origins: Callable[..., OriginHandle], tmp_path: Path) -> None:
    origin = origins()
    port = free_port()
    path = write_config(tmp_path / "gw.yaml", log_config(port, origin, access_buffer="64KB"))
    gw = PipedGateway(path, port)
    count = 1500  # about 500 KB of lines: the pipe (64 KB) and the buffer (64 KB) fill up early
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        started = time.monotonic()
        for n in range(count):
            # Before the sink, the gateway blocked in write(2) once the pipe was full, and this
            # request timed out.
            reply = request(port, path=f"/n/{n}", conn=conn, timeout=5)
            assert reply.status == 200
        took = time.monotonic() - started
        conn.close()
        # The first warning comes within a loop turn of the first dropped line.
        wait_for(lambda: DROPPED.search(gw.stderr()), what="a dropped-lines warning")
        # The reader comes back: the lines that waited arrive, then new ones.
        first = json_lines(gw.read_stdout())
        assert first, "no line was kept for the reader"
        request(port, path="/marker", headers={"X-Request-Id": "marker-1"})
        wait_for(lambda: b'"marker-1"' in gw.read_stdout(), what="the line of a request made after reading")
    finally:
        code = gw.stop()
    assert code == 0, gw.stderr()
    lines = json_lines(gw.out)
    assert lines[-1]["request_id"] == "marker-1"
    kept = [line["path"] for line in lines[:-1]]
    assert kept == sorted(kept, key=lambda p: int(p.rsplit("/", 1)[1]))  # whole lines, in order
    dropped = sum(int(n) for n in DROPPED.findall(gw.stderr()))
    assert dropped > 0
    assert len(lines) + dropped == count + 1, (len(lines), dropped)  # every line is written or counted
    print(f"{count} requests in {took:.2f}s with stdout unread; {len(lines)} lines kept, {dropped} dropped")


# --- a file, reopened on SIGUSR1 ---------------------------------------------------------------


def _requests(port: int, prefix: str, count: int) -> list[str]:
    ids = [f"{prefix}-{n}" for n in range(count)]
    for request_id in ids:
        assert request(port, headers={"X-Request-Id": request_id}).status == 200  # a new connection each
    return ids


def _ids_in(path: Path) -> list[str]:
    return [line["request_id"] for line in json_lines(path.read_bytes())] if path.exists() else []


@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_reopens_the_access_file_after_a_rename(
    origins: Callable[..., OriginHandle], tmp_path: Path, workers: int
) -> None:
    origin = origins()
    port = free_port()
    access = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    path = write_config(tmp_path / "gw.yaml", log_config(port, origin, access_file=str(access)))
    gw = GatewayProcess(path, port, *(["--workers", str(workers)] if workers > 1 else []))
    try:
        if workers > 1:
            wait_for(lambda: gw.output()[1].count("listener web") == workers, what="every worker listening")
        before = _requests(port, "before", 10)
        wait_for(lambda: len(_ids_in(access)) == 10, what="the lines in the file")
        access.rename(rotated)
        gw.signal(signal.SIGUSR1)
        wait_for(lambda: gw.output()[1].count(f"reopened {access}") == workers, what="every process reopening")
        after = _requests(port, "after", 10)
        wait_for(lambda: len(_ids_in(access)) == 10, what="the lines in the new file")
    finally:
        code, out, err = gw.stop()
    assert code == 0, err
    assert sorted(_ids_in(rotated)) == sorted(before)
    assert sorted(_ids_in(access)) == sorted(after)
    assert not json_lines(out)  # nothing on stdout


def test_an_access_file_that_cannot_be_opened_is_a_config_error(
    origins: Callable[..., OriginHandle], tmp_path: Path
) -> None:
    origin = origins()
    port = free_port()
    config = log_config(port, origin, access_file=str(tmp_path / "no-such-dir" / "access.log"))
    path = write_config(tmp_path / "gw.yaml", config)
    proc = subprocess.run(
        [sys.executable, "-m", "bastion", "run", str(path)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1
    assert re.search(
        r"gw\.yaml:\d+: log\.access_file: cannot open .*no-such-dir/access\.log: No such file", proc.stderr
    )


def test_a_reload_to_an_unopenable_file_keeps_the_running_log(
    origins: Callable[..., OriginHandle], tmp_path: Path
) -> None:
    origin = origins()
    port = free_port()
    access = tmp_path / "access.log"
    path = write_config(tmp_path / "gw.yaml", log_config(port, origin, access_file=str(access)))
    gw = GatewayThread(path, port)
    try:
        _requests(port, "first", 1)
        write_config(path, log_config(port, origin, access_file=str(tmp_path / "missing" / "a.log")))
        assert not gw.reload()
        _requests(port, "second", 1)
        wait_for(lambda: _ids_in(access) == ["first-0", "second-0"], what="both lines in the file")
        stats = gw.gateway.statistics()["access_log"]
        assert stats["destination"] == str(access)
        assert stats["dropped_lines"] == 0
    finally:
        gw.stop()


# --- what a line holds ------------------------------------------------------------------------


class Capture(Plugin):
    """Keeps every record its log hook is given: the record the access log line is made from."""

    name = "capture"
    records: ClassVar[list[dict[str, Any]]] = []

    def on_log(self, ctx: Context, record: dict[str, Any]) -> None:
        Capture.records.append(dict(record))


def documented_fields() -> list[str]:
    """The field column of the table under `### The access log` in docs/config.md."""
    section = CONFIG_DOC.read_text(encoding="utf-8").split("### The access log", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE)


def test_lines_are_the_records_and_the_docs_list_their_fields(
    origins: Callable[..., OriginHandle], tmp_path: Path
) -> None:
    origin = origins()
    port = free_port()
    access = tmp_path / "access.log"
    config = log_config(port, origin, access_file=str(access))
    config["plugins"] = [{"python": {"module": f"{HERE}:Capture"}}]
    Capture.records.clear()
    gw = GatewayThread(write_config(tmp_path / "gw.yaml", config), port)
    try:
        assert request(port, "POST", "/echo?q=1", body=b"abc", headers={"X-Request-Id": "one"}).status == 200
        assert request(port, path="/n/%c3%a9", headers={"X-Request-Id": "two"}).status == 200
        lines = wait_for(lambda: len(json_lines(access.read_bytes())) == 2 and json_lines(access.read_bytes()))
    finally:
        gw.stop()
    assert [line["request_id"] for line in lines] == ["one", "two"]
    for line, record in zip(lines, Capture.records, strict=True):
        assert list(line) == list(record)  # same keys, same order
        # The log hook gets its own call of log_record(), a moment later: only the clock moved.
        same = [key for key in record if key not in ("time", "duration_ms")]
        assert {key: line[key] for key in same} == {key: record[key] for key in same}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", line["time"])
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] <= record["duration_ms"]
    assert lines[0]["bytes_in"] == 3 and lines[0]["path"] == "/echo"
    assert lines[1]["path"] == "/n/%C3%A9"
    assert documented_fields() == list(Capture.records[0]), "docs/config.md's access log fields differ from a record's"
