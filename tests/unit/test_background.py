"""Periodic loops: bounded runs, one line per outage, and a lease for one-instance work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import pytest

from nodepool.background import Lease, every
from nodepool.cache import MemoryCache
from nodepool.server.components import Background, Components, Periodic

WAIT = 10.0  # generous: how long a test waits for something that must happen


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while True:  # polls plain counters the loops under test bump
            if condition():
                return
            await asyncio.sleep(0.005)


async def _run(loop: Awaitable[None]) -> asyncio.Task[None]:
    return asyncio.ensure_future(loop)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_an_outage_logs_one_warning_and_one_recovery_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 5:
            raise ConnectionError("database went away")

    caplog.set_level(logging.INFO, logger="nodepool.background")
    task = await _run(every(0.001, flaky, "flaky work"))
    await _until(lambda: runs >= 8)
    await _stop(task)

    records = [r for r in caplog.records if r.name == "nodepool.background"]
    assert [r.levelname for r in records] == ["WARNING", "INFO"]
    assert "flaky work failing" in records[0].getMessage()
    assert "database went away" in records[0].getMessage()
    assert "flaky work recovered" in records[1].getMessage()
    assert all(r.exc_info is None for r in records), "no traceback per outage"


async def test_a_run_that_hangs_is_cut_off_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs = 0

    async def hangs_once() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            await asyncio.Event().wait()  # never set

    caplog.set_level(logging.INFO, logger="nodepool.background")
    task = await _run(every(0.001, hangs_once, "hanging work", timeout=0.05))
    await _until(lambda: runs >= 3)
    await _stop(task)
    messages = [r.getMessage() for r in caplog.records if r.name == "nodepool.background"]
    assert any("did not finish in time" in m for m in messages)


async def test_only_the_lease_holder_runs_and_another_takes_over_when_it_stops() -> None:
    cache = MemoryCache()
    ran: dict[str, int] = {"a": 0, "b": 0}

    def work(holder: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            ran[holder] += 1

        return run

    def loop(holder: str) -> Awaitable[None]:
        lease = Lease(cache, "detector", holder, ttl=5.0)
        return every(0.001, work(holder), f"detector {holder}", timeout=1.0, lease=lease)

    first = await _run(loop("a"))
    await _until(lambda: ran["a"] >= 5)
    second = await _run(loop("b"))
    await _until(lambda: ran["a"] >= 50)
    assert ran["b"] == 0, "the second instance ran while the first held the lease"

    await _stop(first)  # releases the lease on the way out
    await _until(lambda: ran["b"] >= 5)
    await _stop(second)
    await cache.close()


async def test_a_lease_that_would_lapse_during_a_run_is_refused() -> None:
    cache = MemoryCache()

    async def nothing() -> None:
        return None

    lease = Lease(cache, "scheduler", "a", ttl=2.0)
    with pytest.raises(ValueError, match="lease must outlast"):
        every(1.0, nothing, "scheduler", timeout=5.0, lease=lease)
    with pytest.raises(ValueError, match="lease must outlast"):
        Periodic(1.0, nothing, "scheduler", timeout=5.0, lease=lease)
    await cache.close()


class _Recorder:
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    async def start(self) -> None:
        self.log.append(f"start {self.name}")
        if self.fail:
            raise RuntimeError("cannot start")

    async def stop(self) -> None:
        self.log.append(f"stop {self.name}")


async def test_components_stop_in_reverse_and_a_failed_start_stops_what_started() -> None:
    log: list[str] = []
    parts = Components()
    await parts.start(_Recorder("a", log), _Recorder("b", log))
    await parts.stop()
    assert log == ["start a", "start b", "stop b", "stop a"]

    log.clear()
    parts = Components()
    with pytest.raises(RuntimeError):
        await parts.start(_Recorder("a", log), _Recorder("b", log, fail=True), _Recorder("c", log))
    await parts.stop()
    assert log == ["start a", "start b", "stop b", "stop a"]


async def test_a_periodic_component_flushes_once_more_when_stopped() -> None:
    flushed: list[str] = []

    async def flush() -> None:
        flushed.append("flush")

    part = Periodic(3600, flush, "audit write", on_stop=flush)
    await part.start()
    await part.stop()
    assert flushed == ["flush"]


async def test_a_background_task_that_dies_before_ready_fails_the_start() -> None:
    async def dies() -> None:
        raise ConnectionError("no subscription")

    async def never_ready() -> None:
        await asyncio.Event().wait()

    part = Background(dies, ready=never_ready)
    with pytest.raises(ConnectionError):
        await part.start()
    await part.stop()
