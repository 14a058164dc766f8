"""The cache contract: one async interface, an in-process and a Redis backend.

Both backends pass ``tests/integration/test_cache_contract.py``. Values are bytes; keys
and names are plain strings that each backend scopes to its own namespace, so several
Node Pool deployments (or test runs) can share one Redis server.

Every method may raise :class:`~nodepool.cache.errors.CacheUnavailable` and nothing
else from the backend. ``ttl`` and window arguments are seconds (fractions allowed, at
least one millisecond); ``None`` as a ttl means "no expiry".
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

__all__ = ["Cache", "check_ttl"]


def check_ttl(ttl: float) -> int:
    """``ttl`` seconds as whole milliseconds; a ``ValueError`` for anything under 1 ms."""
    milliseconds = int(ttl * 1000)
    if milliseconds < 1:
        raise ValueError("ttl must be at least 0.001 seconds")
    return milliseconds


class Cache(abc.ABC):
    """Shared fast state for one Node Pool deployment (see the module docstring)."""

    # -- key/value ---------------------------------------------------------------------

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or ``None`` if absent or expired."""

    @abc.abstractmethod
    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        """Store ``value``, replacing any previous value and its ttl."""

    @abc.abstractmethod
    async def set_if_absent(self, key: str, value: bytes, *, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` holds nothing; ``True`` if it was stored."""

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove ``key``; ``True`` if it existed."""

    # -- rate limiting -----------------------------------------------------------------

    @abc.abstractmethod
    async def hit(self, key: str, window_seconds: float) -> int:
        """Count one event for ``key`` and return the count in the current fixed window.

        The first hit opens a window of ``window_seconds``; when it ends the count starts
        again from 1. Atomic across every instance sharing the cache.
        """

    @abc.abstractmethod
    async def reset(self, key: str) -> None:
        """Forget the count of ``key``: the next :meth:`hit` opens a new window at 1.

        Counters live apart from key/value entries: :meth:`delete` does not touch them.
        """

    # -- heartbeat buffer --------------------------------------------------------------

    @abc.abstractmethod
    async def put_heartbeat(self, node_id: str, payload: bytes) -> None:
        """Buffer the latest heartbeat of ``node_id`` (a newer one replaces it)."""

    @abc.abstractmethod
    async def drain_heartbeats(self) -> dict[str, bytes]:
        """Atomically take every heartbeat buffered since the last drain.

        Each buffered entry is returned by exactly one drain, even when several
        instances drain concurrently.
        """

    # -- leases ------------------------------------------------------------------------

    @abc.abstractmethod
    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Take lease ``name`` for ``holder`` for ``ttl`` seconds.

        ``True`` if it was free (or expired) or already held by ``holder`` (then it is
        extended); ``False`` while someone else holds it.
        """

    @abc.abstractmethod
    async def renew_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Extend the lease to ``ttl`` from now, only if ``holder`` still holds it."""

    @abc.abstractmethod
    async def release_lease(self, name: str, holder: str) -> bool:
        """Give the lease up, only if ``holder`` holds it; ``True`` if it was released."""

    # -- pub/sub -----------------------------------------------------------------------

    @abc.abstractmethod
    async def publish(self, channel: str, message: bytes) -> None:
        """Send ``message`` to every current subscriber of ``channel`` (at most once,
        no persistence: a subscriber that is not listening misses it)."""

    @abc.abstractmethod
    def subscribe(self, channel: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Subscribe to ``channel``::

            async with cache.subscribe("revocations") as messages:
                async for message in messages:
                    ...

        The subscription is active once the ``async with`` body starts, so messages
        published after that are delivered in order; leaving the block unsubscribes.
        """

    # -- lifecycle ---------------------------------------------------------------------

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return when the cache answers; :class:`CacheUnavailable` otherwise."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; the cache must not be used afterwards."""
