"""The audit trail on SQL."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import (
    delete,
    insert,
    select,
)

from nodepool.store.base import (
    AuditEntry,
    AuditStore,
    Page,
)
from nodepool.store.schema import AuditLog
from nodepool.store.sqlbase import (
    AnyRow,
    SqlBase,
    check_limit,
    decode_int_cursor,
    encode_cursor,
    json_object,
)

__all__ = ["SqlAuditStore"]

_AUDIT_COLUMNS = (
    AuditLog.at,
    AuditLog.principal,
    AuditLog.method,
    AuditLog.outcome,
    AuditLog.username,
    AuditLog.peer,
    AuditLog.detail,
    AuditLog.id,
)


def _audit(row: AnyRow) -> AuditEntry:
    fields = dict(row._mapping)
    fields["detail"] = dict(fields["detail"] or {})
    return AuditEntry(**fields)


class SqlAuditStore(SqlBase, AuditStore):
    # -- audit --------------------------------------------------------------------------

    def append_audit(self, entries: Sequence[AuditEntry]) -> None:
        if not entries:
            return
        rows = [
            {
                "at": e.at,
                "principal": e.principal,
                "username": e.username,
                "method": e.method,
                "outcome": e.outcome,
                "peer": e.peer,
                "detail": json_object(e.detail),
            }
            for e in entries
        ]
        with self._write() as conn:
            conn.execute(insert(AuditLog), rows)

    def list_audit(
        self,
        *,
        limit: int = 100,
        cursor: str | None = None,
        principal: str | None = None,
        username: str | None = None,
        method: str | None = None,
        outcome: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Page[AuditEntry]:
        limit = check_limit(limit)
        query = select(*_AUDIT_COLUMNS).order_by(AuditLog.id.desc()).limit(limit + 1)
        for column, value in (
            (AuditLog.principal, principal),
            (AuditLog.username, username),
            (AuditLog.method, method),
            (AuditLog.outcome, outcome),
        ):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(AuditLog.at >= since)
        if until is not None:
            query = query.where(AuditLog.at < until)
        if cursor is not None:
            query = query.where(AuditLog.id < decode_int_cursor(cursor))
        with self._read_one() as conn:
            rows = conn.execute(query).all()
        items = [_audit(row) for row in rows[:limit]]
        more = len(rows) > limit
        return Page(items, encode_cursor(str(items[-1].id)) if more else None)

    def delete_audit_before(self, cutoff: datetime) -> int:
        with self._write() as conn:
            return conn.execute(delete(AuditLog).where(AuditLog.at < cutoff)).rowcount
