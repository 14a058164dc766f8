"""Cache errors: plain Python, independent of the backend."""

from __future__ import annotations

__all__ = ["CacheError", "CacheUnavailable"]


class CacheError(Exception):
    """Base of every cache error."""


class CacheUnavailable(CacheError):
    """The cache cannot be reached or failed. Security checks that depend on it (token
    revocation, rate limits) must fail closed."""
