"""Periodic background work: the one loop every watcher and flusher runs in."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

__all__ = ["every", "in_thread"]

_log = logging.getLogger(__name__)


async def every(seconds: float, work: Callable[[], Awaitable[object]], what: str) -> None:
    """Runs ``work`` every ``seconds``, forever.

    A failure is logged and retried at the next tick: a loop that died would silently
    freeze whatever it keeps fresh (a policy, a certificate, the audit log). An outage is
    logged once when it starts and once when it ends, not at every tick in between.
    """
    failing = False
    while True:
        await asyncio.sleep(seconds)
        try:
            await work()
        except Exception:
            if not failing:
                _log.exception("%s failed; retrying quietly until it works again", what)
            failing = True
        else:
            if failing:
                _log.warning("%s works again", what)
            failing = False


def in_thread(function: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    """``function`` as awaitable work that runs off the event loop (file and disk reads)."""
    return lambda: asyncio.to_thread(function)
