"""H2Pool's bookkeeping against a real h2c origin, driven step by step from one event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from bastion.config.types import HostPort
from bastion.errors import Overloaded
from bastion.upstream.h2_pool import H2Pool
from bastion.upstream.pool import PoolLimits, WaitQueue
from h2_support import H2Origin


@pytest.fixture
def origin() -> Iterator[H2Origin]:
    handle = H2Origin(max_streams=1)
    yield handle
    handle.stop()


def _pool(origin: H2Origin, queue: WaitQueue) -> H2Pool:
    limits = PoolLimits(max_connections=1, max_idle=4, idle_timeout=60, connect_timeout=5)
    return H2Pool(HostPort("127.0.0.1", origin.port), limits, queue)


def test_a_waiter_that_gives_up_after_being_handed_a_slot_passes_it_on(origin: H2Origin) -> None:
    async def scenario() -> None:
        pool = _pool(origin, WaitQueue(size=5, timeout=5))
        held = await pool.acquire()
        assert pool.saturated()
        first = asyncio.ensure_future(pool.acquire())
        second = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0.05)
        assert len(pool.waiters) == 2
        pool.release(held, True)  # the slot goes to `first`...
        first.cancel()  # ...which leaves before it runs: `second` must get the slot
        stream = await asyncio.wait_for(second, 2)
        assert stream.conn is held.conn
        assert pool.statistics()["open"] == 1
        pool.release(stream, True)
        pool.close()

    asyncio.run(scenario())


def test_a_full_queue_refuses_at_once_and_a_timed_out_waiter_leaves(origin: H2Origin) -> None:
    async def scenario() -> None:
        queue = WaitQueue(size=1, timeout=0.2)
        pool = _pool(origin, queue)
        held = await pool.acquire()
        waiting = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await pool.acquire()  # the queue's one place is taken
        with pytest.raises(Overloaded):
            await waiting  # timed out
        assert (queue.rejected, queue.timeouts, queue.waiting) == (1, 1, 0)
        assert not pool.waiters
        pool.release(held, True)
        assert not pool.saturated()
        pool.close()

    asyncio.run(scenario())
