"""Store calls from async code: one bounded executor, one bounded wait.

Every blocking store method the server calls goes through a :class:`StoreCalls`: its
threads are sized with the connection pool, so threads never wait for connections nor
connections for threads, and each wait is bounded, so a hung database turns into
:class:`~nodepool.store.errors.StoreUnavailable` within ``timeout`` instead of a call that
never returns. The event loop itself never blocks.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, ParamSpec, TypeVar

from nodepool.store.errors import StoreUnavailable

__all__ = ["GroupCommit", "StoreCalls"]

P = ParamSpec("P")
R = TypeVar("R")
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class StoreCalls:
    def __init__(self, threads: int, timeout: float, *, name: str = "nodepool-store") -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self.threads = threads
        self.timeout = timeout

    async def __call__(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """``function(*args, **kwargs)`` on a store thread; :class:`StoreUnavailable` when it
        has not answered within the timeout (the thread finishes on its own)."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, functools.partial(function, *args, **kwargs))
        try:
            # Not asyncio.wait_for: on Python 3.11 it returns the result when a cancellation
            # arrives as the call finishes, so the caller (a background loop being stopped)
            # never sees the cancellation and runs on. asyncio.timeout keeps it.
            async with asyncio.timeout(self.timeout):
                return await future
        except TimeoutError:
            raise StoreUnavailable("the database did not answer in time") from None

    def shutdown(self, *, wait: bool = True) -> None:
        """Drops queued calls and (with ``wait``) waits for running ones, so the store can
        close after."""
        self._executor.shutdown(wait=wait, cancel_futures=True)


class GroupCommit(Generic[ItemT, ResultT]):
    """Concurrent callers' items applied together: one store call, one transaction.

    The first caller starts a flush; items that arrive while a flush runs go in the next
    one. Under load each transaction carries many callers' work (a group commit); alone,
    a caller waits for nothing but its own call.
    """

    def __init__(
        self, apply: Callable[[list[ItemT]], Awaitable[list[ResultT]]], *, max_items: int = 500
    ) -> None:
        self._apply = apply
        self._max_items = max_items
        self._queue: list[tuple[ItemT, asyncio.Future[ResultT]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def submit(self, item: ItemT) -> ResultT:
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_items]
                del self._queue[: self._max_items]
                try:
                    results = await self._apply([item for item, _ in batch])
                except Exception as exc:  # every caller in the batch gets the failure
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():  # a caller that gave up is not answered
                        future.set_result(result)
        finally:
            self._flushing = None
