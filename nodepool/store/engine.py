"""Engines for the two supported dialects, configured the way the store relies on."""

from __future__ import annotations

import math
import os
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool, StaticPool

__all__ = ["SINGLE_STATEMENT", "WRITE", "create_engine_for", "normalize_url"]

# Execution option: the transaction will write. On SQLite it then starts with
# BEGIN IMMEDIATE, taking the write lock up front; a deferred transaction that reads and
# then writes fails at once with SQLITE_BUSY when another writer committed meanwhile,
# and busy_timeout does not help there.
WRITE = "nodepool_write"

# Execution option: one statement, no transaction around it (SqlBase._read_one).
SINGLE_STATEMENT = "nodepool_single_statement"

_SQLITE_BUSY_TIMEOUT = 5.0
_POOL_TIMEOUT = 30.0


def normalize_url(url: str) -> str:
    """Map ``postgres://`` and ``postgresql://`` to the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def create_engine_for(url: str, *, pool_size: int = 10, timeout: float | None = None) -> Engine:
    """An engine for a ``sqlite:///`` or ``postgresql://`` URL.

    ``pool_size`` connections and no overflow: the server calls the store from exactly
    that many threads (:class:`~nodepool.store.calls.StoreCalls`), so a connection is never
    opened per call. ``timeout`` (seconds) bounds every wait for the database: a free
    connection, a new connection, a lock, a statement. ``None`` (migrations, local admin
    commands) waits as long as the work takes.
    """
    sa_url = make_url(normalize_url(url))
    if sa_url.get_backend_name() == "sqlite":
        return _sqlite_engine(sa_url.database, pool_size, timeout)
    if sa_url.get_backend_name() == "postgresql":
        connect_args: dict[str, Any] = {}
        if timeout is not None:
            milliseconds = int(timeout * 1000)
            connect_args = {
                "connect_timeout": max(1, math.ceil(timeout)),
                # Server-side bounds: a statement or a lock wait longer than callers wait
                # for it is cancelled, so a stall frees its connection by itself.
                "options": f"-c statement_timeout={milliseconds} -c lock_timeout={milliseconds}",
            }
        return create_engine(
            sa_url,
            pool_size=pool_size,
            max_overflow=0,
            pool_timeout=_POOL_TIMEOUT if timeout is None else timeout,
            # Checked on checkout: a connection that died with a restarted server is
            # replaced instead of failing a call. (Measured against no ping in
            # bench/rpc_paths.py; see bench/README.md.)
            pool_pre_ping=True,
            connect_args=connect_args,
        )
    raise ValueError("unsupported database URL: expected sqlite:/// or postgresql://")


def _sqlite_engine(database: str | None, pool_size: int, timeout: float | None) -> Engine:
    busy_timeout = _SQLITE_BUSY_TIMEOUT if timeout is None else timeout
    in_memory = not database or database == ":memory:"
    if in_memory:
        # One shared connection, or every checkout would see a different empty database.
        engine = create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    else:
        assert database is not None
        path = Path(database).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        _create_private_file(path)
        engine = create_engine(
            f"sqlite:///{path}",
            poolclass=QueuePool,
            pool_size=pool_size,
            max_overflow=0,
            pool_timeout=_POOL_TIMEOUT if timeout is None else timeout,
            connect_args={"check_same_thread": False, "timeout": busy_timeout},
        )
    busy_timeout_ms = int(busy_timeout * 1000)
    event.listen(
        engine, "connect", lambda conn, record: _on_sqlite_connect(conn, record, busy_timeout_ms)
    )
    event.listen(engine, "begin", _on_sqlite_begin)
    return engine


def _create_private_file(path: Path) -> None:
    # Created here with 0600 before SQLite opens it; SQLite gives -wal and -shm the
    # database file's permissions.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _on_sqlite_connect(
    dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry, busy_timeout_ms: int
) -> None:
    assert isinstance(dbapi_connection, sqlite3.Connection)
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's implicit BEGIN
    # would be DEFERRED and skip our choice).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _on_sqlite_begin(connection: Connection) -> None:
    options: dict[str, Any] = dict(connection.get_execution_options())
    if options.get(SINGLE_STATEMENT):
        return  # pysqlite in autocommit mode: the statement is its own transaction
    connection.exec_driver_sql("BEGIN IMMEDIATE" if options.get(WRITE) else "BEGIN")
