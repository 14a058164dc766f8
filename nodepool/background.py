"""Periodic background work: the one loop every watcher, flusher and detector runs in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from nodepool.cache import Cache, CacheUnavailable

__all__ = ["DEFAULT_RUN_TIMEOUT", "Lease", "every", "in_thread", "run_limit"]

_log = logging.getLogger(__name__)

# A run with no timeout of its own may take this long before it counts as failed.
DEFAULT_RUN_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Lease:
    """Work that must run on one instance at a time: only the holder of ``name`` runs it.

    Several servers on one PostgreSQL + Redis each run the loop; the lease in the shared
    cache decides which of them does the work on each tick. The holder renews it before
    every run, so ``ttl`` must outlast one interval plus one run: if the holder dies, another
    instance takes over within ``ttl``.
    """

    cache: Cache
    name: str
    holder: str
    ttl: float

    async def hold(self, holding: bool) -> bool:
        """Takes or renews the lease; True while this instance holds it."""
        if holding:
            return await self.cache.renew_lease(self.name, self.holder, self.ttl)
        return await self.cache.acquire_lease(self.name, self.holder, self.ttl)

    async def release(self) -> None:
        await self.cache.release_lease(self.name, self.holder)


def every(
    seconds: float,
    work: Callable[[], Awaitable[object]],
    what: str,
    *,
    timeout: float | None = None,
    lease: Lease | None = None,
) -> Coroutine[Any, Any, None]:
    """Runs ``work`` every ``seconds``, forever, each run bounded by ``timeout``.

    A failed or timed-out run is retried at the next tick: a loop that died would silently
    freeze whatever it keeps fresh (a policy, a certificate, the audit log). An outage is
    logged once when it starts (a warning, no traceback) and once when it ends, not on
    every tick. With a ``lease`` the work runs only while this instance holds it.
    Arguments are checked here, before the loop is scheduled.
    """
    return _every(seconds, work, what, run_limit(seconds, what, timeout, lease), lease)


def run_limit(seconds: float, what: str, timeout: float | None, lease: Lease | None) -> float:
    """How long one run of a loop may take; ValueError when its lease would lapse first."""
    limit = DEFAULT_RUN_TIMEOUT if timeout is None else timeout
    if lease is not None and lease.ttl <= seconds + limit:
        raise ValueError(f"{what}: the lease must outlast one interval plus one run")
    return limit


async def _every(
    seconds: float,
    work: Callable[[], Awaitable[object]],
    what: str,
    limit: float,
    lease: Lease | None,
) -> None:
    failing = False
    holding = False
    try:
        while True:
            await asyncio.sleep(seconds)
            try:
                async with asyncio.timeout(limit):
                    if lease is not None:
                        holding = await lease.hold(holding)
                        if not holding:
                            continue
                    await work()
            except Exception as exc:
                if isinstance(exc, CacheUnavailable):
                    # Unsure whether the lease is still ours: act as if it is not.
                    holding = False
                if not failing:
                    _log.warning("%s failing, will retry every %gs: %s", what, seconds, _why(exc))
                failing = True
                continue
            if failing:
                _log.info("%s recovered", what)
                failing = False
    finally:
        if lease is not None and holding:
            # Hand the work over now rather than when the lease runs out.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(1.0):
                    await lease.release()


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "a run did not finish in time"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def in_thread(function: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    """``function`` as awaitable work that runs off the event loop (file and disk reads)."""
    return lambda: asyncio.to_thread(function)
