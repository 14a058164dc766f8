"""The scheduler places tasks only on the instance that holds its lease."""

from __future__ import annotations

import asyncio
from typing import Any

from nodepool.background import Lease
from nodepool.cache.memory import MemoryCache
from nodepool.domain.tasks import DeliveryHub, Scheduler


class _CountingScheduler(Scheduler):
    """The real run loop; each round only counted (the store is not what is tested)."""

    def __init__(self) -> None:
        super().__init__(store=Any, calls=Any, nodes=Any, hub=DeliveryHub())  # type: ignore[arg-type]
        self.rounds = 0

    async def place(self) -> int:
        self.rounds += 1
        return 0


async def _rounds_after_wakes(scheduler: _CountingScheduler, wakes: int = 5) -> int:
    before = scheduler.rounds
    for _ in range(wakes):
        scheduler.wake()
        await asyncio.sleep(0.02)
    return scheduler.rounds - before


async def test_a_scheduler_without_the_lease_does_not_place() -> None:
    cache = MemoryCache()
    assert await cache.acquire_lease("tasks.scheduler", "other-instance", 30)
    scheduler = _CountingScheduler()
    running = asyncio.create_task(scheduler.run(Lease(cache, "tasks.scheduler", "me", 0.3)))
    try:
        assert await _rounds_after_wakes(scheduler) == 0
        # The holder goes away: this instance takes the lease and starts placing.
        assert await cache.release_lease("tasks.scheduler", "other-instance")
        await asyncio.sleep(0.2)
        assert await _rounds_after_wakes(scheduler) > 0
        assert not await cache.acquire_lease("tasks.scheduler", "other-instance", 30)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await cache.close()


async def test_without_a_lease_every_wake_places() -> None:
    scheduler = _CountingScheduler()
    running = asyncio.create_task(scheduler.run())
    try:
        assert await _rounds_after_wakes(scheduler) > 0
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


class _FailingOnceScheduler(_CountingScheduler):
    async def place(self) -> int:
        self.rounds += 1
        if self.rounds == 1:
            raise RuntimeError("a bug in one round")
        return 0


async def test_a_round_that_fails_does_not_end_the_scheduler() -> None:
    scheduler = _FailingOnceScheduler()
    running = asyncio.create_task(scheduler.run())
    try:
        scheduler.wake()
        await asyncio.sleep(1.3)  # the failed round, then the retry a second later
        assert not running.done()
        assert await _rounds_after_wakes(scheduler) > 0
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
