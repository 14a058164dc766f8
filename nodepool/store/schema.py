"""The database schema, in one module. ``migrations/versions`` must match it exactly
(a test runs Alembic's autogenerate comparison on SQLite and PostgreSQL).

The original Node Pool tables (users, nodes, tasks) keep their columns and index names.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "ApiKey",
    "AuditLog",
    "Base",
    "Node",
    "NodeEvent",
    "RefreshSession",
    "RemovedNode",
    "Task",
    "TaskAttempt",
    "UTCDateTime",
    "User",
    "UserRole",
]

# Deterministic constraint names on every dialect, so later migrations can address them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC in and out. SQLite has no time zones, so it stores naive UTC text;
    PostgreSQL stores ``timestamptz``."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit id.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    # casefold(username): enforces case-insensitive uniqueness portably.
    username_canonical: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(Text)
    email: Mapped[str | None] = mapped_column(String(254))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_login: Mapped[datetime | None]
    is_active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())
    failed_logins: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    locked_until: Mapped[datetime | None]
    password_changed_at: Mapped[datetime | None]


class UserRole(Base):
    __tablename__ = "user_roles"
    __table_args__ = (CheckConstraint("role IN ('admin', 'user', 'node')", name="role_valid"),)

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    role: Mapped[str] = mapped_column(String(16), primary_key=True)


class Node(Base):
    __tablename__ = "nodes"
    __table_args__ = (
        Index("idx_nodes_status", "status"),
        Index("idx_nodes_last_heartbeat", "last_heartbeat"),
        Index("idx_nodes_user_id", "user_id"),
    )

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    ip_address: Mapped[str] = mapped_column(String(64))
    port: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), server_default=text("'offline'"))
    cpu_cores: Mapped[int | None] = mapped_column(Integer)
    memory_gb: Mapped[float | None] = mapped_column(Float)
    disk_gb: Mapped[float | None] = mapped_column(Float)
    registered_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_heartbeat: Mapped[datetime | None]
    labels: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any]]
    drain_requested: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # When a drain gives up waiting for running tasks and removes the node anyway.
    drain_deadline: Mapped[datetime | None]
    # How many tasks the node runs at once; 0 = a node that takes no tasks.
    task_slots: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())


class NodeEvent(Base):
    """A node's status history; kept after the node is removed."""

    __tablename__ = "node_events"
    __table_args__ = (Index("idx_node_events_node_id_id", "node_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    node_id: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(server_default=func.now())
    event: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(String(255), server_default=text("''"))


class RemovedNode(Base):
    """A node id that was removed: it may not register again until an admin re-admits it."""

    __tablename__ = "removed_nodes"

    node_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    removed_at: Mapped[datetime] = mapped_column(server_default=func.now())
    removed_by: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(String(255), server_default=text("''"))


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        Index("idx_tasks_status", "status"),
        # The claim query: oldest pending first.
        Index("idx_tasks_status_created_at", "status", "created_at"),
        Index("idx_tasks_user_id_created_at", "user_id", "created_at"),
        # A node's active tasks (its delivery stream), among all it ever ran.
        Index("idx_tasks_assigned_node_id_status", "assigned_node_id", "status"),
        # What the active tasks hold of each node (the scheduler, every round).
        Index("idx_tasks_status_assigned_node_id", "status", "assigned_node_id"),
        # The scheduler's fair queue: pending tasks per owner by priority and age.
        Index(
            "idx_tasks_status_user_priority", "status", "user_id", "priority", "created_at", "id"
        ),
        UniqueConstraint("user_id", "idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    task_type: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), server_default=text("'pending'"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    assigned_node_id: Mapped[str | None] = mapped_column(
        ForeignKey("nodes.id", ondelete="SET NULL")
    )
    result: Mapped[bytes | None] = mapped_column(LargeBinary)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    required_cpu_cores: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    required_memory_gb: Mapped[float] = mapped_column(Float, server_default=text("0"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, server_default=text("3"))
    timeout_seconds: Mapped[int] = mapped_column(Integer, server_default=text("3600"))
    progress: Mapped[float] = mapped_column(Float, server_default=text("0"))
    error: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None]
    priority: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # Labels a node must carry (equal values) to run the task.
    # NULL for tasks submitted before labels existed: no requirement.
    required_labels: Mapped[dict[str, Any] | None]
    exit_code: Mapped[int | None] = mapped_column(Integer)


class TaskAttempt(Base):
    """Which node ran which attempt of a task: the fence that tells a late report (from a
    node that held an earlier attempt) from a report by a node that never held the task."""

    __tablename__ = "task_attempts"

    task_id: Mapped[str] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[str] = mapped_column(String(128))
    assigned_at: Mapped[datetime] = mapped_column(server_default=func.now())


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (Index("idx_api_keys_user_id", "user_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    lookup_id: Mapped[str] = mapped_column(String(64), unique=True)
    secret_hash: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(String(128))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    # The certificate identity (URI SAN) the key only works through; NULL = any device.
    bound_device: Mapped[str | None] = mapped_column(String(255))


class RefreshSession(Base):
    __tablename__ = "refresh_sessions"
    __table_args__ = (
        Index("idx_refresh_sessions_user_id", "user_id"),
        Index("idx_refresh_sessions_expires_at", "expires_at"),
        # Every instance asks for the sessions revoked in the last seconds, every second.
        Index("idx_refresh_sessions_revoked_at", "revoked_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    current_token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    revoked_reason: Mapped[str | None] = mapped_column(String(64))
    rotated_at: Mapped[datetime | None]
    generation: Mapped[int] = mapped_column(Integer, server_default=text("0"))


class AuditLog(Base):
    __tablename__ = "audit_log"
    __table_args__ = (Index("idx_audit_log_at", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    principal: Mapped[str] = mapped_column(String(255))
    username: Mapped[str | None] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(255))
    outcome: Mapped[str] = mapped_column(String(64))
    peer: Mapped[str] = mapped_column(String(255))
    detail: Mapped[dict[str, Any]]
