"""Stage 2: is the caller's certificate revoked? Checked on every call.

The revoked serials live in memory, refreshed in the background from the CA's
certificate store (a cheap version read first, the full set only when it moved), so the
per-call check is a set lookup. When the set cannot be refreshed for longer than
``max_staleness`` the state is unknown and every call is refused: fail closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Protocol

from nodepool.errors import UnauthenticatedError, UnavailableError

__all__ = ["RevocationList", "RevocationSource"]

_log = logging.getLogger(__name__)


class RevocationSource(Protocol):
    """Where revocations are recorded. Any error raised means "unknown", never "not revoked"."""

    def revocation_version(self) -> int: ...

    def revoked_serials(self) -> frozenset[int]: ...


class RevocationList:
    def __init__(
        self,
        source: RevocationSource,
        *,
        max_staleness: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._max_staleness = max_staleness
        self._clock = clock
        self._version: int | None = None
        self._revoked: frozenset[int] = frozenset()
        # Until the first successful refresh the state is unknown.
        self._fresh_until = float("-inf")

    def check(self, serial: int) -> None:
        if self._clock() > self._fresh_until:
            raise UnavailableError("credential status cannot be verified right now")
        if serial in self._revoked:
            raise UnauthenticatedError("certificate has been revoked")

    def refresh(self) -> None:
        """Reads the source; raises whatever the source raises (the list then ages)."""
        version = self._source.revocation_version()
        if version != self._version:
            self._revoked = self._source.revoked_serials()
            self._version = version
        self._fresh_until = self._clock() + self._max_staleness

    async def keep_fresh(self, interval: float, executor: Executor | None = None) -> None:
        """Refreshes forever; failures are logged and leave the list to go stale.

        Give it its own ``executor``: behind a queue of slow work (password hashing) the
        list would go stale and every call would be refused.
        """
        failing = False
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(executor, self.refresh)
                if failing:
                    _log.warning("revocation state readable again")
                failing = False
            except Exception:
                if not failing:
                    _log.exception("cannot read revocation state; calls fail closed when stale")
                failing = True
            await asyncio.sleep(interval)
