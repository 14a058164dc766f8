"""Stage 5: the audit trail. Every refused call, and every call that changes state.

Entries are buffered in memory and written to the database in batches by a background
task, so auditing costs a list append on the call path. Nothing secret is recorded: the
interceptor never sees request bodies, and the detail holds only the status code and the
public reason.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from urllib.parse import unquote

import grpc

from nodepool.auditnote import current_audit_note
from nodepool.errors import NodePoolError
from nodepool.server.pipeline import Call
from nodepool.status import status_for
from nodepool.store import AuditEntry

__all__ = ["AuditTrail", "outcome_for"]

_log = logging.getLogger(__name__)

_DENIED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


def outcome_for(code: grpc.StatusCode) -> str:
    if code is grpc.StatusCode.OK:
        return "allowed"
    return "denied" if code in _DENIED else "failed"


class AuditTrail:
    def __init__(
        self,
        append: Callable[[Sequence[AuditEntry]], Awaitable[None]],
        *,
        max_buffer: int = 50_000,
    ) -> None:
        self._append = append
        # Bounded: while the database is unreachable the oldest entries give way.
        self._buffer: deque[AuditEntry] = deque(maxlen=max_buffer)
        self._dropped = 0
        # Every entry ever given up because the buffer was full; never reset, so an
        # operator (or a metrics exporter) can see that the log has a hole.
        self.dropped_total = 0

    def refused(self, call: Call, error: NodePoolError) -> None:
        self._record(call, status_for(error), error.public_message)

    def finished(self, call: Call, code: grpc.StatusCode) -> None:
        if call.rule.audited or code in _DENIED:
            self._record(call, code, None)

    def _record(self, call: Call, code: grpc.StatusCode, reason: str | None) -> None:
        if len(self._buffer) == self._buffer.maxlen:
            self._count_dropped(1)
        detail = {"code": code.name}
        if reason:
            detail["reason"] = reason
        principal = call.principal
        username = principal.username if principal else None
        outcome = outcome_for(code)
        # What the domain noted about this call: the account a login was aimed at, a
        # lockout (a denial, whatever its status code), fixed words of detail.
        note = current_audit_note()
        if note is not None:
            username = note.subject or username
            if note.denied and code is not grpc.StatusCode.OK:
                outcome = "denied"
            detail.update(note.detail)
        self._buffer.append(
            AuditEntry(
                at=datetime.now(UTC),
                principal=call.peer.spiffe_id if call.peer else "-",
                username=username,
                method=call.method,
                outcome=outcome,
                # gRPC percent-encodes IPv6 brackets ("ipv6:%5B::1%5D:5555").
                peer=unquote(call.context.peer() or ""),
                detail=detail,
            )
        )

    async def flush(self) -> None:
        if not self._buffer:
            return
        batch = list(self._buffer)
        self._buffer.clear()
        try:
            await self._append(batch)
        except Exception:
            # Put the batch back in front of what arrived meanwhile; the next flush retries
            # it. When both no longer fit, the oldest entries give way, as everywhere else
            # (extendleft on a full deque would push out the newest instead).
            pending = batch + list(self._buffer)
            capacity = self._buffer.maxlen or len(pending)
            overflow = max(0, len(pending) - capacity)
            self._count_dropped(overflow)
            self._buffer.clear()
            self._buffer.extend(pending[overflow:])
            raise
        if self._dropped:
            _log.error("audit buffer overflowed: %d entries were dropped", self._dropped)
            self._dropped = 0

    def _count_dropped(self, count: int) -> None:
        self._dropped += count
        self.dropped_total += count
