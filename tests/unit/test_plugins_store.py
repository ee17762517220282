"""GCRA arithmetic with an injected clock, the local store, and the shared-memory table across processes."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bastion.store import memory
from bastion.store.base import NS, gcra
from bastion.store.memory import LocalStore, MemoryStore, SharedTable, attach, detach, table_path

MINUTE = 60 * NS
T0 = 1_700_000_000 * NS


def run(limit: int, period: int, burst: int, times: list[int]) -> list[bool]:
    tat = None
    out = []
    for now in times:
        new, result = gcra(tat, now, limit, period, burst)
        if new is not None:
            tat = new
        out.append(result.allowed)
    return out


def test_a_burst_of_limit_then_one_per_interval() -> None:
    tat = None
    results = []
    for _ in range(6):
        new, result = gcra(tat, T0, 5, MINUTE, 5)
        tat = new if new is not None else tat
        results.append(result)
    assert [r.allowed for r in results] == [True] * 5 + [False]
    assert [r.remaining for r in results] == [4, 3, 2, 1, 0, 0]
    assert results[0].reset == 12.0
    assert results[4].reset == 60.0
    assert results[5].retry_after == 12.0
    # 12 s later exactly one more passes.
    _, later = gcra(tat, T0 + 12 * NS, 5, MINUTE, 5)
    assert later.allowed and later.remaining == 0


def test_no_double_burst_at_any_edge() -> None:
    """Over any interval of length t at most burst + t * limit / period requests pass."""
    rng = random.Random(7)
    limit, period, burst = 10, NS, 10
    times = sorted(T0 + rng.randrange(0, 5 * NS) for _ in range(2000))
    allowed = [t for t, ok in zip(times, run(limit, period, burst, times), strict=True) if ok]
    for i, start in enumerate(allowed):
        for end_index in range(i, len(allowed)):
            span = allowed[end_index] - start
            count = end_index - i + 1
            assert count <= burst + span * limit / period + 1e-9
    # A fixed 1-second window would let 20 through around a window edge; GCRA lets 10 + a sliver.
    edge = [T0 + NS - 1000 + k for k in range(20)] + [T0 + NS + 1000 + k for k in range(20)]
    assert sum(run(limit, period, burst, edge)) == 10


def test_burst_one_is_strict_spacing() -> None:
    times = [T0 + k * NS // 20 for k in range(40)]  # 20 per second offered for 2 s
    assert sum(run(10, NS, 1, times)) == 20


def test_idle_key_and_clock_step_back_start_fresh() -> None:
    _, result = gcra(T0 - 5 * MINUTE, T0, 5, MINUTE, 5)
    assert result.allowed and result.remaining == 4
    _, result = gcra(T0 + 10 * MINUTE, T0, 5, MINUTE, 5)  # far ahead of anything reachable
    assert result.allowed and result.remaining == 4


def test_cost_and_remaining_never_negative() -> None:
    _, result = gcra(None, T0, 5, MINUTE, 5, cost=6)
    assert not result.allowed and result.remaining >= 0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def test_local_store_counts_keys_apart_and_sweeps_idle_ones() -> None:
    clock = Clock()
    store = LocalStore(clock, sweep_at=3)

    async def main() -> None:
        assert (await store.rate("a", 1, 60, 1)).allowed
        assert not (await store.rate("a", 1, 60, 1)).allowed
        assert (await store.rate("b", 1, 60, 1)).allowed
        assert (await store.rate("c", 1, 60, 1)).allowed
        clock.now += 61 * NS
        assert (await store.rate("d", 1, 60, 1)).allowed  # over sweep_at: idle a, b, c go
        assert store.statistics()["keys"] == 1

    asyncio.run(main())


def test_table_path_is_per_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_STATE_DIR", str(tmp_path))
    a = table_path(str(tmp_path / "a.yaml"))
    assert a == table_path(str(tmp_path / "x" / ".." / "a.yaml"))
    assert a != table_path(str(tmp_path / "b.yaml"))
    assert a.startswith(str(tmp_path))


def test_shared_table_is_shared_and_removed_by_the_last_user(tmp_path: Path) -> None:
    path = str(tmp_path / "t.gcra")
    first = attach(path)
    second = attach(path)
    assert first is second
    assert first.rate("k", 2, MINUTE, 2, 1).allowed
    other = SharedTable(path)  # as another process would: its own mapping of the same file
    assert other.rate("k", 2, MINUTE, 2, 1).allowed
    assert not first.rate("k", 2, MINUTE, 2, 1).allowed
    other.close()
    assert os.path.exists(path)  # still attached here
    detach(second)
    detach(first)
    assert not os.path.exists(path)


def test_full_window_evicts_the_key_closest_to_expiry(tmp_path: Path) -> None:
    clock = Clock()
    table = SharedTable(str(tmp_path / "small.gcra"), slots=1)
    table.clock = clock
    try:
        for i in range(memory.PROBE):
            clock.now += 1
            assert table.rate(f"key{i}", 1, MINUTE, 1, 1).allowed
        assert table.used() == memory.PROBE
        assert table.rate("one-too-many", 1, MINUTE, 1, 1).allowed
        assert table.evictions == 1
        assert table.rate("key0", 1, MINUTE, 1, 1).allowed  # key0 (oldest) was forgotten
        assert not table.rate("key5", 1, MINUTE, 1, 1).allowed  # the others were not
    finally:
        table.close()


def test_memory_store_falls_back_to_local_when_shared_memory_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore(str(tmp_path / "missing-dir" / "t.gcra"))

    async def main() -> None:
        assert (await store.rate("k", 1, 60, 1)).allowed
        assert not (await store.rate("k", 1, 60, 1)).allowed
        await store.close()

    asyncio.run(main())
    assert store.statistics()["shared"] is False
    assert "rate limits are per process" in caplog.text


def test_memory_store_attaches_lazily_and_detaches_on_close(tmp_path: Path) -> None:
    path = str(tmp_path / "lazy.gcra")
    store = MemoryStore(path)
    assert not os.path.exists(path)

    async def main() -> None:
        assert (await store.rate("k", 5, 60, 5)).remaining == 4
        assert os.path.exists(path)
        await store.close()
        await store.close()

    asyncio.run(main())
    assert not os.path.exists(path)


WORKER = textwrap.dedent(
    """
    import sys, time
    from bastion.store.memory import SharedTable
    from bastion.store.base import NS
    table = SharedTable(sys.argv[1])
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()  # start together
    allowed = sum(table.rate(f"key{i % 4}", 50, 3600 * NS, 50, 1).allowed for i in range(400))
    print(allowed)
    sys.stdin.readline()  # stay attached until told
    table.close()
    """
)


def test_two_processes_share_one_limit(tmp_path: Path) -> None:
    """Four keys of 50 per hour, hammered by two processes at once: 200 pass in total, not 400."""
    path = str(tmp_path / "shared.gcra")
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        counts = [int(proc.stdout.readline()) for proc in procs if proc.stdout is not None]
        assert sum(counts) == 200, counts
        assert os.path.exists(path)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("bye\n")
            proc.stdin.flush()
            assert proc.wait(20) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert not os.path.exists(path)  # the last one out removed it
