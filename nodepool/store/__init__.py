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
    AuditStore,
    Heartbeat,
    NewTask,
    NodeEventRecord,
    NodeLoad,
    NodeRecord,
    NodeStore,
    Page,
    PoolStats,
    QueuedTask,
    ReportState,
    ReportVerdict,
    SessionRecord,
    Store,
    TaskRecord,
    TaskReportIn,
    TaskStore,
    Unset,
    UserRecord,
    UserStore,
)
from nodepool.store.calls import StoreCalls
from nodepool.store.engine import create_engine_for
from nodepool.store.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    LimitExceeded,
    NodeRemoved,
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
    "AuditStore",
    "Conflict",
    "Heartbeat",
    "InvalidArgument",
    "LimitExceeded",
    "NewTask",
    "NodeEventRecord",
    "NodeLoad",
    "NodeRecord",
    "NodeRemoved",
    "NodeStore",
    "NotFound",
    "Page",
    "PoolStats",
    "QueuedTask",
    "ReportState",
    "ReportVerdict",
    "SessionRecord",
    "SqlStore",
    "Store",
    "StoreCalls",
    "StoreError",
    "StoreUnavailable",
    "TaskRecord",
    "TaskReportIn",
    "TaskStore",
    "Unset",
    "UserRecord",
    "UserStore",
    "create_engine_for",
    "current_revision",
    "head_revision",
    "migrate",
    "open_store",
]


def open_store(
    database_url: str,
    *,
    run_migrations: bool = True,
    pool_size: int = 10,
    timeout: float | None = None,
) -> SqlStore:
    """Migrate (unless told not to) and open the store for ``database_url``.

    ``pool_size`` and ``timeout`` as for :func:`create_engine_for`.
    """
    if run_migrations:
        migrate(database_url)
    return SqlStore(create_engine_for(database_url, pool_size=pool_size, timeout=timeout))
