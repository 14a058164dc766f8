"""The SQLAlchemy backend: one store for SQLite and PostgreSQL, assembled per aggregate."""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path

from sqlalchemy import (
    text,
)

from nodepool.store.audit import SqlAuditStore
from nodepool.store.base import (
    Store,
)
from nodepool.store.errors import (
    StoreUnavailable,
)
from nodepool.store.nodes import SqlNodeStore
from nodepool.store.sqlbase import translated
from nodepool.store.tasks import SqlTaskStore
from nodepool.store.users import SqlUserStore

__all__ = ["SqlStore"]


class SqlStore(SqlUserStore, SqlNodeStore, SqlTaskStore, SqlAuditStore, Store):
    """The :class:`Store` on a SQLAlchemy engine from :func:`create_engine_for`.

    The schema must be migrated first (:func:`nodepool.store.migrate.migrate`).
    """

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
            with translated(), self._engine.connect() as conn:
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
