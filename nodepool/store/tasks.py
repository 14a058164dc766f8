"""Tasks on SQL."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Integer,
    Update,
    and_,
    bindparam,
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
    NewTask,
    NodeLoad,
    Page,
    QueuedTask,
    ReportState,
    ReportVerdict,
    TaskRecord,
    TaskReportIn,
    TaskStore,
)
from nodepool.store.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    LimitExceeded,
    NotFound,
)
from nodepool.store.schema import Task, TaskAttempt, User
from nodepool.store.sqlbase import (
    AnyRow,
    AnySelect,
    SqlBase,
    canonical_username,
    check_limit,
    decode_cursor,
    encode_cursor,
    json_object,
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
    Task.priority,
    Task.required_labels,
    Task.exit_code,
)


# The hot statements are built once: building a statement costs more than running it, and
# reusing the same object lets SQLAlchemy reuse its compiled form without adapting it.
_TASKS = select(*_TASK_COLUMNS).join(User, User.id == Task.user_id)
_TASK_BY_ID = _TASKS.where(Task.id == bindparam("task_id"))
_TASKS_BY_IDS = _TASKS.where(Task.id.in_(bindparam("ids", expanding=True)))
_PENDING_BY_IDS = (
    _TASKS.where(Task.id.in_(bindparam("ids", expanding=True)), Task.status == "pending")
    .order_by(Task.id)
    # PostgreSQL: rows another claimer holds are skipped, not waited for.
    .with_for_update(skip_locked=True, of=Task)
)
_HELD_ATTEMPTS = select(Task.id, Task.attempts).where(
    Task.assigned_node_id == bindparam("node_id"),
    or_(Task.status == "assigned", Task.status == "running"),
)
_ASSIGN = (
    update(Task)
    .where(Task.id == bindparam("t_id"), Task.status == "pending")
    .values(
        status="assigned",
        assigned_node_id=bindparam("t_node"),
        attempts=bindparam("t_attempt"),
        progress=0.0,
        started_at=None,
        updated_at=bindparam("t_now"),
        lease_expires_at=bindparam("t_lease"),
    )
)
_INSERT_TASKS = insert(Task)
_INSERT_ATTEMPTS = insert(TaskAttempt)
_REPORTED_STATE = select(
    Task.id,
    Task.status,
    Task.assigned_node_id,
    Task.attempts,
    Task.max_attempts,
    Task.started_at,
).where(Task.id.in_(bindparam("ids", expanding=True)))
_ATTEMPT_HOLDERS = select(TaskAttempt.task_id, TaskAttempt.attempt, TaskAttempt.node_id).where(
    TaskAttempt.task_id.in_(bindparam("ids", expanding=True)),
    TaskAttempt.node_id.in_(bindparam("nodes", expanding=True)),
)
_NODE_LOADS = (
    select(
        Task.assigned_node_id,
        func.count(),
        func.coalesce(func.sum(Task.required_cpu_cores), 0),
        func.coalesce(func.sum(Task.required_memory_gb), 0.0),
    )
    .where(
        or_(Task.status == "assigned", Task.status == "running"),
        Task.assigned_node_id.is_not(None),
    )
    .group_by(Task.assigned_node_id)
)
_PENDING_QUEUES = (
    select(Task.priority, Task.user_id)
    .where(Task.status == "pending")
    .group_by(Task.priority, Task.user_id)
)
_QUEUE_HEAD = (
    select(
        Task.id,
        Task.user_id.label("owner_id"),
        Task.priority,
        Task.required_cpu_cores,
        Task.required_memory_gb,
        Task.required_labels,
        Task.created_at,
    )
    .where(
        Task.status == "pending",
        Task.user_id == bindparam("owner_id"),
        Task.priority == bindparam("priority"),
    )
    .order_by(Task.created_at, Task.id)
    .limit(bindparam("head", type_=Integer, literal_execute=True))
)
_OWNER = (
    select(User.id, User.username)
    .where(User.username_canonical == bindparam("canonical"))
    .with_for_update()
)
_PENDING_OF_OWNER = (
    select(func.count())
    .select_from(Task)
    .where(Task.user_id == bindparam("owner_id"), Task.status == "pending")
)
_EARLIER_BY_KEYS = _TASKS.where(
    Task.user_id == bindparam("owner_id"),
    Task.idempotency_key.in_(bindparam("keys", expanding=True)),
)


def _task(row: AnyRow) -> TaskRecord:
    fields = dict(row._mapping)
    # Drivers return buffer types for BLOB/bytea; records hold plain bytes.
    fields["payload"] = bytes(fields["payload"])
    if fields["result"] is not None:
        fields["result"] = bytes(fields["result"])
    fields["required_labels"] = dict(fields["required_labels"] or {})
    return TaskRecord(**fields)


def _check_new_task(task: NewTask) -> None:
    if task.max_attempts < 1 or task.timeout_seconds < 1:
        raise InvalidArgument("max_attempts and timeout_seconds must be at least 1")


def _report_values(task: Mapping[str, Any], report: TaskReportIn, now: datetime) -> dict[str, Any]:
    """The columns an accepted report sets, given the task row as the transaction sees it."""
    if report.state is ReportState.RUNNING:
        return {
            "status": "running",
            "progress": min(max(report.progress, 0.0), 1.0),
            "started_at": task["started_at"] or now,
        }
    if report.state is ReportState.COMPLETED:
        return {
            "status": "completed",
            "result": report.result,
            "exit_code": report.exit_code,
            "error": None,
            "progress": 1.0,
            "started_at": task["started_at"] or now,
            "finished_at": now,
            "lease_expires_at": None,
        }
    if task["attempts"] < task["max_attempts"]:
        return {
            "status": "pending",
            "assigned_node_id": None,
            "error": report.error,
            "exit_code": report.exit_code,
            "progress": 0.0,
            "started_at": None,
            "lease_expires_at": None,
        }
    return {
        "status": "failed",
        "error": report.error,
        "exit_code": report.exit_code,
        "result": report.result or None,
        "finished_at": now,
        "lease_expires_at": None,
    }


@functools.lru_cache(maxsize=64)
def _report_update(shape: tuple[str, ...]) -> Update:
    """The compare-and-set UPDATE for one shape of report (built once per shape)."""
    return (
        update(Task)
        .where(
            Task.id == bindparam("t_id"),
            Task.attempts == bindparam("t_attempt"),
            # Spelled out: an IN list cannot go into an executemany.
            or_(Task.status == "assigned", Task.status == "running"),
        )
        .values(updated_at=bindparam("t_now"), **{name: bindparam(f"v_{name}") for name in shape})
    )


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
        row = conn.execute(_TASK_BY_ID, {"task_id": task_id}).first()
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
        new = NewTask(
            task_type=task_type,
            payload=payload,
            required_cpu_cores=required_cpu_cores,
            required_memory_gb=required_memory_gb,
            max_attempts=max_attempts,
            timeout_seconds=timeout_seconds,
            idempotency_key=idempotency_key,
        )
        (created,) = self.create_tasks(owner, [new])
        return created

    def create_tasks(
        self, owner: str, tasks: Sequence[NewTask], *, max_pending: int | None = None
    ) -> list[tuple[TaskRecord, bool]]:
        for task in tasks:
            _check_new_task(task)
        try:
            return self._create_tasks(owner, tasks, max_pending)
        except AlreadyExists:
            # A concurrent submission with one of the same keys won the insert; now the
            # keys exist and come back as the earlier tasks.
            return self._create_tasks(owner, tasks, max_pending)

    def _create_tasks(
        self, owner: str, tasks: Sequence[NewTask], max_pending: int | None
    ) -> list[tuple[TaskRecord, bool]]:
        now = self._now()
        with self._write() as conn:
            # Locking the owner serialises this owner's submissions on PostgreSQL, so the
            # pending limit and the insert cannot interleave.
            owner_row = conn.execute(_OWNER, {"canonical": canonical_username(owner)}).first()
            if owner_row is None:
                raise NotFound("no such user")
            owner_id, owner_name = owner_row
            keys = [task.idempotency_key for task in tasks if task.idempotency_key is not None]
            earlier: dict[str, TaskRecord] = {}
            if keys:
                for row in conn.execute(_EARLIER_BY_KEYS, {"owner_id": owner_id, "keys": keys}):
                    record = _task(row)
                    assert record.idempotency_key is not None
                    earlier[record.idempotency_key] = record
            results: list[tuple[TaskRecord, bool]] = []
            rows: list[dict[str, Any]] = []
            for position, task in enumerate(tasks):
                # The queue is first in, first out by (created_at, id) and ids are random:
                # a microsecond apart, a batch's tasks run (and list) in the order given.
                created = now + timedelta(microseconds=position)
                key = task.idempotency_key
                if key is not None and key in earlier:
                    results.append((earlier[key], False))
                    continue
                record = TaskRecord(
                    id=uuid.uuid4().hex,
                    owner_id=owner_id,
                    owner=owner_name,
                    task_type=task.task_type,
                    status="pending",
                    payload=task.payload,
                    required_cpu_cores=task.required_cpu_cores,
                    required_memory_gb=task.required_memory_gb,
                    assigned_node_id=None,
                    result=None,
                    error=None,
                    attempts=0,
                    max_attempts=task.max_attempts,
                    timeout_seconds=task.timeout_seconds,
                    progress=0.0,
                    idempotency_key=key,
                    created_at=created,
                    updated_at=created,
                    started_at=None,
                    finished_at=None,
                    lease_expires_at=None,
                    priority=task.priority,
                    required_labels=dict(task.required_labels),
                )
                if key is not None:
                    earlier[key] = record  # a key repeated inside the batch
                results.append((record, True))
                rows.append(
                    {
                        "id": record.id,
                        "user_id": owner_id,
                        "task_type": record.task_type,
                        "status": "pending",
                        "payload": record.payload,
                        "required_cpu_cores": record.required_cpu_cores,
                        "required_memory_gb": record.required_memory_gb,
                        # NULL, not an empty JSON object: no requirement, and no encoding.
                        "required_labels": json_object(record.required_labels)
                        if record.required_labels
                        else None,
                        "priority": record.priority,
                        "attempts": 0,
                        "max_attempts": record.max_attempts,
                        "timeout_seconds": record.timeout_seconds,
                        "progress": 0.0,
                        "idempotency_key": key,
                        "created_at": created,
                        "updated_at": created,
                    }
                )
            if not rows:
                return results
            if max_pending is not None:
                pending = conn.scalar(_PENDING_OF_OWNER, {"owner_id": owner_id})
                if (pending or 0) + len(rows) > max_pending:
                    raise LimitExceeded("too many pending tasks")
            conn.execute(_INSERT_TASKS, rows)
        return results

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
                    task = self._load_task(conn, row.id)
                    # Recorded as assign_tasks does, so report_tasks accepts this node.
                    conn.execute(
                        insert(TaskAttempt).values(
                            task_id=task.id, attempt=task.attempts, node_id=node_id, assigned_at=now
                        )
                    )
                    return task
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

    def pending_queues(self) -> list[tuple[int, int]]:
        with self._read() as conn:
            rows = conn.execute(_PENDING_QUEUES).all()
        return [(int(priority), int(owner_id)) for priority, owner_id in rows]

    def queued_tasks(
        self,
        *,
        per_owner: int,
        limit: int,
        queues: Sequence[tuple[int, int]] | None = None,
        last_served: Mapping[int, int] | None = None,
    ) -> list[QueuedTask]:
        served = last_served or {}
        # Each (priority, owner) queue is read on its own through the index, oldest first:
        # a window over the whole backlog would cost time in proportion to it every round.
        head = min(per_owner, limit)
        groups = self.pending_queues() if queues is None else queues
        with self._read() as conn:
            # priority -> one list per owner of (created_at, id, task), oldest first.
            heads: dict[int, list[list[tuple[datetime, str, QueuedTask]]]] = {}
            for priority, owner_id in groups:
                rows = conn.execute(
                    _QUEUE_HEAD, {"owner_id": owner_id, "priority": priority, "head": head}
                ).all()
                if not rows:
                    continue
                heads.setdefault(priority, []).append(
                    [
                        (
                            row.created_at,
                            row.id,
                            QueuedTask(
                                id=row.id,
                                owner_id=row.owner_id,
                                priority=row.priority,
                                required_cpu_cores=row.required_cpu_cores,
                                required_memory_gb=row.required_memory_gb,
                                required_labels=dict(row.required_labels or {}),
                            ),
                        )
                        for row in rows
                    ]
                )
        ordered: list[QueuedTask] = []
        # The per-owner cap counts an owner's tasks across priorities, most urgent first.
        taken: dict[int, int] = {}
        for priority in sorted(heads, reverse=True):
            owners = heads[priority]
            # Owners take turns: the first of each (oldest first), then the second of each...
            for turn in range(max(len(queue) for queue in owners)):
                # Within a turn, the owner served longest ago first, then the oldest task.
                at_turn = sorted(
                    (queue[turn] for queue in owners if turn < len(queue)),
                    key=lambda head: (served.get(head[2].owner_id, -1), head[0], head[1]),
                )
                for _, _, task in at_turn:
                    if taken.get(task.owner_id, 0) < per_owner:
                        taken[task.owner_id] = taken.get(task.owner_id, 0) + 1
                        ordered.append(task)
                        if len(ordered) >= limit:
                            return ordered
        return ordered

    def node_loads(self) -> dict[str, NodeLoad]:
        with self._read() as conn:
            rows = conn.execute(_NODE_LOADS).all()
        return {
            str(node_id): NodeLoad(int(count), int(cpu), float(memory))
            for node_id, count, cpu, memory in rows
        }

    def assign_tasks(self, assignments: Sequence[tuple[str, str]]) -> list[TaskRecord]:
        if not assignments:
            return []
        node_of = dict(assignments)
        now = self._now()
        with self._write() as conn:
            pending = [
                _task(row) for row in conn.execute(_PENDING_BY_IDS, {"ids": sorted(node_of)})
            ]
            if not pending:
                return []
            # The rows are locked (or, on SQLite, the database is): the records can be
            # built here instead of read back.
            assigned = [
                replace(
                    task,
                    status="assigned",
                    assigned_node_id=node_of[task.id],
                    attempts=task.attempts + 1,
                    progress=0.0,
                    started_at=None,
                    updated_at=now,
                    lease_expires_at=now + timedelta(seconds=task.timeout_seconds),
                )
                for task in pending
            ]
            conn.execute(
                _ASSIGN,
                [
                    {
                        "t_id": task.id,
                        "t_node": task.assigned_node_id,
                        "t_attempt": task.attempts,
                        "t_now": now,
                        "t_lease": task.lease_expires_at,
                    }
                    for task in assigned
                ],
            )
            conn.execute(
                _INSERT_ATTEMPTS,
                [
                    {
                        "task_id": task.id,
                        "attempt": task.attempts,
                        "node_id": task.assigned_node_id,
                        "assigned_at": now,
                    }
                    for task in assigned
                ],
            )
        return assigned

    def active_tasks_of_node(self, node_id: str) -> list[TaskRecord]:
        # Reports bump updated_at; the attempt row keeps when the task was assigned
        # (a task assigned before attempts were recorded has none: updated_at stands in).
        attempt = and_(TaskAttempt.task_id == Task.id, TaskAttempt.attempt == Task.attempts)
        query = (
            self._task_query()
            .outerjoin(TaskAttempt, attempt)
            .where(Task.assigned_node_id == node_id, Task.status.in_(_OWNED_STATES))
            .order_by(func.coalesce(TaskAttempt.assigned_at, Task.updated_at), Task.id)
        )
        with self._read() as conn:
            return [_task(row) for row in conn.execute(query)]

    def held_task_attempts(self, node_id: str) -> dict[str, int]:
        with self._read() as conn:
            rows = conn.execute(_HELD_ATTEMPTS, {"node_id": node_id}).all()
            return {row.id: row.attempts for row in rows}

    def get_tasks(self, task_ids: Sequence[str]) -> list[TaskRecord]:
        if not task_ids:
            return []
        with self._read() as conn:
            rows = conn.execute(_TASKS_BY_IDS, {"ids": sorted(set(task_ids))})
            return [_task(row) for row in rows]

    def report_tasks(self, node_id: str, reports: Sequence[TaskReportIn]) -> list[ReportVerdict]:
        (verdicts,) = self.report_batches([(node_id, reports)])
        return verdicts

    def report_batches(
        self, batches: Sequence[tuple[str, Sequence[TaskReportIn]]]
    ) -> list[list[ReportVerdict]]:
        ids = sorted({report.task_id for _, reports in batches for report in reports})
        if not ids:
            return [[] for _ in batches]
        nodes = sorted({node_id for node_id, _ in batches})
        now = self._now()
        with self._write() as conn:
            state = {
                row.id: dict(row._mapping) for row in conn.execute(_REPORTED_STATE, {"ids": ids})
            }
            # Which node held which attempt matters only for a report that does not match
            # the task's current assignment (late, or never this node's): the common case
            # needs no second read.
            held = {
                (task_id, task["attempts"], task["assigned_node_id"])
                for task_id, task in state.items()
            }
            doubtful = sorted(
                {
                    report.task_id
                    for node_id, reports in batches
                    for report in reports
                    if (report.task_id, report.attempt, node_id) not in held
                }
            )
            if doubtful:
                held.update(
                    (row.task_id, row.attempt, row.node_id)
                    for row in conn.execute(_ATTEMPT_HOLDERS, {"ids": doubtful, "nodes": nodes})
                )
            results: list[list[ReportVerdict]] = []
            # The final values of each task the batches change, applied together below.
            changes: dict[str, tuple[int, dict[str, Any]]] = {}
            for node_id, reports in batches:
                verdicts: list[ReportVerdict] = []
                for report in reports:
                    task = state.get(report.task_id)
                    if task is None:
                        verdicts.append(ReportVerdict.NOT_FOUND)
                    elif (report.task_id, report.attempt, node_id) not in held:
                        verdicts.append(ReportVerdict.NOT_ASSIGNED)
                    elif (
                        task["assigned_node_id"] != node_id
                        or task["attempts"] != report.attempt
                        or task["status"] not in _OWNED_STATES
                    ):
                        verdicts.append(ReportVerdict.STALE)
                    else:
                        values = _report_values(task, report, now)
                        # Later reports see the change (a result after a start).
                        task.update(values)
                        earlier = changes.get(report.task_id, (report.attempt, {}))[1]
                        changes[report.task_id] = (report.attempt, {**earlier, **values})
                        verdicts.append(ReportVerdict.ACCEPTED)
                results.append(verdicts)
            self._apply_changes(conn, changes, now)
        return results

    @staticmethod
    def _apply_changes(
        conn: Connection, changes: Mapping[str, tuple[int, dict[str, Any]]], now: datetime
    ) -> None:
        """One executemany per shape of change, each a compare-and-set on the attempt."""
        by_shape: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for task_id, (attempt, values) in sorted(changes.items()):  # stable lock order
            shape = tuple(sorted(values))
            row = {f"v_{name}": value for name, value in values.items()}
            by_shape.setdefault(shape, []).append({"t_id": task_id, "t_attempt": attempt, **row})
        for shape, params in by_shape.items():
            for row in params:
                row["t_now"] = now
            conn.execute(_report_update(shape), params)

    def fail_overdue_tasks(self, now: datetime) -> list[TaskRecord]:
        overdue = and_(Task.status.in_(_OWNED_STATES), Task.lease_expires_at < now)
        with self._write() as conn:
            records = [_task(row) for row in conn.execute(self._task_query().where(overdue))]
            if records:
                conn.execute(
                    update(Task)
                    .where(Task.id.in_([r.id for r in records]), overdue)
                    .values(
                        status="failed",
                        error="timed out",
                        finished_at=now,
                        updated_at=now,
                        lease_expires_at=None,
                    )
                )
        return records

    def unfinished_task_count(self, owner: str) -> int:
        with self._read() as conn:
            return int(
                conn.scalar(
                    select(func.count())
                    .select_from(Task)
                    .where(
                        self._owner_filter(Task.user_id, owner),
                        Task.status.in_(TASK_ACTIVE_STATUSES),
                    )
                )
                or 0
            )
