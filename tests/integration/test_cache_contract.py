"""The Cache contract: the in-process backend and the real Redis pass these tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from nodepool.cache import Cache, CacheUnavailable, MemoryCache, RedisCache, create_cache

SHORT_TTL = 0.2
PAST_TTL = 0.35  # comfortably after SHORT_TTL


# -- key/value ---------------------------------------------------------------------------


async def test_get_set_delete(cache: Cache) -> None:
    assert await cache.get("k") is None
    await cache.set("k", b"\x00value")
    assert await cache.get("k") == b"\x00value"
    await cache.set("k", b"replaced")
    assert await cache.get("k") == b"replaced"
    assert await cache.delete("k")
    assert not await cache.delete("k")
    assert await cache.get("k") is None


async def test_ttl_expiry(cache: Cache) -> None:
    await cache.set("short", b"v", ttl=SHORT_TTL)
    await cache.set("forever", b"v")
    assert await cache.get("short") == b"v"
    await asyncio.sleep(PAST_TTL)
    assert await cache.get("short") is None
    assert await cache.get("forever") == b"v"


async def test_set_replaces_ttl(cache: Cache) -> None:
    await cache.set("k", b"v", ttl=SHORT_TTL)
    await cache.set("k", b"w")
    await asyncio.sleep(PAST_TTL)
    assert await cache.get("k") == b"w"


async def test_set_if_absent(cache: Cache) -> None:
    assert await cache.set_if_absent("nx", b"first", ttl=SHORT_TTL)
    assert not await cache.set_if_absent("nx", b"second", ttl=SHORT_TTL)
    assert await cache.get("nx") == b"first"
    await asyncio.sleep(PAST_TTL)
    assert await cache.set_if_absent("nx", b"third")
    assert await cache.get("nx") == b"third"


async def test_invalid_ttl_is_refused(cache: Cache) -> None:
    with pytest.raises(ValueError, match="ttl"):
        await cache.set("k", b"v", ttl=0)
    with pytest.raises(ValueError, match="ttl"):
        await cache.set_if_absent("t", b"v", ttl=-1)


async def test_namespaces_keep_instances_apart(cache: Cache, cache_peer: Cache) -> None:
    await cache.set("shared", b"v")
    assert await cache_peer.get("shared") == b"v"
    if isinstance(cache, RedisCache):
        other = RedisCache(cache._client, namespace=cache.namespace + "-other")
        assert await other.get("shared") is None


# -- rate limiting -----------------------------------------------------------------------


async def test_hit_counts_within_a_window(cache: Cache) -> None:
    assert [await cache.hit("login:alice", SHORT_TTL) for _ in range(3)] == [1, 2, 3]
    assert await cache.hit("login:bob", SHORT_TTL) == 1
    await asyncio.sleep(PAST_TTL)
    assert await cache.hit("login:alice", SHORT_TTL) == 1


async def test_hit_is_atomic_across_instances(cache: Cache, cache_peer: Cache) -> None:
    counts = await asyncio.gather(
        *(c.hit("peer:10.0.0.1", 10) for _ in range(25) for c in (cache, cache_peer))
    )
    assert sorted(counts) == list(range(1, 51))


async def test_reset_forgets_a_count_and_only_that(cache: Cache) -> None:
    for _ in range(3):
        await cache.hit("failures:carol", 60)
    await cache.set("failures:carol", b"kept")
    # delete() is for key/value entries: it leaves the counter alone.
    await cache.delete("failures:carol")
    assert await cache.hit("failures:carol", 60) == 4
    await cache.set("failures:carol", b"kept")
    await cache.reset("failures:carol")
    await cache.reset("failures:nobody")
    assert await cache.hit("failures:carol", 60) == 1
    assert await cache.get("failures:carol") == b"kept"


# -- heartbeats --------------------------------------------------------------------------


async def test_heartbeat_buffer_drains_latest_once(cache: Cache, cache_peer: Cache) -> None:
    assert await cache.drain_heartbeats() == {}
    await cache.put_heartbeat("n1", b"old")
    await cache_peer.put_heartbeat("n2", b"\x00two")
    await cache.put_heartbeat("n1", b"new")
    assert await cache.drain_heartbeats() == {"n1": b"new", "n2": b"\x00two"}
    assert await cache_peer.drain_heartbeats() == {}


async def test_concurrent_drains_never_share_an_entry(cache: Cache, cache_peer: Cache) -> None:
    taken: list[dict[str, bytes]] = []
    written = 0

    async def writer() -> None:
        nonlocal written
        for i in range(400):
            await cache.put_heartbeat(f"node-{i}", str(i).encode())
            written += 1
            if i % 50 == 0:
                await asyncio.sleep(0)

    async def drainer(instance: Cache) -> None:
        for _ in range(40):
            taken.append(await instance.drain_heartbeats())
            await asyncio.sleep(0)

    await asyncio.gather(writer(), drainer(cache), drainer(cache_peer))
    taken.append(await cache.drain_heartbeats())
    seen: list[str] = [node for batch in taken for node in batch]
    assert len(seen) == len(set(seen)), "an entry was drained twice"
    assert len(seen) == written == 400


# -- leases ------------------------------------------------------------------------------


async def test_lease_is_exclusive(cache: Cache, cache_peer: Cache) -> None:
    assert await cache.acquire_lease("failure-detector", "instance-a", 5)
    assert not await cache_peer.acquire_lease("failure-detector", "instance-b", 5)
    assert await cache.acquire_lease("failure-detector", "instance-a", 5)  # re-entrant
    assert await cache.acquire_lease("scheduler", "instance-b", 5)  # other names are free
    assert not await cache_peer.renew_lease("failure-detector", "instance-b", 5)
    assert await cache.renew_lease("failure-detector", "instance-a", 5)
    assert not await cache_peer.release_lease("failure-detector", "instance-b")
    assert not await cache_peer.acquire_lease("failure-detector", "instance-b", 5)
    assert await cache.release_lease("failure-detector", "instance-a")
    assert not await cache.release_lease("failure-detector", "instance-a")
    assert await cache_peer.acquire_lease("failure-detector", "instance-b", 5)


async def test_lease_expires_and_renewal_extends(cache: Cache, cache_peer: Cache) -> None:
    # A quarter second of margin either side: a busy machine delays sleeps and calls.
    ttl = 1.0
    assert await cache.acquire_lease("retention", "a", ttl)
    await asyncio.sleep(ttl / 2)
    assert await cache.renew_lease("retention", "a", ttl)
    await asyncio.sleep(ttl / 2 + 0.25)  # past the first expiry, before the renewed one
    assert not await cache_peer.acquire_lease("retention", "b", ttl)  # renewed
    await asyncio.sleep(ttl)
    assert not await cache.renew_lease("retention", "a", ttl)  # lost
    assert await cache_peer.acquire_lease("retention", "b", ttl)


async def test_only_one_of_many_contenders_gets_the_lease(cache: Cache, cache_peer: Cache) -> None:
    results = await asyncio.gather(
        *(
            c.acquire_lease("scheduler", f"holder-{i}-{j}", 5)
            for i in range(10)
            for j, c in enumerate((cache, cache_peer))
        )
    )
    assert results.count(True) == 1


# -- pub/sub -----------------------------------------------------------------------------


async def _collect(messages: AsyncIterator[bytes], count: int) -> list[bytes]:
    received: list[bytes] = []
    async with asyncio.timeout(5):
        async for message in messages:
            received.append(message)
            if len(received) == count:
                break
    return received


async def test_publish_reaches_subscribers_of_that_channel(cache: Cache, cache_peer: Cache) -> None:
    async with (
        cache_peer.subscribe("revocations") as first,
        cache.subscribe("revocations") as second,
        cache_peer.subscribe("other") as unrelated,
    ):
        await cache.publish("revocations", b"serial:01")
        await cache.publish("revocations", b"serial:\x02")
        assert await _collect(first, 2) == [b"serial:01", b"serial:\x02"]
        assert await _collect(second, 2) == [b"serial:01", b"serial:\x02"]
        await cache.publish("other", b"x")
        assert await _collect(unrelated, 1) == [b"x"]


async def test_publish_without_subscribers_and_after_unsubscribe(cache: Cache) -> None:
    await cache.publish("nobody-listens", b"lost")
    async with cache.subscribe("ch") as messages:
        await cache.publish("ch", b"one")
        assert await _collect(messages, 1) == [b"one"]
    await cache.publish("ch", b"after")  # no subscriber left; must not fail


async def test_subscription_ends_cleanly_when_cancelled(cache: Cache) -> None:
    received: list[bytes] = []
    ready = asyncio.Event()

    async def listen() -> None:
        async with cache.subscribe("ch") as messages:
            ready.set()
            async for message in messages:
                received.append(message)

    task = asyncio.create_task(listen())
    await asyncio.wait_for(ready.wait(), 5)
    await cache.publish("ch", b"m")
    for _ in range(100):
        if received:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert received == [b"m"]


# -- availability ------------------------------------------------------------------------


async def test_ping(cache: Cache) -> None:
    await cache.ping()


async def test_unreachable_redis_raises_cache_unavailable() -> None:
    dead = RedisCache.from_url("redis://127.0.0.1:1/0", namespace="nodepool-test-dead")
    try:
        with pytest.raises(CacheUnavailable):
            await dead.ping()
        with pytest.raises(CacheUnavailable):
            await dead.get("jti")
        with pytest.raises(CacheUnavailable):
            await dead.hit("k", 1)
        with pytest.raises(CacheUnavailable):
            async with dead.subscribe("ch"):
                pass
    finally:
        await dead.close()


async def test_closed_memory_cache_is_unavailable() -> None:
    memory = MemoryCache()
    await memory.close()
    with pytest.raises(CacheUnavailable):
        await memory.ping()
    with pytest.raises(CacheUnavailable):
        await memory.get("jti")


async def test_factory_picks_the_backend(redis_url: str) -> None:
    memory = create_cache(None)
    assert isinstance(memory, MemoryCache)
    await memory.close()
    shared = create_cache(redis_url, namespace="nodepool-test-factory")
    try:
        assert isinstance(shared, RedisCache)
        assert shared.namespace == "nodepool-test-factory"
        await shared.ping()
    finally:
        await shared.close()
