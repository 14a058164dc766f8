"""Apply the packaged Alembic migrations programmatically (no alembic.ini needed)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.exc import SQLAlchemyError

from nodepool.store.engine import WRITE, create_engine_for
from nodepool.store.errors import StoreUnavailable

__all__ = ["MIGRATIONS_DIR", "alembic_config", "current_revision", "head_revision", "migrate"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Any fixed 64-bit number: serialises concurrent start-ups of several server instances
# on one PostgreSQL database, so only one of them runs each migration.
_PG_MIGRATION_LOCK = 0x6E6F6465706F6F6C  # "nodepool"


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the packaged scripts; ``env.py`` uses ``connection`` if given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(database_url: str) -> str | None:
    """The revision the database is at; ``None`` for an empty database."""
    engine = create_engine_for(database_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def migrate(database_url: str) -> None:
    """Upgrade the database to the newest revision; a no-op when it is already there.

    Raises :class:`StoreUnavailable` when the database cannot be reached or created.
    """
    try:
        _upgrade(database_url)
    except (SQLAlchemyError, OSError) as exc:
        raise StoreUnavailable("the database cannot be reached or created") from exc


def _upgrade(database_url: str) -> None:
    engine = create_engine_for(database_url)
    try:
        with (
            engine.connect().execution_options(**{WRITE: True}) as connection,
            connection.begin(),
        ):
            if connection.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
                )
            command.upgrade(alembic_config(connection), "head")
    finally:
        engine.dispose()
