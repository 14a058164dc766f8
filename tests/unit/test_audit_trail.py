"""The audit buffer: nothing lost when a write fails, bounded when the database is away."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
import pytest

from nodepool.auth.rules import Access, MethodRule
from nodepool.errors import PermissionDeniedError
from nodepool.server.audit import AuditTrail
from nodepool.server.pipeline import Call
from nodepool.store import AuditEntry


class _Context:
    def peer(self) -> str:
        return "ipv6:%5B::1%5D:5555"


def _call(method: str) -> Call:
    context: Any = _Context()
    return Call(method=method, rule=MethodRule(Access.USER, audited=False), context=context)


def test_a_failed_write_is_retried_with_nothing_lost() -> None:
    written: list[list[AuditEntry]] = []
    failing = [True]

    async def append(entries: Sequence[AuditEntry]) -> None:
        if failing[0]:
            raise ConnectionError("database away")
        written.append(list(entries))

    trail = AuditTrail(append)
    trail.refused(_call("/a"), PermissionDeniedError())
    with pytest.raises(ConnectionError):
        asyncio.run(trail.flush())
    trail.refused(_call("/b"), PermissionDeniedError())
    failing[0] = False
    asyncio.run(trail.flush())
    assert [[entry.method for entry in batch] for batch in written] == [["/a", "/b"]]
    assert written[0][0].peer == "ipv6:[::1]:5555"
    assert written[0][0].detail == {"code": "PERMISSION_DENIED", "reason": "permission denied"}


def test_the_buffer_keeps_the_newest_when_full() -> None:
    written: list[AuditEntry] = []

    async def append(entries: Sequence[AuditEntry]) -> None:
        written.extend(entries)

    trail = AuditTrail(append, max_buffer=2)
    for method in ("/1", "/2", "/3"):
        trail.finished(_call(method), grpc.StatusCode.PERMISSION_DENIED)
    asyncio.run(trail.flush())
    assert [entry.method for entry in written] == ["/2", "/3"]


def test_allowed_reads_are_not_recorded() -> None:
    trail = AuditTrail(lambda entries: asyncio.sleep(0))
    trail.finished(_call("/read"), grpc.StatusCode.OK)
    trail.finished(_call("/read"), grpc.StatusCode.NOT_FOUND)
    assert len(trail._buffer) == 0


def test_a_failed_write_gives_up_the_oldest_entries_and_counts_them() -> None:
    written: list[AuditEntry] = []
    failing = [True]
    trail: AuditTrail

    async def append(entries: Sequence[AuditEntry]) -> None:
        if failing[0]:
            # Newer entries arrive while the write is in flight, then it fails.
            for method in ("/3", "/4"):
                trail.finished(_call(method), grpc.StatusCode.PERMISSION_DENIED)
            raise ConnectionError("database away")
        written.extend(entries)

    trail = AuditTrail(append, max_buffer=3)
    for method in ("/1", "/2"):
        trail.finished(_call(method), grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(ConnectionError):
        asyncio.run(trail.flush())
    assert trail.dropped_total == 1
    failing[0] = False
    asyncio.run(trail.flush())
    assert [entry.method for entry in written] == ["/2", "/3", "/4"]
    assert trail.dropped_total == 1


def test_overflow_is_counted() -> None:
    async def append(entries: Sequence[AuditEntry]) -> None:
        pass

    trail = AuditTrail(append, max_buffer=2)
    for method in ("/1", "/2", "/3", "/4"):
        trail.finished(_call(method), grpc.StatusCode.PERMISSION_DENIED)
    assert trail.dropped_total == 2
