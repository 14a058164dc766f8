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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from nodepool.store.errors import StoreUnavailable

__all__ = ["StoreCalls"]

P = ParamSpec("P")
R = TypeVar("R")


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
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            raise StoreUnavailable("the database did not answer in time") from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
