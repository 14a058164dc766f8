"""MemoryCache details the shared contract cannot see: its clock and its housekeeping."""

from __future__ import annotations

from nodepool.cache import MemoryCache


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_ttls_follow_the_injected_monotonic_clock() -> None:
    clock = FakeMonotonic()
    cache = MemoryCache(clock=clock)
    await cache.set("k", b"v", ttl=10)
    assert await cache.hit("r", 10) == 1
    clock.now += 9.999
    assert await cache.get("k") == b"v"
    assert await cache.hit("r", 10) == 2
    clock.now += 0.001
    assert await cache.get("k") is None
    assert await cache.hit("r", 10) == 1
    await cache.close()


async def test_expired_entries_are_swept_without_being_read() -> None:
    clock = FakeMonotonic()
    cache = MemoryCache(clock=clock)
    for i in range(100):
        await cache.set(f"jti-{i}", b"1", ttl=1)
    await cache.set("keep", b"v")
    clock.now += 60
    await cache.get("unrelated")
    assert list(cache._entries) == ["kv:keep"]
    await cache.close()


async def test_leaving_a_subscription_forgets_the_subscriber() -> None:
    cache = MemoryCache()
    async with cache.subscribe("ch"), cache.subscribe("ch"):
        assert len(cache._subscribers["ch"]) == 2
    assert cache._subscribers == {}
    await cache.close()
