"""The in-process cache, for a single server instance without Redis.

Every operation runs without awaiting in between, so on one event loop each is atomic,
as the Redis commands and scripts are.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from nodepool.cache.base import Cache, check_ttl
from nodepool.cache.errors import CacheUnavailable

__all__ = ["MemoryCache"]

# Expired entries are also swept at most this often, so keys that are never read again
# (rate-limit counters of one-off peers) do not pile up.
_SWEEP_INTERVAL = 5.0


@dataclass(slots=True)
class _Entry:
    value: bytes | int | str
    expires_at: float | None


class MemoryCache(Cache):
    """A :class:`Cache` held in this process. ``clock`` must be monotonic."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._heartbeats: dict[str, bytes] = {}
        self._subscribers: dict[str, set[asyncio.Queue[bytes]]] = {}
        self._next_sweep = clock() + _SWEEP_INTERVAL
        self._closed = False

    # -- internals ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CacheUnavailable("the cache is closed")

    def _expiry(self, ttl: float | None) -> float | None:
        return None if ttl is None else self._clock() + check_ttl(ttl) / 1000

    def _live(self, key: str) -> _Entry | None:
        self._check_open()
        now = self._clock()
        if now >= self._next_sweep:
            self._entries = {
                k: e for k, e in self._entries.items() if e.expires_at is None or e.expires_at > now
            }
            self._next_sweep = now + _SWEEP_INTERVAL
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at is not None and entry.expires_at <= now:
            del self._entries[key]
            return None
        return entry

    # -- key/value ----------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        entry = self._live(f"kv:{key}")
        if entry is None:
            return None
        assert isinstance(entry.value, bytes)
        return entry.value

    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        self._live(f"kv:{key}")
        self._entries[f"kv:{key}"] = _Entry(bytes(value), self._expiry(ttl))

    async def set_if_absent(self, key: str, value: bytes, *, ttl: float | None = None) -> bool:
        if self._live(f"kv:{key}") is not None:
            return False
        self._entries[f"kv:{key}"] = _Entry(bytes(value), self._expiry(ttl))
        return True

    async def delete(self, key: str) -> bool:
        if self._live(f"kv:{key}") is None:
            return False
        del self._entries[f"kv:{key}"]
        return True

    # -- rate limiting ------------------------------------------------------------------

    async def hit(self, key: str, window_seconds: float) -> int:
        entry = self._live(f"rl:{key}")
        if entry is None:
            entry = self._entries[f"rl:{key}"] = _Entry(0, self._expiry(window_seconds))
        assert isinstance(entry.value, int)
        entry.value += 1
        return entry.value

    async def reset(self, key: str) -> None:
        self._check_open()
        self._entries.pop(f"rl:{key}", None)

    # -- heartbeat buffer ---------------------------------------------------------------

    async def put_heartbeat(self, node_id: str, payload: bytes) -> None:
        self._check_open()
        self._heartbeats[node_id] = bytes(payload)

    async def drain_heartbeats(self) -> dict[str, bytes]:
        self._check_open()
        taken, self._heartbeats = self._heartbeats, {}
        return taken

    # -- leases -------------------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        entry = self._live(f"lease:{name}")
        if entry is not None and entry.value != holder:
            return False
        self._entries[f"lease:{name}"] = _Entry(holder, self._expiry(ttl))
        return True

    async def renew_lease(self, name: str, holder: str, ttl: float) -> bool:
        entry = self._live(f"lease:{name}")
        if entry is None or entry.value != holder:
            return False
        entry.expires_at = self._expiry(ttl)
        return True

    async def release_lease(self, name: str, holder: str) -> bool:
        entry = self._live(f"lease:{name}")
        if entry is None or entry.value != holder:
            return False
        del self._entries[f"lease:{name}"]
        return True

    # -- pub/sub ------------------------------------------------------------------------

    async def publish(self, channel: str, message: bytes) -> None:
        self._check_open()
        for queue in self._subscribers.get(channel, ()):
            queue.put_nowait(bytes(message))

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        self._check_open()
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._subscribers.setdefault(channel, set()).add(queue)
        try:
            yield _Subscription(queue)
        finally:
            queues = self._subscribers.get(channel)
            if queues is not None:
                queues.discard(queue)
                if not queues:
                    del self._subscribers[channel]

    # -- lifecycle ----------------------------------------------------------------------

    async def ping(self) -> None:
        self._check_open()

    async def close(self) -> None:
        self._closed = True
        self._entries.clear()
        self._heartbeats.clear()


class _Subscription:
    """The message iterator of one subscription (a plain class, not an async generator,
    so nothing is left for the event loop to finalise)."""

    def __init__(self, queue: asyncio.Queue[bytes]) -> None:
        self._queue = queue

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> bytes:
        return await self._queue.get()
