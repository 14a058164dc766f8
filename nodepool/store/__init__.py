"""Persistence: the abstract :class:`Store`, its records and errors, and the SQL backend."""

from nodepool.store.base import (
    NODE_STATUSES,
    ROLES,
    TASK_ACTIVE_STATUSES,
    TASK_STATUSES,
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
from nodepool.store.engine import create_engine_for
from nodepool.store.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    StoreError,
    StoreUnavailable,
)
from nodepool.store.migrate import current_revision, head_revision, migrate
from nodepool.store.sql import SqlStore

__all__ = [
    "NODE_STATUSES",
    "ROLES",
    "TASK_ACTIVE_STATUSES",
    "TASK_STATUSES",
    "TASK_TERMINAL_STATUSES",
    "UNSET",
    "AlreadyExists",
    "ApiKeyRecord",
    "AuditEntry",
    "Conflict",
    "Heartbeat",
    "InvalidArgument",
    "LimitExceeded",
    "NodeRecord",
    "NotFound",
    "Page",
    "SessionRecord",
    "SqlStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TaskRecord",
    "Unset",
    "UserRecord",
    "create_engine_for",
    "current_revision",
    "head_revision",
    "migrate",
    "open_store",
]


def open_store(database_url: str, *, run_migrations: bool = True) -> SqlStore:
    """Migrate (unless told not to) and open the store for ``database_url``."""
    if run_migrations:
        migrate(database_url)
    return SqlStore(create_engine_for(database_url))
