"""The parts a server is assembled from: each starts and stops.

``app.py`` lists them in start order; :class:`Components` starts them in that order and
stops them in reverse, and a part that fails to start stops every part started before
it. A new background loop (a failure detector, a scheduler) is one more :class:`Periodic`
in that list; a new long-running watcher one more :class:`Background`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from nodepool.background import Lease, every, run_limit

__all__ = ["Background", "Component", "Components", "Periodic"]

_log = logging.getLogger(__name__)


class Component(Protocol):
    async def start(self) -> None:
        """Ready to serve when it returns; raises when it cannot start."""

    async def stop(self) -> None:
        """Releases what :meth:`start` took; safe to call once after a failed start."""


class Components:
    """Started in order, stopped in reverse order."""

    def __init__(self) -> None:
        self._started: list[Component] = []

    async def start(self, *components: Component) -> None:
        for component in components:
            # Kept before it starts: one that fails half-way is stopped with the rest.
            self._started.append(component)
            await component.start()

    async def stop(self) -> None:
        while self._started:
            component = self._started.pop()
            try:
                await component.stop()
            except Exception as exc:
                # Stopping goes on: one part that fails to stop must not leak the rest.
                _log.warning("stopping %s failed: %s", type(component).__name__, exc)


class Background:
    """A coroutine that runs for the life of the server (a subscription, a poller)."""

    def __init__(
        self,
        run: Callable[[], Coroutine[Any, Any, None]],
        *,
        ready: Callable[[], Awaitable[object]] | None = None,
        on_stop: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._run = run
        self._ready = ready
        self._on_stop = on_stop
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        if self._ready is not None:
            ready = asyncio.ensure_future(self._ready())
            # If the coroutine dies before it is ready, say why instead of waiting forever.
            done, _ = await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
            if ready not in done:
                ready.cancel()
                task, self._task = self._task, None
                task.result()  # raises what ended it
                raise RuntimeError("a background task ended before it was ready")
            ready.result()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._on_stop is not None:
            await self._on_stop()


class Periodic(Background):
    """``work`` every ``seconds`` (see :func:`nodepool.background.every`).

    ``on_stop`` runs once more after the loop ends (a last flush of buffered work).
    """

    def __init__(
        self,
        seconds: float,
        work: Callable[[], Awaitable[object]],
        what: str,
        *,
        timeout: float | None = None,
        lease: Lease | None = None,
        on_stop: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        run_limit(seconds, what, timeout, lease)  # a lease that would lapse fails here, early
        super().__init__(
            lambda: every(seconds, work, what, timeout=timeout, lease=lease), on_stop=on_stop
        )
