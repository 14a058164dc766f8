"""Fast shared state: the abstract :class:`Cache` and its memory and Redis backends."""

from nodepool.cache.base import Cache
from nodepool.cache.errors import CacheError, CacheUnavailable
from nodepool.cache.memory import MemoryCache
from nodepool.cache.redis import RedisCache

__all__ = [
    "Cache",
    "CacheError",
    "CacheUnavailable",
    "MemoryCache",
    "RedisCache",
    "create_cache",
]


def create_cache(redis_url: str | None, namespace: str = "nodepool") -> Cache:
    """Redis when ``redis_url`` is set (several instances may share it), else an
    in-process cache (one instance only; ``namespace`` is irrelevant there)."""
    if redis_url:
        return RedisCache.from_url(redis_url, namespace=namespace)
    return MemoryCache()
