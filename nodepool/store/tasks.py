"""Tasks on SQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    case,
    delete,
    false,
    func,
    insert,
    or_,
    select,
    update,
)

from nodepool.store.base import (
    TASK_ACTIVE_STATUSES,
    TASK_TERMINAL_STATUSES,
    Page,
    TaskRecord,
    TaskStore,
)
from nodepool.store.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NotFound,
)
from nodepool.store.schema import Task, User
from nodepool.store.sqlbase import (
    AnyRow,
    AnySelect,
    SqlBase,
    check_limit,
    decode_cursor,
    encode_cursor,
)

__all__ = ["SqlTaskStore", "requeue_tasks"]

_CLAIM_RETRIES = 5
# The states in which a task belongs to the node it was assigned to.
_OWNED_STATES = ("assigned", "running")

_TASK_COLUMNS = (
    Task.id,
    Task.user_id.label("owner_id"),
    User.username.label("owner"),
    Task.task_type,
    Task.status,
    Task.payload,
    Task.required_cpu_cores,
    Task.required_memory_gb,
    Task.assigned_node_id,
    Task.result,
    Task.error,
    Task.attempts,
    Task.max_attempts,
    Task.timeout_seconds,
    Task.progress,
    Task.idempotency_key,
    Task.created_at,
    Task.updated_at,
    Task.started_at,
    Task.finished_at,
    Task.lease_expires_at,
)


def _task(row: AnyRow) -> TaskRecord:
    fields = dict(row._mapping)
    # Drivers return buffer types for BLOB/bytea; records hold plain bytes.
    fields["payload"] = bytes(fields["payload"])
    if fields["result"] is not None:
        fields["result"] = bytes(fields["result"])
    return TaskRecord(**fields)


def requeue_tasks(
    conn: Connection, which: ColumnElement[bool], reason: str, now: datetime
) -> list[str]:
    """Give the active tasks matching ``which`` back to the queue (or fail those out of
    attempts), in the caller's transaction; returns the ids touched."""
    active = and_(which, Task.status.in_(_OWNED_STATES))
    retry = conn.execute(
        update(Task)
        .where(active, Task.attempts < Task.max_attempts)
        .values(
            status="pending",
            assigned_node_id=None,
            started_at=None,
            lease_expires_at=None,
            progress=0.0,
            error=reason,
            updated_at=now,
        )
        .returning(Task.id)
    ).all()
    failed = conn.execute(
        update(Task)
        .where(active)
        .values(
            status="failed",
            finished_at=now,
            lease_expires_at=None,
            error=reason,
            updated_at=now,
        )
        .returning(Task.id)
    ).all()
    return sorted(row[0] for row in [*retry, *failed])


class SqlTaskStore(SqlBase, TaskStore):
    # -- tasks --------------------------------------------------------------------------

    @staticmethod
    def _task_query() -> AnySelect:
        return select(*_TASK_COLUMNS).join(User, User.id == Task.user_id)

    def _load_task(self, conn: Connection, task_id: str) -> TaskRecord:
        row = conn.execute(self._task_query().where(Task.id == task_id)).first()
        if row is None:
            raise NotFound("no such task")
        return _task(row)

    def _existing_task(self, conn: Connection, owner_id: int, key: str) -> TaskRecord | None:
        row = conn.execute(
            self._task_query().where(Task.user_id == owner_id, Task.idempotency_key == key)
        ).first()
        return None if row is None else _task(row)

    def create_task(
        self,
        *,
        owner: str,
        task_type: str,
        payload: bytes = b"",
        required_cpu_cores: int = 0,
        required_memory_gb: float = 0.0,
        max_attempts: int = 3,
        timeout_seconds: int = 3600,
        idempotency_key: str | None = None,
    ) -> tuple[TaskRecord, bool]:
        if max_attempts < 1 or timeout_seconds < 1:
            raise InvalidArgument("max_attempts and timeout_seconds must be at least 1")
        now = self._now()
        task_id = uuid.uuid4().hex
        try:
            with self._write() as conn:
                owner_id = self._user_id(conn, owner)
                if idempotency_key is not None:
                    existing = self._existing_task(conn, owner_id, idempotency_key)
                    if existing is not None:
                        return existing, False
                conn.execute(
                    insert(Task).values(
                        id=task_id,
                        user_id=owner_id,
                        task_type=task_type,
                        status="pending",
                        payload=payload,
                        required_cpu_cores=required_cpu_cores,
                        required_memory_gb=required_memory_gb,
                        attempts=0,
                        max_attempts=max_attempts,
                        timeout_seconds=timeout_seconds,
                        progress=0.0,
                        idempotency_key=idempotency_key,
                        created_at=now,
                        updated_at=now,
                    )
                )
                return self._load_task(conn, task_id), True
        except AlreadyExists:
            # A concurrent submission with the same key won the insert.
            if idempotency_key is None:
                raise
            with self._read() as conn:
                existing = self._existing_task(conn, self._user_id(conn, owner), idempotency_key)
            if existing is None:
                raise
            return existing, False

    def get_task(self, task_id: str) -> TaskRecord:
        with self._read() as conn:
            return self._load_task(conn, task_id)

    def list_tasks(
        self,
        *,
        owner: str | None = None,
        status: str | None = None,
        assigned_node_id: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[TaskRecord]:
        limit = check_limit(limit)
        query = self._task_query().order_by(Task.created_at.desc(), Task.id.desc()).limit(limit + 1)
        if owner is not None:
            query = query.where(self._owner_filter(Task.user_id, owner))
        if status is not None:
            query = query.where(Task.status == status)
        if assigned_node_id is not None:
            query = query.where(Task.assigned_node_id == assigned_node_id)
        if cursor is not None:
            at_text, after_id = decode_cursor(cursor, 2)
            try:
                at = datetime.fromisoformat(at_text)
            except ValueError:
                raise InvalidArgument("invalid cursor") from None
            query = query.where(
                or_(Task.created_at < at, and_(Task.created_at == at, Task.id < after_id))
            )
        with self._read() as conn:
            rows = conn.execute(query).all()
        items = [_task(row) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = encode_cursor(items[-1].created_at.isoformat(), items[-1].id)
        return Page(items, next_cursor)

    def cancel_task(self, task_id: str, *, owner: str | None = None) -> TaskRecord:
        where = Task.id == task_id
        if owner is not None:
            where = and_(where, self._owner_filter(Task.user_id, owner))
        now = self._now()
        with self._write() as conn:
            result = conn.execute(
                update(Task)
                .where(where, Task.status.in_(TASK_ACTIVE_STATUSES))
                .values(status="cancelled", finished_at=now, updated_at=now, lease_expires_at=None)
            )
            if result.rowcount == 0:
                if conn.scalar(select(Task.id).where(where)) is None:
                    raise NotFound("no such task")
                raise Conflict("the task has already finished")
            return self._load_task(conn, task_id)

    def claim_next_task(
        self, node_id: str, *, cpu_cores: int, memory_gb: float
    ) -> TaskRecord | None:
        candidates = (
            select(Task.id, Task.timeout_seconds)
            .where(
                Task.status == "pending",
                Task.required_cpu_cores <= cpu_cores,
                Task.required_memory_gb <= memory_gb,
            )
            .order_by(Task.created_at, Task.id)
            .limit(1)
            # PostgreSQL: concurrent claimers skip each other's row instead of queueing.
            # SQLite ignores this; BEGIN IMMEDIATE serialises writers there.
            .with_for_update(skip_locked=True)
        )
        for _ in range(_CLAIM_RETRIES):
            with self._write() as conn:
                row = conn.execute(candidates).first()
                if row is None:
                    return None
                now = self._now()
                # The status condition keeps this safe even without row locks.
                result = conn.execute(
                    update(Task)
                    .where(Task.id == row.id, Task.status == "pending")
                    .values(
                        status="assigned",
                        assigned_node_id=node_id,
                        attempts=Task.attempts + 1,
                        progress=0.0,
                        updated_at=now,
                        started_at=None,
                        lease_expires_at=now + timedelta(seconds=row.timeout_seconds),
                    )
                )
                if result.rowcount == 1:
                    return self._load_task(conn, row.id)
        return None

    def _report(self, task_id: str, node_id: str, values: dict[str, Any]) -> TaskRecord:
        with self._write() as conn:
            result = conn.execute(
                update(Task)
                .where(
                    Task.id == task_id,
                    Task.assigned_node_id == node_id,
                    Task.status.in_(_OWNED_STATES),
                )
                .values(**values)
            )
            if result.rowcount == 0:
                if conn.scalar(select(Task.id).where(Task.id == task_id)) is None:
                    raise NotFound("no such task")
                raise Conflict("the task is not active on this node")
            return self._load_task(conn, task_id)

    def update_task_progress(self, task_id: str, node_id: str, progress: float) -> TaskRecord:
        if not 0.0 <= progress <= 1.0:
            raise InvalidArgument("progress must be between 0.0 and 1.0")
        now = self._now()
        return self._report(
            task_id,
            node_id,
            {
                "status": "running",
                "progress": progress,
                "started_at": func.coalesce(Task.started_at, now),
                "updated_at": now,
            },
        )

    def complete_task(self, task_id: str, node_id: str, result: bytes) -> TaskRecord:
        now = self._now()
        return self._report(
            task_id,
            node_id,
            {
                "status": "completed",
                "result": result,
                "progress": 1.0,
                "error": None,
                "started_at": func.coalesce(Task.started_at, now),
                "finished_at": now,
                "updated_at": now,
                "lease_expires_at": None,
            },
        )

    def fail_task(
        self, task_id: str, node_id: str, error: str, *, retry: bool = True
    ) -> TaskRecord:
        now = self._now()
        retryable = Task.attempts < Task.max_attempts if retry else false()
        return self._report(
            task_id,
            node_id,
            {
                "status": case((retryable, "pending"), else_="failed"),
                "assigned_node_id": case((retryable, None), else_=Task.assigned_node_id),
                "finished_at": case((retryable, None), else_=now),
                "started_at": case((retryable, None), else_=Task.started_at),
                "error": error,
                "updated_at": now,
                "lease_expires_at": None,
            },
        )

    def requeue_tasks_of_nodes(self, node_ids: Iterable[str]) -> list[str]:
        ids = sorted(set(node_ids))
        if not ids:
            return []
        with self._write() as conn:
            return requeue_tasks(conn, Task.assigned_node_id.in_(ids), "node lost", self._now())

    def requeue_expired_tasks(self, now: datetime | None = None) -> list[str]:
        deadline = now or self._now()
        with self._write() as conn:
            return requeue_tasks(
                conn, Task.lease_expires_at < deadline, "task timed out", self._now()
            )

    def delete_finished_tasks_before(
        self,
        cutoff: datetime,
        statuses: Iterable[str] = TASK_TERMINAL_STATUSES,
    ) -> int:
        chosen = sorted(set(statuses))
        if not set(chosen) <= TASK_TERMINAL_STATUSES:
            raise InvalidArgument("only finished tasks can be deleted")
        with self._write() as conn:
            return conn.execute(
                delete(Task).where(Task.status.in_(chosen), Task.finished_at < cutoff)
            ).rowcount
