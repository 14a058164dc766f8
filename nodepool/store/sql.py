"""The SQLAlchemy backend: one implementation for SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import binascii
import json
import os
import sqlite3
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    Select,
    and_,
    bindparam,
    case,
    delete,
    false,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    ProgrammingError,
    StatementError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import InstrumentedAttribute

from nodepool.store.base import (
    ROLES,
    TASK_ACTIVE_STATUSES,
    TASK_TERMINAL_STATUSES,
    UNSET,
    ApiKeyRecord,
    AuditEntry,
    Heartbeat,
    NodeRecord,
    Page,
    SessionRecord,
    Store,
    TaskRecord,
    Unset,
    UserRecord,
)
from nodepool.store.engine import WRITE
from nodepool.store.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    StoreError,
    StoreUnavailable,
)
from nodepool.store.schema import ApiKey, AuditLog, Node, RefreshSession, Task, User, UserRole

__all__ = ["SqlStore"]

AnyRow: TypeAlias = Row[*tuple[Any, ...]]
AnySelect: TypeAlias = Select[*tuple[Any, ...]]

MAX_PAGE_SIZE = 1000
_CLAIM_RETRIES = 5
_OWNED_STATES = ("assigned", "running")


def utcnow() -> datetime:
    return datetime.now(UTC)


def canonical_username(username: str) -> str:
    return username.casefold()


def _check_roles(roles: Iterable[str]) -> frozenset[str]:
    wanted = frozenset(roles)
    unknown = wanted - ROLES
    if unknown:
        raise InvalidArgument(f"unknown role(s): {', '.join(sorted(unknown))}")
    return wanted


def _check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"limit must be between 1 and {MAX_PAGE_SIZE}")
    return limit


def _json_object(value: Mapping[str, Any]) -> dict[str, Any]:
    """A plain JSON-compatible copy; checked here because drivers differ in where (and
    whether) they would fail on anything else."""
    try:
        copy: dict[str, Any] = json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError):
        raise InvalidArgument("a value is not JSON-serialisable") from None
    return copy


def _encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode("\x1f".join(parts).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, count: int) -> list[str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("invalid cursor") from None
    parts = raw.split("\x1f")
    if len(parts) != count:
        raise InvalidArgument("invalid cursor")
    return parts


def _decode_int_cursor(cursor: str) -> int:
    (value,) = _decode_cursor(cursor, 1)
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument("invalid cursor") from None


def _is_unique_violation(exc: IntegrityError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate is not None:
        return bool(sqlstate == "23505")
    return "UNIQUE constraint failed" in str(exc.orig) or "PRIMARY KEY" in str(exc.orig)


@contextmanager
def _translated() -> Iterator[None]:
    """Turn driver errors into store errors; messages never carry SQL or parameters."""
    try:
        yield
    except StoreError:
        raise
    except IntegrityError as exc:
        if _is_unique_violation(exc):
            raise AlreadyExists("a record with the same unique key already exists") from exc
        raise Conflict("the change violates a database constraint") from exc
    except DataError as exc:
        raise InvalidArgument("a value does not fit its column") from exc
    except ProgrammingError:
        raise  # a bug in this module, not an outage
    except (DBAPIError, PoolTimeoutError) as exc:
        # Operational and interface errors, lost connections, a locked or corrupt file.
        raise StoreUnavailable("the database is unavailable") from exc
    except StatementError as exc:
        # A parameter our column types refused before reaching the driver (a naive
        # datetime).
        if isinstance(exc.orig, ValueError | TypeError):
            raise InvalidArgument("a value cannot be stored") from exc
        raise


# -- row -> record -------------------------------------------------------------------------

_USER_COLUMNS = (
    User.id,
    User.username,
    User.password_hash,
    User.email,
    User.is_active,
    User.created_at,
    User.updated_at,
    User.last_login,
    User.failed_logins,
    User.locked_until,
    User.password_changed_at,
)

_NODE_COLUMNS = (
    Node.id,
    Node.user_id,
    User.username,
    Node.ip_address,
    Node.port,
    Node.status,
    Node.cpu_cores,
    Node.memory_gb,
    Node.disk_gb,
    Node.labels,
    Node.metrics,
    Node.drain_requested,
    Node.registered_at,
    Node.last_heartbeat,
    Node.updated_at,
)

_TASK_COLUMNS = (
    Task.id,
    Task.user_id,
    User.username,
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

_API_KEY_COLUMNS = (
    ApiKey.id,
    ApiKey.user_id,
    User.username,
    ApiKey.lookup_id,
    ApiKey.secret_hash,
    ApiKey.name,
    ApiKey.scopes,
    ApiKey.created_at,
    ApiKey.expires_at,
    ApiKey.last_used_at,
    ApiKey.revoked_at,
)

_SESSION_COLUMNS = (
    RefreshSession.id,
    RefreshSession.user_id,
    User.username,
    RefreshSession.current_token_hash,
    RefreshSession.generation,
    RefreshSession.created_at,
    RefreshSession.expires_at,
    RefreshSession.rotated_at,
    RefreshSession.revoked_at,
    RefreshSession.revoked_reason,
)

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


def _user(row: AnyRow, roles: Iterable[str]) -> UserRecord:
    values = list(row)
    values.insert(4, frozenset(roles))
    values[5] = bool(values[5])  # is_active
    return UserRecord(*values)


def _node(row: AnyRow) -> NodeRecord:
    values = list(row)
    values[9] = dict(values[9] or {})  # labels
    values[10] = dict(values[10] or {})  # metrics
    values[11] = bool(values[11])  # drain_requested
    return NodeRecord(*values)


def _task(row: AnyRow) -> TaskRecord:
    values = list(row)
    # Drivers return buffer types for BLOB/bytea; records hold plain bytes.
    values[5] = bytes(values[5])  # payload
    if values[9] is not None:
        values[9] = bytes(values[9])  # result
    return TaskRecord(*values)


def _api_key(row: AnyRow) -> ApiKeyRecord:
    values = list(row)
    values[6] = frozenset(values[6] or ())  # scopes
    return ApiKeyRecord(*values)


def _session(row: AnyRow) -> SessionRecord:
    return SessionRecord(*row)


def _audit(row: AnyRow) -> AuditEntry:
    values = list(row)
    values[6] = dict(values[6] or {})  # detail
    return AuditEntry(*values)


class SqlStore(Store):
    """The :class:`Store` on a SQLAlchemy engine from :func:`create_engine_for`.

    The schema must be migrated first (:func:`nodepool.store.migrate.migrate`).
    ``clock`` is the source of "now" (tests pass a fake one).
    """

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = utcnow) -> None:
        self._engine = engine
        self._clock = clock
        self._sqlite = engine.dialect.name == "sqlite"

    @property
    def engine(self) -> Engine:
        return self._engine

    # -- transactions -------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with _translated(), self._engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with (
            _translated(),
            self._engine.connect().execution_options(**{WRITE: True}) as conn,
            conn.begin(),
        ):
            yield conn

    def _now(self) -> datetime:
        return self._clock()

    # -- users --------------------------------------------------------------------------

    def _user_id(self, conn: Connection, username: str, *, lock: bool = False) -> int:
        query = select(User.id).where(User.username_canonical == canonical_username(username))
        if lock:
            query = query.with_for_update()
        user_id = conn.scalar(query)
        if user_id is None:
            raise NotFound("no such user")
        return user_id

    def _load_user(self, conn: Connection, where: ColumnElement[bool]) -> UserRecord:
        row = conn.execute(select(*_USER_COLUMNS).where(where)).first()
        if row is None:
            raise NotFound("no such user")
        roles = conn.scalars(select(UserRole.role).where(UserRole.user_id == row.id)).all()
        return _user(row, roles)

    def _load_user_by_name(self, conn: Connection, username: str) -> UserRecord:
        return self._load_user(conn, User.username_canonical == canonical_username(username))

    def create_user(
        self,
        username: str,
        password_hash: str,
        *,
        email: str | None = None,
        roles: Iterable[str] = ("user",),
    ) -> UserRecord:
        wanted = _check_roles(roles)
        now = self._now()
        try:
            with self._write() as conn:
                user_id = conn.scalar(
                    insert(User)
                    .values(
                        username=username,
                        username_canonical=canonical_username(username),
                        password_hash=password_hash,
                        email=email,
                        is_active=True,
                        failed_logins=0,
                        created_at=now,
                        updated_at=now,
                        password_changed_at=now,
                    )
                    .returning(User.id)
                )
                if wanted:
                    conn.execute(
                        insert(UserRole), [{"user_id": user_id, "role": r} for r in wanted]
                    )
                return self._load_user(conn, User.id == user_id)
        except AlreadyExists:
            raise AlreadyExists("username already taken") from None

    def get_user(self, username: str) -> UserRecord:
        with self._read() as conn:
            return self._load_user_by_name(conn, username)

    def get_user_by_id(self, user_id: int) -> UserRecord:
        with self._read() as conn:
            return self._load_user(conn, User.id == user_id)

    def update_user_fields(
        self,
        username: str,
        *,
        email: str | Unset | None = UNSET,
        password_hash: str | Unset = UNSET,
        is_active: bool | Unset = UNSET,
    ) -> UserRecord:
        now = self._now()
        values: dict[str, Any] = {"updated_at": now}
        if not isinstance(email, Unset):
            values["email"] = email
        if not isinstance(password_hash, Unset):
            values["password_hash"] = password_hash
            values["password_changed_at"] = now
        if not isinstance(is_active, Unset):
            values["is_active"] = is_active
        where = User.username_canonical == canonical_username(username)
        with self._write() as conn:
            if conn.execute(update(User).where(where).values(**values)).rowcount == 0:
                raise NotFound("no such user")
            return self._load_user(conn, where)

    def _change_roles(
        self, username: str, add: frozenset[str], remove: frozenset[str], replace: bool
    ) -> UserRecord:
        with self._write() as conn:
            user_id = self._user_id(conn, username, lock=True)
            held = set(conn.scalars(select(UserRole.role).where(UserRole.user_id == user_id)))
            target = set(add) if replace else (held | add) - remove
            if held - target:
                conn.execute(
                    delete(UserRole).where(
                        UserRole.user_id == user_id, UserRole.role.in_(held - target)
                    )
                )
            if target - held:
                conn.execute(
                    insert(UserRole), [{"user_id": user_id, "role": r} for r in target - held]
                )
            conn.execute(update(User).where(User.id == user_id).values(updated_at=self._now()))
            return self._load_user(conn, User.id == user_id)

    def set_roles(self, username: str, roles: Iterable[str]) -> UserRecord:
        return self._change_roles(username, _check_roles(roles), frozenset(), replace=True)

    def add_role(self, username: str, role: str) -> UserRecord:
        return self._change_roles(username, _check_roles([role]), frozenset(), replace=False)

    def remove_role(self, username: str, role: str) -> UserRecord:
        return self._change_roles(username, frozenset(), _check_roles([role]), replace=False)

    def record_login_success(self, username: str) -> UserRecord:
        where = User.username_canonical == canonical_username(username)
        with self._write() as conn:
            result = conn.execute(
                update(User)
                .where(where)
                .values(last_login=self._now(), failed_logins=0, locked_until=None)
            )
            if result.rowcount == 0:
                raise NotFound("no such user")
            return self._load_user(conn, where)

    def record_login_failure(
        self, username: str, *, lock_after: int, lock_for: timedelta
    ) -> UserRecord:
        where = User.username_canonical == canonical_username(username)
        until = self._now() + lock_for
        # One UPDATE, so concurrent failures are all counted.
        with self._write() as conn:
            result = conn.execute(
                update(User)
                .where(where)
                .values(
                    failed_logins=User.failed_logins + 1,
                    locked_until=case(
                        (User.failed_logins + 1 >= lock_after, until),
                        else_=User.locked_until,
                    ),
                )
            )
            if result.rowcount == 0:
                raise NotFound("no such user")
            return self._load_user(conn, where)

    def list_users(self, *, limit: int = 100, cursor: str | None = None) -> Page[UserRecord]:
        limit = _check_limit(limit)
        query = select(*_USER_COLUMNS).order_by(User.id).limit(limit + 1)
        if cursor is not None:
            query = query.where(User.id > _decode_int_cursor(cursor))
        with self._read() as conn:
            rows = conn.execute(query).all()
            page, more = rows[:limit], len(rows) > limit
            roles: dict[int, list[str]] = {row.id: [] for row in page}
            if page:
                for user_id, role in conn.execute(
                    select(UserRole.user_id, UserRole.role).where(UserRole.user_id.in_(roles))
                ):
                    roles[user_id].append(role)
        items = [_user(row, roles[row.id]) for row in page]
        return Page(items, _encode_cursor(str(page[-1].id)) if more else None)

    # -- nodes --------------------------------------------------------------------------

    @staticmethod
    def _node_query() -> AnySelect:
        return select(*_NODE_COLUMNS).join(User, User.id == Node.user_id)

    def _load_node(self, conn: Connection, node_id: str) -> NodeRecord:
        row = conn.execute(self._node_query().where(Node.id == node_id)).first()
        if row is None:
            raise NotFound("no such node")
        return _node(row)

    def register_node(
        self,
        node_id: str,
        *,
        owner: str,
        ip_address: str,
        port: int,
        cpu_cores: int | None = None,
        memory_gb: float | None = None,
        disk_gb: float | None = None,
        labels: Mapping[str, str] | None = None,
        max_nodes_per_owner: int | None = None,
    ) -> tuple[NodeRecord, bool]:
        now = self._now()
        values: dict[str, Any] = {
            "ip_address": ip_address,
            "port": port,
            "cpu_cores": cpu_cores,
            "memory_gb": memory_gb,
            "disk_gb": disk_gb,
            "labels": _json_object(labels or {}),
            "status": "online",
            "last_heartbeat": now,
            "updated_at": now,
        }
        try:
            with self._write() as conn:
                # Locking the owner's row serialises this owner's registrations on
                # PostgreSQL, so the quota check and the insert cannot interleave.
                owner_id = self._user_id(conn, owner, lock=True)
                holder = conn.scalar(select(Node.user_id).where(Node.id == node_id))
                if holder is not None and holder != owner_id:
                    raise Conflict("node id is registered to another user")
                if holder is not None:
                    conn.execute(update(Node).where(Node.id == node_id).values(**values))
                    return self._load_node(conn, node_id), False
                if max_nodes_per_owner is not None:
                    count = conn.scalar(
                        select(func.count()).select_from(Node).where(Node.user_id == owner_id)
                    )
                    if (count or 0) >= max_nodes_per_owner:
                        raise LimitExceeded("the owner has reached the node limit")
                conn.execute(
                    insert(Node).values(
                        id=node_id,
                        user_id=owner_id,
                        metrics={},
                        drain_requested=False,
                        registered_at=now,
                        **values,
                    )
                )
                return self._load_node(conn, node_id), True
        except AlreadyExists:
            # Another owner inserted the same id between our check and insert.
            raise Conflict("node id is registered to another user") from None

    def get_node(self, node_id: str) -> NodeRecord:
        with self._read() as conn:
            return self._load_node(conn, node_id)

    @staticmethod
    def _owner_filter(column: InstrumentedAttribute[int], owner: str) -> ColumnElement[bool]:
        return column.in_(
            select(User.id).where(User.username_canonical == canonical_username(owner))
        )

    def list_nodes(
        self,
        *,
        owner: str | None = None,
        status: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[NodeRecord]:
        limit = _check_limit(limit)
        query = self._node_query().order_by(Node.id).limit(limit + 1)
        if owner is not None:
            query = query.where(self._owner_filter(Node.user_id, owner))
        if status is not None:
            query = query.where(Node.status == status)
        if cursor is not None:
            (after,) = _decode_cursor(cursor, 1)
            query = query.where(Node.id > after)
        with self._read() as conn:
            rows = conn.execute(query).all()
        items = [_node(row) for row in rows[:limit]]
        more = len(rows) > limit
        return Page(items, _encode_cursor(items[-1].id) if more else None)

    def count_nodes(self, *, owner: str | None = None, status: str | None = None) -> int:
        query = select(func.count()).select_from(Node)
        if owner is not None:
            query = query.where(self._owner_filter(Node.user_id, owner))
        if status is not None:
            query = query.where(Node.status == status)
        with self._read() as conn:
            return int(conn.scalar(query) or 0)

    def remove_node(self, node_id: str, *, owner: str | None = None) -> None:
        where = Node.id == node_id
        if owner is not None:
            where = and_(where, self._owner_filter(Node.user_id, owner))
        with self._write() as conn:
            if conn.scalar(select(Node.id).where(where).with_for_update()) is None:
                raise NotFound("no such node")
            self._requeue(conn, Task.assigned_node_id == node_id, "node removed")
            conn.execute(delete(Node).where(Node.id == node_id))

    def set_node_drain(self, node_id: str, drain: bool) -> NodeRecord:
        with self._write() as conn:
            result = conn.execute(
                update(Node)
                .where(Node.id == node_id)
                .values(drain_requested=drain, updated_at=self._now())
            )
            if result.rowcount == 0:
                raise NotFound("no such node")
            return self._load_node(conn, node_id)

    def apply_heartbeats(self, beats: Sequence[Heartbeat]) -> None:
        if not beats:
            return
        # Last beat per node wins, so the executemany never updates one row twice.
        latest: dict[str, Heartbeat] = {}
        for beat in beats:
            if beat.node_id not in latest or beat.at >= latest[beat.node_id].at:
                latest[beat.node_id] = beat
        statement = (
            update(Node)
            .where(
                Node.id == bindparam("b_id"),
                or_(Node.last_heartbeat.is_(None), Node.last_heartbeat <= bindparam("b_at")),
            )
            .values(
                status=bindparam("b_status"),
                metrics=bindparam("b_metrics"),
                last_heartbeat=bindparam("b_at"),
                updated_at=bindparam("b_at"),
            )
        )
        params = [
            {
                "b_id": b.node_id,
                "b_status": b.status,
                "b_metrics": _json_object(b.metrics),
                "b_at": b.at,
            }
            for b in sorted(latest.values(), key=lambda b: b.node_id)  # stable lock order
        ]
        with self._write() as conn:
            conn.execute(statement, params)

    def mark_stale_nodes_offline(self, older_than: datetime) -> list[str]:
        seen = func.coalesce(Node.last_heartbeat, Node.registered_at)
        with self._write() as conn:
            rows = conn.execute(
                update(Node)
                .where(Node.status != "offline", seen < older_than)
                .values(status="offline", updated_at=self._now())
                .returning(Node.id)
            ).all()
        return sorted(row[0] for row in rows)

    def delete_offline_nodes_before(self, cutoff: datetime) -> int:
        seen = func.coalesce(Node.last_heartbeat, Node.registered_at)
        with self._write() as conn:
            return conn.execute(
                delete(Node).where(Node.status == "offline", seen < cutoff)
            ).rowcount

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
        limit = _check_limit(limit)
        query = self._task_query().order_by(Task.created_at.desc(), Task.id.desc()).limit(limit + 1)
        if owner is not None:
            query = query.where(self._owner_filter(Task.user_id, owner))
        if status is not None:
            query = query.where(Task.status == status)
        if assigned_node_id is not None:
            query = query.where(Task.assigned_node_id == assigned_node_id)
        if cursor is not None:
            at_text, after_id = _decode_cursor(cursor, 2)
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
            next_cursor = _encode_cursor(items[-1].created_at.isoformat(), items[-1].id)
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

    def _requeue(self, conn: Connection, which: ColumnElement[bool], reason: str) -> list[str]:
        now = self._now()
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

    def requeue_tasks_of_nodes(self, node_ids: Iterable[str]) -> list[str]:
        ids = sorted(set(node_ids))
        if not ids:
            return []
        with self._write() as conn:
            return self._requeue(conn, Task.assigned_node_id.in_(ids), "node lost")

    def requeue_expired_tasks(self, now: datetime | None = None) -> list[str]:
        deadline = now or self._now()
        with self._write() as conn:
            return self._requeue(conn, Task.lease_expires_at < deadline, "task timed out")

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

    # -- api keys -----------------------------------------------------------------------

    @staticmethod
    def _api_key_query() -> AnySelect:
        return select(*_API_KEY_COLUMNS).join(User, User.id == ApiKey.user_id)

    def _load_api_key(self, conn: Connection, lookup_id: str) -> ApiKeyRecord:
        row = conn.execute(self._api_key_query().where(ApiKey.lookup_id == lookup_id)).first()
        if row is None:
            raise NotFound("no such API key")
        return _api_key(row)

    def create_api_key(
        self,
        *,
        owner: str,
        lookup_id: str,
        secret_hash: str,
        name: str,
        scopes: Iterable[str],
        expires_at: datetime | None = None,
    ) -> ApiKeyRecord:
        wanted = sorted(_check_roles(scopes))
        with self._write() as conn:
            owner_id = self._user_id(conn, owner)
            conn.execute(
                insert(ApiKey).values(
                    user_id=owner_id,
                    lookup_id=lookup_id,
                    secret_hash=secret_hash,
                    name=name,
                    scopes=wanted,
                    created_at=self._now(),
                    expires_at=expires_at,
                )
            )
            return self._load_api_key(conn, lookup_id)

    def get_api_key_by_lookup_id(self, lookup_id: str) -> ApiKeyRecord:
        with self._read() as conn:
            return self._load_api_key(conn, lookup_id)

    def list_api_keys(self, owner: str) -> list[ApiKeyRecord]:
        query = (
            self._api_key_query()
            .where(self._owner_filter(ApiKey.user_id, owner))
            .order_by(ApiKey.id)
        )
        with self._read() as conn:
            return [_api_key(row) for row in conn.execute(query)]

    def revoke_api_key(self, lookup_id: str, *, owner: str | None = None) -> ApiKeyRecord:
        where = ApiKey.lookup_id == lookup_id
        if owner is not None:
            where = and_(where, self._owner_filter(ApiKey.user_id, owner))
        with self._write() as conn:
            if conn.scalar(select(ApiKey.id).where(where)) is None:
                raise NotFound("no such API key")
            conn.execute(
                update(ApiKey)
                .where(where, ApiKey.revoked_at.is_(None))
                .values(revoked_at=self._now())
            )
            return self._load_api_key(conn, lookup_id)

    def touch_api_key_last_used(self, lookup_id: str, at: datetime | None = None) -> None:
        when = at or self._now()
        with self._write() as conn:
            conn.execute(
                update(ApiKey)
                .where(
                    ApiKey.lookup_id == lookup_id,
                    or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < when),
                )
                .values(last_used_at=when)
            )

    # -- refresh sessions ---------------------------------------------------------------

    @staticmethod
    def _session_query() -> AnySelect:
        return select(*_SESSION_COLUMNS).join(User, User.id == RefreshSession.user_id)

    def _load_session(self, conn: Connection, where: ColumnElement[bool]) -> SessionRecord:
        row = conn.execute(self._session_query().where(where)).first()
        if row is None:
            raise NotFound("no such session")
        return _session(row)

    def create_session(
        self, *, session_id: str, owner: str, token_hash: str, expires_at: datetime
    ) -> SessionRecord:
        with self._write() as conn:
            owner_id = self._user_id(conn, owner)
            conn.execute(
                insert(RefreshSession).values(
                    id=session_id,
                    user_id=owner_id,
                    current_token_hash=token_hash,
                    created_at=self._now(),
                    expires_at=expires_at,
                    generation=0,
                )
            )
            return self._load_session(conn, RefreshSession.id == session_id)

    def get_session(self, session_id: str) -> SessionRecord:
        with self._read() as conn:
            return self._load_session(conn, RefreshSession.id == session_id)

    def get_session_by_token_hash(self, token_hash: str) -> SessionRecord:
        with self._read() as conn:
            return self._load_session(conn, RefreshSession.current_token_hash == token_hash)

    def rotate_session(
        self,
        session_id: str,
        *,
        old_token_hash: str,
        new_token_hash: str,
        expires_at: datetime | None = None,
    ) -> SessionRecord:
        now = self._now()
        values: dict[str, Any] = {
            "current_token_hash": new_token_hash,
            "generation": RefreshSession.generation + 1,
            "rotated_at": now,
        }
        if expires_at is not None:
            values["expires_at"] = expires_at
        with self._write() as conn:
            result = conn.execute(
                update(RefreshSession)
                .where(
                    RefreshSession.id == session_id,
                    RefreshSession.current_token_hash == old_token_hash,
                    RefreshSession.revoked_at.is_(None),
                    RefreshSession.expires_at > now,
                )
                .values(**values)
            )
            if result.rowcount == 0:
                if conn.scalar(select(RefreshSession.id).where(RefreshSession.id == session_id)):
                    raise Conflict("the session was rotated, revoked or has expired")
                raise NotFound("no such session")
            return self._load_session(conn, RefreshSession.id == session_id)

    def revoke_session(self, session_id: str, *, reason: str) -> SessionRecord:
        where = RefreshSession.id == session_id
        with self._write() as conn:
            conn.execute(
                update(RefreshSession)
                .where(where, RefreshSession.revoked_at.is_(None))
                .values(revoked_at=self._now(), revoked_reason=reason)
            )
            return self._load_session(conn, where)

    def revoke_sessions_of_user(
        self, owner: str, *, reason: str, except_session_id: str | None = None
    ) -> list[str]:
        where = and_(
            self._owner_filter(RefreshSession.user_id, owner), RefreshSession.revoked_at.is_(None)
        )
        if except_session_id is not None:
            where = and_(where, RefreshSession.id != except_session_id)
        with self._write() as conn:
            rows = conn.execute(
                update(RefreshSession)
                .where(where)
                .values(revoked_at=self._now(), revoked_reason=reason)
                .returning(RefreshSession.id)
            ).all()
        return sorted(row[0] for row in rows)

    def list_sessions_revoked_since(self, since: datetime) -> list[str]:
        with self._read() as conn:
            rows = conn.execute(
                select(RefreshSession.id)
                .where(RefreshSession.revoked_at >= since)
                .order_by(RefreshSession.revoked_at, RefreshSession.id)
            )
            return [row[0] for row in rows]

    def delete_sessions_expired_before(self, cutoff: datetime) -> int:
        with self._write() as conn:
            return conn.execute(
                delete(RefreshSession).where(RefreshSession.expires_at < cutoff)
            ).rowcount

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
                "detail": _json_object(e.detail),
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
        limit = _check_limit(limit)
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
            query = query.where(AuditLog.id < _decode_int_cursor(cursor))
        with self._read() as conn:
            rows = conn.execute(query).all()
        items = [_audit(row) for row in rows[:limit]]
        more = len(rows) > limit
        return Page(items, _encode_cursor(str(items[-1].id)) if more else None)

    def delete_audit_before(self, cutoff: datetime) -> int:
        with self._write() as conn:
            return conn.execute(delete(AuditLog).where(AuditLog.at < cutoff)).rowcount

    # -- operations ---------------------------------------------------------------------

    def ping(self) -> None:
        with self._read() as conn:
            conn.execute(text("SELECT 1"))

    def backup(self, path: Path) -> None:
        if not self._sqlite:
            raise NotImplementedError("online backup is built in for SQLite only; use pg_dump")
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
        os.close(fd)
        try:
            with _translated(), self._engine.connect() as conn:
                source = conn.connection.dbapi_connection
                assert isinstance(source, sqlite3.Connection)
                target = sqlite3.connect(tmp_name)
                try:
                    # The backup API copies a consistent snapshot while writers continue.
                    source.backup(target)
                finally:
                    target.close()
            os.replace(tmp_name, path)
        except sqlite3.Error as exc:
            Path(tmp_name).unlink(missing_ok=True)
            raise StoreUnavailable("the backup could not be written") from exc
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def close(self) -> None:
        self._engine.dispose()
