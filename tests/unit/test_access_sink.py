"""The access log's sink: never blocks, keeps lines whole, bounds its memory, counts what it drops.

Real pipes and files, no sockets (one test puts a socketpair on fd 1, since a socket is what
systemd gives a service as standard output); the event loop is a real one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bastion.app import new_event_loop
from bastion.config.schema import Log
from bastion.observability import sink as sink_module
from bastion.observability.logs import AccessLog, encode
from bastion.observability.sink import PIPE_BUF, LineSink, Output, Sinks, open_file, open_stdout


def record(n: int, pad: int = 0) -> dict[str, Any]:
    """A record shaped like Exchange.log_record()'s."""
    return {
        "time": "2025-03-14T09:26:53+0000",
        "request_id": f"abc{n:010x}",
        "client": "127.0.0.1",
        "method": "GET",
        "host": "api.example.com",
        "path": "/v1/users/" + "x" * pad + f"{n:06d}",
        "route": "users",
        "upstream": "users",
        "target": "127.0.0.1:9001",
        "consumer": None,
        "status": 200,
        "bytes_in": 0,
        "bytes_out": 512,
        "duration_ms": 1.234,
    }


def line(n: int, pad: int = 0) -> bytes:
    return encode(record(n, pad))


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    """Both loops: the gateway runs on uvloop, and the sink must not depend on it."""
    loop = asyncio.new_event_loop() if request.param == "asyncio" else new_event_loop()
    yield loop
    loop.close()


def run(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    return loop.run_until_complete(coro)


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Let the loop run until `check()` holds (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


class Pipe:
    """A pipe whose write end the sink owns (non-blocking) and whose read end the test reads."""

    def __init__(self) -> None:
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        os.set_blocking(self.read_fd, False)
        self.write_fd = write_fd
        self.writes: list[int] = []  # size of every write that went through
        self.received = bytearray()

    def output(self) -> Output:
        def write(view: memoryview) -> int:
            written = os.write(self.write_fd, view)
            self.writes.append(written)
            return written

        return Output(self.write_fd, write, pollable=True, atomic_lines=True, close=None)  # the fixture closes it

    def fill(self) -> None:
        """Make the pipe full, as a reader that stopped reading would."""
        with pytest.raises(BlockingIOError):
            while True:
                os.write(self.write_fd, b"\n" * 4096)

    def drain(self) -> bytes:
        try:
            while chunk := os.read(self.read_fd, 1 << 16):
                self.received += chunk
        except BlockingIOError:
            pass
        return bytes(self.received)

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    handle = Pipe()
    yield handle
    handle.close()


def make_sink(loop: asyncio.AbstractEventLoop, output: Output, limit: int = 64 * 1024, stall: float = 60.0) -> LineSink:
    return LineSink(loop, None, output, limit, stall)


def lines_of(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(text) for text in data.split(b"\n") if text.strip()]


# --- encoding ----------------------------------------------------------------------------------


def test_a_line_is_compact_json_of_the_record_in_its_order() -> None:
    rec = record(7)
    data = encode(rec)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert b": " not in data and b", " not in data
    assert json.loads(data) == rec
    assert list(json.loads(data)) == list(rec)


def test_a_record_orjson_refuses_is_still_written() -> None:
    rec = {**record(1), "consumer": "\udcff", "bytes_in": 1 << 70}  # a lone surrogate, an int past 64 bits
    assert json.loads(encode(rec))["bytes_in"] == 1 << 70


# --- writing ---------------------------------------------------------------------------------


def test_lines_of_one_loop_turn_go_out_in_one_write(loop: asyncio.AbstractEventLoop, pipe: Pipe) -> None:
    sink = make_sink(loop, pipe.output())

    async def scenario() -> None:
        for n in range(10):
            sink.add(line(n))
        assert pipe.writes == []  # nothing written during the turn
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    run(loop, scenario())
    assert len(pipe.writes) == 1
    assert [r["request_id"] for r in lines_of(pipe.drain())] == [record(n)["request_id"] for n in range(10)]


def test_a_full_pipe_never_blocks_and_the_lines_wait_within_the_bound(
    loop: asyncio.AbstractEventLoop, pipe: Pipe
) -> None:
    """The reader stops: lines wait up to the bound, later ones are dropped and counted; when the
    reader comes back the waiting lines arrive whole and in order."""
    limit = 64 * 1024
    sink = make_sink(loop, pipe.output(), limit=limit)
    pipe.fill()
    one = len(line(0))
    total = 3 * limit // one

    async def scenario() -> None:
        for n in range(total):
            sink.add(line(n))
            if n % 50 == 0:
                await asyncio.sleep(0)  # several loop turns, as under traffic
        await asyncio.sleep(0)
        stats = sink.statistics()
        assert stats["pending_bytes"] <= limit
        assert stats["pending_bytes"] > limit - one
        assert stats["dropped_lines"] == total - limit // one
        assert sink.accepting
        # The reader comes back: the loop reports the pipe writable and the sink writes.
        got = pipe.drain()
        fillers = len(got)
        assert got == b"\n" * fillers
        await until(lambda: len(pipe.drain()) > fillers and sink.statistics()["pending_bytes"] == 0)
        await until(lambda: pipe.drain().count(b"\n") - fillers == limit // one)

    run(loop, scenario())
    kept = lines_of(pipe.drain())
    assert [r["request_id"] for r in kept] == [record(n)["request_id"] for n in range(limit // one)]
    assert sink.lines == limit // one
    assert sink.dropped_lines == total - limit // one


def test_partial_writes_keep_lines_whole(loop: asyncio.AbstractEventLoop, pipe: Pipe) -> None:
    """A destination that takes a few bytes at a time, then nothing: what it did not take is
    written later, from where it stopped."""
    calls = 0

    def stingy(view: memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls % 2 == 0:
            raise BlockingIOError
        return os.write(pipe.write_fd, view[:37])

    out = Output(pipe.write_fd, stingy, pollable=True, atomic_lines=False, close=None)
    sink = make_sink(loop, out)

    async def scenario() -> None:
        for n in range(40):
            sink.add(line(n))
        await until(lambda: sink.statistics()["pending_bytes"] == 0)

    run(loop, scenario())
    assert [r["request_id"] for r in lines_of(pipe.drain())] == [record(n)["request_id"] for n in range(40)]
    assert calls > 100  # it really was written 37 bytes at a time


def test_pipe_writes_are_whole_lines_of_at_most_pipe_buf(loop: asyncio.AbstractEventLoop, pipe: Pipe) -> None:
    """So that several workers sharing a pipe never interleave their lines."""
    sink = make_sink(loop, pipe.output())

    async def scenario() -> None:
        for n in range(60):
            sink.add(line(n, pad=n * 7))
        sink.add(line(99, pad=PIPE_BUF + 10))  # one line longer than PIPE_BUF: written on its own
        for n in range(100, 110):
            sink.add(line(n))
        await until(lambda: sink.statistics()["pending_bytes"] == 0)

    run(loop, scenario())
    data = bytearray(pipe.drain())
    sizes = pipe.writes
    assert len(sizes) > 2
    position = 0
    for size in sizes:
        chunk = data[position : position + size]
        position += size
        assert chunk.endswith(b"\n")
        assert size <= PIPE_BUF or chunk.count(b"\n") == 1
    assert len(lines_of(bytes(data))) == 71


# --- dropping ------------------------------------------------------------------------------


def test_a_stalled_destination_drops_waiting_lines_and_skips_encoding(
    loop: asyncio.AbstractEventLoop, pipe: Pipe
) -> None:
    sink = make_sink(loop, pipe.output(), stall=0.05)
    log = AccessLog(sinks=Sinks())
    log._sink = sink
    pipe.fill()

    async def scenario() -> None:
        for n in range(10):
            log.write(record(n))
        await asyncio.sleep(0)
        assert sink.statistics()["pending_bytes"] > 0
        await asyncio.sleep(0.1)  # longer than the stall timeout
        log.write(record(10))  # the next turn's write notices
        await asyncio.sleep(0)
        assert not sink.accepting
        stats = sink.statistics()
        assert stats["stalled"] and stats["pending_bytes"] == 0
        assert stats["dropped_lines"] == 11
        for n in range(11, 20):
            log.write(record(n))
        assert sink.lines == 11  # not encoded, not buffered: dropped
        assert sink.dropped_lines == 20
        # The reader is back: lines are taken again.
        pipe.drain()
        await until(lambda: sink.accepting)
        log.write(record(20))
        await until(lambda: b"abc0000000014" in pipe.drain())

    run(loop, scenario())
    kept = lines_of(pipe.drain())
    assert [r["request_id"] for r in kept] == [record(20)["request_id"]]
    assert not sink.statistics()["stalled"]


def test_a_reader_that_closed_the_pipe_stops_the_output(
    loop: asyncio.AbstractEventLoop, pipe: Pipe, caplog: pytest.LogCaptureFixture
) -> None:
    sink = make_sink(loop, pipe.output())
    os.close(pipe.read_fd)
    pipe.read_fd = os.open(os.devnull, os.O_RDONLY)  # so the fixture's close has something to close

    async def scenario() -> None:
        sink.add(line(1))
        await asyncio.sleep(0)
        assert not sink.accepting
        sink.add(line(2))
        await asyncio.sleep(0.05)

    with caplog.at_level(logging.WARNING, logger="bastion.access"):
        run(loop, scenario())
    stats = sink.statistics()
    assert stats["reader_gone"] and stats["dropped_lines"] == 2
    assert len(pipe.writes) == 0
    assert any("gone" in r.getMessage() for r in caplog.records)


def test_dropped_lines_are_reported_at_most_once_per_interval(
    loop: asyncio.AbstractEventLoop, pipe: Pipe, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sink_module, "WARN_INTERVAL", 0.3)
    sink = make_sink(loop, pipe.output(), limit=64 * 1024)
    big = line(0, pad=70 * 1024)  # over the bound on its own: always dropped

    def reports() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "lines dropped" in r.getMessage()]

    async def scenario() -> None:
        sink.add(big)
        await until(lambda: len(reports()) == 1)
        for _ in range(5):
            sink.add(big)
        await asyncio.sleep(0)
        assert len(reports()) == 1  # the next report waits for the interval
        await until(lambda: len(reports()) == 2)

    with caplog.at_level(logging.WARNING, logger="bastion.access"):
        run(loop, scenario())
    first, second = reports()
    assert first.getMessage().startswith("access log: 1 lines dropped")
    assert second.getMessage().startswith("access log: 5 lines dropped")
    assert "6 dropped since start" in second.getMessage()
    assert second.created - first.created >= 0.3 - 0.01


def test_closing_waits_a_little_then_reports_what_it_could_not_write(
    loop: asyncio.AbstractEventLoop, pipe: Pipe, caplog: pytest.LogCaptureFixture
) -> None:
    sink = make_sink(loop, pipe.output())
    pipe.fill()

    async def scenario() -> None:
        for n in range(5):
            sink.add(line(n))
        await sink.close(wait=0.05)

    with caplog.at_level(logging.WARNING, logger="bastion.access"):
        run(loop, scenario())
    assert sink.dropped_lines == 5
    assert any("5 lines dropped" in r.getMessage() for r in caplog.records)
    sink.add(line(9))  # after closing: counted, never written
    assert sink.dropped_lines == 6


# --- files and reopening --------------------------------------------------------------------------


def test_reopen_after_a_rename_writes_to_a_new_file(loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_bytes(b"kept\n")  # appended to, never truncated
    sinks = Sinks()

    async def scenario() -> None:
        sink = sinks.acquire(str(path), 64 * 1024, 10.0)
        sink.add(line(1))
        await asyncio.sleep(0)
        path.rename(tmp_path / "access.log.1")
        sink.add(line(2))
        await asyncio.sleep(0)  # before the signal: still the renamed file
        assert sinks.reopen(asyncio.get_running_loop()) == [str(path)]
        sink.add(line(3))
        await asyncio.sleep(0)
        await sinks.release(sink)

    run(loop, scenario())
    old = (tmp_path / "access.log.1").read_bytes()
    assert old.startswith(b"kept\n")
    assert [r["request_id"] for r in lines_of(old[5:])] == [record(1)["request_id"], record(2)["request_id"]]
    assert [r["request_id"] for r in lines_of(path.read_bytes())] == [record(3)["request_id"]]


def test_a_reopen_that_fails_keeps_the_old_file(loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "access.log"
    sinks = Sinks()

    async def scenario() -> None:
        sink = sinks.acquire(str(path), 64 * 1024, 10.0)
        directory.rename(tmp_path / "moved")
        assert sinks.reopen(asyncio.get_running_loop()) == []
        sink.add(line(1))
        await asyncio.sleep(0)
        await sinks.release(sink)

    run(loop, scenario())
    assert len(lines_of((tmp_path / "moved" / "access.log").read_bytes())) == 1


def test_snapshots_share_one_sink_per_destination(loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    sinks = Sinks()
    path = str(tmp_path / "a.log")

    async def scenario() -> None:
        first = sinks.acquire(path, 64 * 1024, 10.0)
        second = sinks.acquire(str(tmp_path / "." / "a.log"), 128 * 1024, 5.0)
        assert first is second
        assert first.limit == 128 * 1024  # the config applied last decides
        await sinks.release(first)
        assert sinks.open_sinks() == [first]
        fd = first.output.fd
        os.fstat(fd)
        await sinks.release(second)
        assert sinks.open_sinks() == []
        with pytest.raises(OSError):
            os.fstat(fd)

    run(loop, scenario())


def test_a_file_that_cannot_be_opened_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        open_file(str(tmp_path / "missing" / "access.log"))


# --- standard output ------------------------------------------------------------------------------


@pytest.fixture
def fd1() -> Iterator[Callable[[int], None]]:
    """Put another descriptor on fd 1 for the test; restore the real one after."""
    saved = os.dup(1)

    def put(fd: int) -> None:
        os.dup2(fd, 1)

    yield put
    os.dup2(saved, 1)
    os.close(saved)


def test_stdout_pipe_is_written_without_turning_fd1_non_blocking(fd1: Callable[[int], None], pipe: Pipe) -> None:
    os.set_blocking(pipe.write_fd, True)
    fd1(pipe.write_fd)
    out = open_stdout()
    try:
        assert out.fd != 1
        assert out.pollable and out.atomic_lines
        with pytest.raises(BlockingIOError):
            while True:
                out.write(memoryview(b"x" * 4096))
        assert os.get_blocking(1)  # fd 1's description (shared with stderr, the shell) is untouched
    finally:
        out.close()


def test_stdout_socket_is_written_without_turning_fd1_non_blocking(fd1: Callable[[int], None]) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        fd1(ours.fileno())
        out = open_stdout()
        try:
            with pytest.raises(BlockingIOError):
                while True:
                    out.write(memoryview(b"x" * 4096))
            assert os.get_blocking(1)
            assert theirs.recv(10) == b"x" * 10
        finally:
            out.close()


def test_stdout_regular_file_is_written_directly(fd1: Callable[[int], None], tmp_path: Path) -> None:
    with open(tmp_path / "out", "wb") as handle:
        fd1(handle.fileno())
        out = open_stdout()
        assert out.fd == 1 and not out.pollable
        out.write(memoryview(b"hello\n"))
        out.close()  # not ours: fd 1 stays open
        os.fstat(1)
    assert (tmp_path / "out").read_bytes() == b"hello\n"


def test_a_failing_destination_is_retried_on_a_timer_and_reported(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/dev/full fails every write (ENOSPC) and cannot be polled: a timer retries, without
    spinning, and the error is logged once per interval, not once per try."""
    monkeypatch.setattr(sink_module, "RETRY", 0.05)
    sink = LineSink(loop, "/dev/full", open_file("/dev/full"), 64 * 1024, 60.0)

    async def scenario() -> None:
        for n in range(3):
            sink.add(line(n))
        await until(lambda: sink.write_errors >= 3)
        stats = sink.statistics()
        assert stats["pending_bytes"] == 3 * len(line(0))  # kept for a later try, not dropped
        assert stats["dropped_lines"] == 0
        await sink.close(wait=0)

    with caplog.at_level(logging.ERROR, logger="bastion.access"):
        run(loop, scenario())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["access log: cannot write to /dev/full: No space left on device"]
    assert sink.dropped_lines == 3


def test_a_line_after_a_snapshot_closed_goes_to_the_sink_while_another_holds_it(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    """A request still running on a retired snapshot ends after that snapshot's close."""
    sinks = Sinks()
    path = tmp_path / "a.log"
    settings = Log(access_file=str(path))
    old, new = AccessLog(settings, sinks), AccessLog(settings, sinks)

    async def scenario() -> LineSink:
        old.open()
        new.open()
        await old.close()
        old.write(record(1))  # the sink is still open for the new snapshot: written
        await asyncio.sleep(0)
        await new.close()
        old.write(record(2))  # nobody holds it any more: counted, not written
        return sinks_of(old)

    sink = run(loop, scenario())
    assert [r["request_id"] for r in lines_of(path.read_bytes())] == [record(1)["request_id"]]
    assert sink.dropped_lines == 1


def sinks_of(log: AccessLog) -> LineSink:
    assert log._sink is not None
    return log._sink


def test_no_standard_output_is_an_error(fd1: Callable[[int], None], monkeypatch: pytest.MonkeyPatch) -> None:
    """fd 1 closed at start: Python has no sys.stdout, and fd 1 may be any later descriptor."""
    monkeypatch.setattr("sys.__stdout__", None)
    with pytest.raises(OSError, match="standard output is closed"):
        open_stdout()
    monkeypatch.undo()
    with select.epoll() as epoll:
        fd1(epoll.fileno())  # what fd 1 was in a gateway started with `>&-`
        with pytest.raises(OSError, match="not a file, pipe, terminal or socket"):
            open_stdout()
