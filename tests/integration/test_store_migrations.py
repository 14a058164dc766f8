"""The packaged migrations build exactly schema.py, on SQLite and PostgreSQL, and the
engines are configured as the store relies on."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Engine, Integer, MetaData, inspect, text

from nodepool.store import create_engine_for, current_revision, head_revision, migrate
from nodepool.store.engine import normalize_url
from nodepool.store.schema import Base


@pytest.fixture
def fresh_url(store_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """An empty, never-migrated database."""
    if store_backend == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh' / 'nodepool.db'}"
    factory: Callable[[], str] = request.getfixturevalue("postgres_database_factory")
    return factory()


def _differences(engine: Engine, metadata: MetaData) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, metadata))


def test_migrations_at_head_match_schema(fresh_url: str) -> None:
    assert current_revision(fresh_url) is None
    migrate(fresh_url)
    assert current_revision(fresh_url) == head_revision()
    engine = create_engine_for(fresh_url)
    try:
        assert _differences(engine, Base.metadata) == []
        names = set(inspect(engine).get_table_names())
        assert {"users", "user_roles", "nodes", "tasks", "api_keys", "refresh_sessions"} <= names
        assert "audit_log" in names
        tables = ("nodes", "tasks", "refresh_sessions")
        indexes = {i["name"] for t in tables for i in inspect(engine).get_indexes(t)}
        assert {"idx_nodes_status", "idx_nodes_last_heartbeat", "idx_tasks_status"} <= indexes
        # Every instance reads the recently revoked sessions every second.
        assert "idx_refresh_sessions_revoked_at" in indexes
    finally:
        engine.dispose()


def test_comparison_would_notice_a_difference(fresh_url: str) -> None:
    """Guards the test above against comparing nothing."""
    migrate(fresh_url)
    changed = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["nodes"].append_column(Column("extra", Integer, nullable=True))
    engine = create_engine_for(fresh_url)
    try:
        assert _differences(engine, changed) != []
    finally:
        engine.dispose()


def test_migrate_twice_is_a_no_op(fresh_url: str) -> None:
    migrate(fresh_url)
    migrate(fresh_url)
    assert current_revision(fresh_url) == head_revision()


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "nodepool.db"
    engine = create_engine_for(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            pragma = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
            }
        assert pragma == {
            "journal_mode": "wal",
            "busy_timeout": 5000,
            "foreign_keys": 1,
            "synchronous": 1,  # NORMAL
        }
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        engine.dispose()


def test_sqlite_foreign_keys_are_enforced(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fk.db'}"
    migrate(url)
    engine = create_engine_for(url)
    try:
        with pytest.raises(Exception, match="FOREIGN KEY"), engine.begin() as connection:
            connection.execute(text("INSERT INTO user_roles (user_id, role) VALUES (42, 'user')"))
    finally:
        engine.dispose()


def test_postgres_url_spellings_use_psycopg() -> None:
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"
    engine = create_engine_for("postgres://u@127.0.0.1/db")
    try:
        assert engine.dialect.driver == "psycopg"
    finally:
        engine.dispose()
    with pytest.raises(ValueError, match="unsupported"):
        create_engine_for("mysql://u@h/db")
