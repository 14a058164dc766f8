"""The Redis cache, shared by every server instance of a deployment.

Each compound operation is one command or one Lua script, so it is atomic on the
server whatever the number of instances.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from nodepool.cache.base import Cache, check_ttl
from nodepool.cache.errors import CacheUnavailable

__all__ = ["RedisCache"]

_HIT = """
local n = redis.call('INCR', KEYS[1])
-- Also when the key somehow has no ttl, so a counter can never live forever.
if n == 1 or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return n
"""

_DRAIN = """
local entries = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return entries
"""

_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# How long one blocking read of a subscription waits before looping; bounded so a dead
# connection is noticed rather than waited on forever.
_SUBSCRIPTION_POLL = 1.0
_SUBSCRIBE_CONFIRM_TIMEOUT = 5.0


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError, TimeoutError) as exc:
        raise CacheUnavailable("the cache is unavailable") from exc


class RedisCache(Cache):
    """A :class:`Cache` on Redis; every key and channel is prefixed with ``namespace:``."""

    def __init__(self, client: aioredis.Redis, *, namespace: str = "nodepool") -> None:
        if not namespace or "*" in namespace:
            raise ValueError("namespace must be a non-empty string without '*'")
        self._client = client
        self._prefix = f"{namespace}:"
        self._hit = client.register_script(_HIT)
        self._drain = client.register_script(_DRAIN)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "nodepool") -> RedisCache:
        """A cache on the server at ``url`` (``redis://``, ``rediss://`` or ``unix://``)."""
        client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=5.0,
            socket_timeout=5.0,
            # A dead pub/sub connection is noticed within seconds, not half a minute.
            health_check_interval=2,
            # After an outage the pooled connections are dead; one immediate retry on a
            # fresh connection keeps each of them from failing one call after Redis is
            # back. During the outage a call still fails at once (connection refused).
            retry=Retry(NoBackoff(), 1),
        )
        return cls(client, namespace=namespace)

    @property
    def namespace(self) -> str:
        return self._prefix[:-1]

    def _key(self, kind: str, name: str) -> str:
        return f"{self._prefix}{kind}:{name}"

    # -- key/value ----------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        with _translated():
            value = await self._client.get(self._key("kv", key))
        if isinstance(value, str):  # only if the client was built with decode_responses
            return value.encode()
        return value

    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        px = None if ttl is None else check_ttl(ttl)
        with _translated():
            await self._client.set(self._key("kv", key), value, px=px)

    async def set_if_absent(self, key: str, value: bytes, *, ttl: float | None = None) -> bool:
        px = None if ttl is None else check_ttl(ttl)
        with _translated():
            stored = await self._client.set(self._key("kv", key), value, px=px, nx=True)
        return bool(stored)

    async def delete(self, key: str) -> bool:
        with _translated():
            removed = await self._client.delete(self._key("kv", key))
        return bool(removed)

    # -- rate limiting ------------------------------------------------------------------

    async def hit(self, key: str, window_seconds: float) -> int:
        window = check_ttl(window_seconds)
        with _translated():
            count = await self._hit(keys=[self._key("rl", key)], args=[window])
        return int(count)

    async def reset(self, key: str) -> None:
        with _translated():
            await self._client.delete(self._key("rl", key))

    # -- heartbeat buffer ---------------------------------------------------------------

    async def put_heartbeat(self, node_id: str, payload: bytes) -> None:
        with _translated():
            await self._client.hset(self._key("hb", "pending"), node_id, payload)

    async def drain_heartbeats(self) -> dict[str, bytes]:
        with _translated():
            flat: list[bytes] = await self._drain(keys=[self._key("hb", "pending")])
        return {flat[i].decode(): bytes(flat[i + 1]) for i in range(0, len(flat), 2)}

    # -- leases -------------------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        px = check_ttl(ttl)
        with _translated():
            taken = await self._acquire(keys=[self._key("lease", name)], args=[holder, px])
        return bool(taken)

    async def renew_lease(self, name: str, holder: str, ttl: float) -> bool:
        px = check_ttl(ttl)
        with _translated():
            renewed = await self._renew(keys=[self._key("lease", name)], args=[holder, px])
        return bool(renewed)

    async def release_lease(self, name: str, holder: str) -> bool:
        with _translated():
            released = await self._release(keys=[self._key("lease", name)], args=[holder])
        return bool(released)

    # -- pub/sub ------------------------------------------------------------------------

    async def publish(self, channel: str, message: bytes) -> None:
        with _translated():
            await self._client.publish(self._key("ch", channel), message)

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        pubsub = self._client.pubsub()
        try:
            with _translated():
                await pubsub.subscribe(self._key("ch", channel))
                # Wait for the server's confirmation: only then is a publish from another
                # connection guaranteed to reach us.
                while True:
                    confirmation = await pubsub.get_message(timeout=_SUBSCRIBE_CONFIRM_TIMEOUT)
                    if confirmation is None:
                        raise CacheUnavailable("the cache did not confirm the subscription")
                    if confirmation["type"] == "subscribe":
                        break
            yield _Subscription(pubsub)
        finally:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await pubsub.unsubscribe()
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py

    # -- lifecycle ----------------------------------------------------------------------

    async def ping(self) -> None:
        with _translated():
            await self._client.ping()

    async def close(self) -> None:
        with _translated():
            await self._client.aclose()


class _Subscription:
    """The message iterator of one Redis subscription."""

    def __init__(self, pubsub: PubSub) -> None:
        self._pubsub = pubsub

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> bytes:
        while True:
            with _translated():
                message: dict[str, Any] | None = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=_SUBSCRIPTION_POLL
                )
            if message is not None and message["type"] == "message":
                return bytes(message["data"])
