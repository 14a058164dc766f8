"""Stage 2: did our CA record the caller's certificate, and is it revoked? Every call.

A certificate the CA never recorded is refused even though its signature chains to the
CA: only a stolen CA key makes one, and the thief must then also write the CA's records.
The issued and the revoked serials live in memory, refreshed in the background from the CA's
certificate store (a cheap version read first, the full set only when it moved), so the
per-call check is a set lookup. When the set cannot be refreshed for longer than
``max_staleness`` the state is unknown and every call is refused: fail closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Protocol

from nodepool.errors import UnauthenticatedError, UnavailableError

__all__ = ["RevocationList", "RevocationSource"]

_log = logging.getLogger(__name__)

_UNKNOWN_RECHECK = 5.0
_MAX_RECHECKED = 10_000


class RevocationSource(Protocol):
    """Where issues and revocations are recorded. Any error raised means "unknown",
    never "not revoked" nor "issued"."""

    def revocation_version(self) -> int: ...

    def revoked_serials(self) -> frozenset[int]: ...

    def issuance_version(self) -> int: ...

    def issued_serials(self) -> frozenset[int]: ...


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
        self._issuance_version: int | None = None
        self._issued: frozenset[int] = frozenset()
        self._executor: Executor | None = None
        # Unknown serials read again at once (a certificate issued since the last poll,
        # or just renewed), each at most once per _UNKNOWN_RECHECK seconds; only
        # certificates that chain to our CA get here, so this is no lever for strangers.
        self._rechecked: dict[int, float] = {}
        # Until the first successful refresh the state is unknown.
        self._fresh_until = float("-inf")

    def check(self, serial: int) -> Awaitable[None] | None:
        """None when settled from memory; an awaitable for a serial not seen yet."""
        if self._clock() > self._fresh_until:
            raise UnavailableError("credential status cannot be verified right now")
        if serial in self._revoked:
            raise UnauthenticatedError("certificate has been revoked")
        if serial not in self._issued:
            return self._check_unknown(serial)
        return None

    async def _check_unknown(self, serial: int) -> None:
        now = self._clock()
        last = self._rechecked.get(serial)
        if last is None or now - last > _UNKNOWN_RECHECK:
            if len(self._rechecked) >= _MAX_RECHECKED:
                self._rechecked.clear()
            self._rechecked[serial] = now
            if not await self._refresh_once():
                raise UnavailableError("credential status cannot be verified right now")
        if serial in self._revoked:
            raise UnauthenticatedError("certificate has been revoked")
        if serial not in self._issued:
            # Same words as the identity stage's refusals: nothing about why.
            raise UnauthenticatedError("certificate is not accepted")

    async def _refresh_once(self) -> bool:
        """One read of the records started now (a read already under way may have begun
        before the certificate was recorded, so it is not shared)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self.refresh)
        except Exception:
            # Unknown stays unknown: the caller is refused, and the poll goes on (and
            # logs the outage once).
            return False
        return True

    def refresh(self) -> None:
        """Reads the source; raises whatever the source raises (the list then ages)."""
        version = self._source.revocation_version()
        if version != self._version:
            self._revoked = self._source.revoked_serials()
            self._version = version
        issuance = self._source.issuance_version()
        if issuance != self._issuance_version:
            self._issued = self._source.issued_serials()
            self._issuance_version = issuance
        self._fresh_until = self._clock() + self._max_staleness

    async def keep_fresh(self, interval: float, executor: Executor | None = None) -> None:
        """Refreshes forever; failures are logged and leave the list to go stale.

        Give it its own ``executor``: behind a queue of slow work (password hashing) the
        list would go stale and every call would be refused.
        """
        self._executor = executor
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
