"""The certificate and revocation records of a CA.

By default a SQLite file ``DIR/pki.db`` beside the CA key; any SQLAlchemy URL works, so
several servers can read one PostgreSQL database. Servers need only the two methods of
:class:`RevocationSource`. Every failure raises :class:`~pki.errors.StoreError`: nothing
in here ever answers "not revoked" because the records could not be read.
"""

from __future__ import annotations

import enum
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, Self
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine

from pki.errors import NotInitializedError, StoreError
from pki.identity import CertificateKind

__all__ = [
    "STORE_FILE",
    "CertificateRecord",
    "CertificateStatus",
    "CertificateStore",
    "RevocationSource",
    "StoreTransaction",
    "format_serial",
]

STORE_FILE = "pki.db"
SCHEMA_VERSION = 1


def format_serial(serial: int) -> str:
    """The canonical text form of a serial: lowercase hex, no prefix, no leading zeros."""
    return format(serial, "x")


class CertificateStatus(enum.StrEnum):
    VALID = "valid"
    NOT_YET_VALID = "not-yet-valid"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    """One issued certificate. Times are timezone-aware UTC."""

    serial: int
    kind: CertificateKind
    name: str
    owner: str | None
    spiffe_id: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    fingerprint_sha256: str
    revoked_at: datetime | None = None
    revocation_reason: str | None = None
    revoked_by: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def status(self, at: datetime | None = None) -> CertificateStatus:
        at = at or datetime.now(UTC)
        if self.revoked_at is not None:
            return CertificateStatus.REVOKED
        if at >= self.not_after:
            return CertificateStatus.EXPIRED
        if at < self.not_before:
            return CertificateStatus.NOT_YET_VALID
        return CertificateStatus.VALID


class RevocationSource(Protocol):
    """The narrow interface a server needs. Any error raised means "unknown", never "not revoked".

    Read ``revocation_version()`` before ``revoked_serials()`` (and ``issuance_version()``
    before ``issued_serials()``): a change landing in between is then seen again at the
    next poll instead of being missed.
    """

    def revocation_version(self) -> int: ...

    def revoked_serials(self) -> frozenset[int]: ...

    def issuance_version(self) -> int: ...

    def issued_serials(self) -> frozenset[int]: ...


class _UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every backend."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the certificate store")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


_metadata = sa.MetaData()

# Table names carry a pki_ prefix so the records can share a database with Node Pool's own.
_certificates = sa.Table(
    "pki_certificates",
    _metadata,
    # Hex text: serials are up to 159 bits, beyond every SQL integer type.
    sa.Column("serial", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("owner", sa.String(32)),
    sa.Column("spiffe_id", sa.String(512), nullable=False),
    sa.Column("not_before", _UTCDateTime(), nullable=False),
    sa.Column("not_after", _UTCDateTime(), nullable=False),
    sa.Column("issued_at", _UTCDateTime(), nullable=False),
    sa.Column("fingerprint_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("revoked_at", _UTCDateTime()),
    sa.Column("revocation_reason", sa.String(32)),
    sa.Column("revoked_by", sa.String(255)),
    sa.CheckConstraint("kind IN ('server', 'node', 'client')", name="pki_certificates_kind"),
    sa.Index("ix_pki_certificates_name", "name"),
    sa.Index("ix_pki_certificates_revoked_at", "revoked_at"),
)

# One row. revocation_version moves on every revocation so pollers can skip the full read.
_state = sa.Table(
    "pki_state",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("revocation_version", sa.BigInteger, nullable=False),
    sa.Column("crl_number", sa.BigInteger, nullable=False),
    sa.CheckConstraint("id = 1", name="pki_state_single_row"),
)


@contextmanager
def _translated_errors() -> Iterator[None]:
    try:
        yield
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError("the certificate store cannot be read or written") from exc


def _record_from_row(row: sa.Row[Any]) -> CertificateRecord:
    return CertificateRecord(
        serial=int(row.serial, 16),
        kind=CertificateKind(row.kind),
        name=row.name,
        owner=row.owner,
        spiffe_id=row.spiffe_id,
        not_before=row.not_before,
        not_after=row.not_after,
        issued_at=row.issued_at,
        fingerprint_sha256=row.fingerprint_sha256,
        revoked_at=row.revoked_at,
        revocation_reason=row.revocation_reason,
        revoked_by=row.revoked_by,
    )


def _select_records(
    connection: Connection, *, name: str | None, serial: int | None
) -> list[CertificateRecord]:
    query = sa.select(_certificates).order_by(_certificates.c.issued_at, _certificates.c.serial)
    if name is not None:
        query = query.where(_certificates.c.name == name)
    if serial is not None:
        query = query.where(_certificates.c.serial == format_serial(serial))
    return [_record_from_row(row) for row in connection.execute(query)]


class StoreTransaction:
    """Reads and writes inside one transaction that holds the store's write lock."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def records(
        self, *, name: str | None = None, serial: int | None = None
    ) -> list[CertificateRecord]:
        return _select_records(self._connection, name=name, serial=serial)

    def add(self, record: CertificateRecord) -> None:
        self._connection.execute(
            _certificates.insert().values(
                serial=format_serial(record.serial),
                kind=record.kind.value,
                name=record.name,
                owner=record.owner,
                spiffe_id=record.spiffe_id,
                not_before=record.not_before,
                not_after=record.not_after,
                issued_at=record.issued_at,
                fingerprint_sha256=record.fingerprint_sha256,
                revoked_at=record.revoked_at,
                revocation_reason=record.revocation_reason,
                revoked_by=record.revoked_by,
            )
        )

    def revoke(
        self, records: Iterable[CertificateRecord], *, reason: str, at: datetime, actor: str
    ) -> list[CertificateRecord]:
        """Marks the unrevoked ``records`` revoked; returns them as now stored."""
        revoked: list[CertificateRecord] = []
        for record in records:
            if record.revoked:
                continue
            result = self._connection.execute(
                _certificates.update()
                .where(
                    _certificates.c.serial == format_serial(record.serial),
                    _certificates.c.revoked_at.is_(None),
                )
                .values(revoked_at=at, revocation_reason=reason, revoked_by=actor)
            )
            if result.rowcount == 1:
                revoked.append(
                    replace(record, revoked_at=at, revocation_reason=reason, revoked_by=actor)
                )
        if revoked:
            self._connection.execute(
                _state.update().values(revocation_version=_state.c.revocation_version + 1)
            )
        return revoked

    def next_crl_number(self) -> int:
        self._connection.execute(_state.update().values(crl_number=_state.c.crl_number + 1))
        return int(self._connection.execute(sa.select(_state.c.crl_number)).scalar_one())


class CertificateStore:
    """Certificate and revocation records; see the module docstring.

    Build with :meth:`open` (a CA directory), :meth:`from_url` or :meth:`create`. The
    engine is thread-safe; call :meth:`close` when done.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @classmethod
    def open(cls, directory: Path) -> Self:
        path = Path(directory) / STORE_FILE
        # Never let SQLite create an empty database here: it would read as "nothing revoked".
        if not path.is_file():
            raise NotInitializedError(f"no certificate store in {directory}")
        store = cls(_sqlite_engine(path))
        store._check_schema()
        return store

    @classmethod
    def create(cls, directory: Path) -> Self:
        """A new, empty store file in ``directory`` (mode 0600); fails if one exists."""
        path = Path(directory) / STORE_FILE
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise StoreError(f"a certificate store already exists in {directory}") from None
        except OSError as exc:
            raise StoreError(f"cannot create the certificate store in {directory}") from exc
        store = cls(_sqlite_engine(path))
        try:
            store.create_schema()
        except BaseException:
            store.close()
            for leftover in (
                path,
                path.with_name(f"{STORE_FILE}-wal"),
                path.with_name(f"{STORE_FILE}-shm"),
            ):
                leftover.unlink(missing_ok=True)
            raise
        return store

    @classmethod
    def from_url(cls, url: str | URL, *, create: bool = False) -> Self:
        """A store in any SQLAlchemy database; ``create=True`` makes the tables if missing.

        ``postgresql://`` (and ``postgres://``) URLs use the psycopg 3 driver, so several
        servers on several hosts can share the records through PostgreSQL.
        """
        if isinstance(url, str):
            for prefix in ("postgresql://", "postgres://"):
                if url.startswith(prefix):
                    url = "postgresql+psycopg://" + url[len(prefix) :]
        try:
            engine = sa.create_engine(url, pool_pre_ping=True)
        except (sa.exc.SQLAlchemyError, ValueError) as exc:
            raise StoreError("invalid certificate store URL") from exc
        if engine.dialect.name == "sqlite":
            _configure_sqlite(engine)
        store = cls(engine)
        try:
            if create:
                store.create_schema()
            else:
                store._check_schema()
        except BaseException:
            store.close()
            raise
        return store

    def create_schema(self) -> None:
        """Creates the tables and the state row when missing; safe to call again."""
        with _translated_errors(), self._engine.begin() as connection:
            _metadata.create_all(connection, checkfirst=True)
            if connection.execute(sa.select(sa.func.count()).select_from(_state)).scalar_one():
                return
            connection.execute(
                _state.insert().values(
                    id=1, schema_version=SCHEMA_VERSION, revocation_version=0, crl_number=0
                )
            )

    def _check_schema(self) -> None:
        with _translated_errors(), self._engine.connect() as connection:
            version = connection.execute(sa.select(_state.c.schema_version)).scalar_one_or_none()
        if version != SCHEMA_VERSION:
            raise StoreError(f"unsupported certificate store schema (version {version})")

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def revocation_version(self) -> int:
        """A counter that grows on every revocation; cheap enough to poll every second."""
        with _translated_errors(), self._engine.connect() as connection:
            return int(connection.execute(sa.select(_state.c.revocation_version)).scalar_one())

    def revoked_serials(self) -> frozenset[int]:
        with _translated_errors(), self._engine.connect() as connection:
            rows = connection.execute(
                sa.select(_certificates.c.serial).where(_certificates.c.revoked_at.is_not(None))
            )
            return frozenset(int(serial, 16) for serial in rows.scalars())

    def issuance_version(self) -> int:
        """A number that grows whenever a certificate is recorded (records are never
        deleted, so their count does); cheap enough to poll with the revocation version."""
        with _translated_errors(), self._engine.connect() as connection:
            count = connection.execute(sa.select(sa.func.count()).select_from(_certificates))
            return int(count.scalar_one())

    def issued_serials(self) -> frozenset[int]:
        """Every serial this CA recorded, revoked and expired ones included."""
        with _translated_errors(), self._engine.connect() as connection:
            rows = connection.execute(sa.select(_certificates.c.serial))
            return frozenset(int(serial, 16) for serial in rows.scalars())

    def records(
        self, *, name: str | None = None, serial: int | None = None
    ) -> list[CertificateRecord]:
        """Records in issue order, optionally only those with ``name`` or ``serial``."""
        with _translated_errors(), self._engine.connect() as connection:
            return _select_records(connection, name=name, serial=serial)

    @contextmanager
    def transaction(self) -> Iterator[StoreTransaction]:
        """A write transaction, serialized against every other writer of this store.

        Its first statement updates the state row: PostgreSQL then holds that row lock and
        SQLite its write lock until commit, so check-then-write sequences (is this name
        revoked? then issue) cannot interleave with a concurrent revocation.
        """
        with _translated_errors(), self._engine.begin() as connection:
            locked = connection.execute(_state.update().values(id=_state.c.id)).rowcount
            if locked != 1:
                raise StoreError("the certificate store is not initialized")
            yield StoreTransaction(connection)


def _sqlite_engine(path: Path) -> Engine:
    # mode=rw: if the file disappears, reconnecting fails instead of creating an empty store.
    url = URL.create(
        "sqlite",
        database=f"file:{quote(str(path.absolute()))}",
        query={"mode": "rw", "uri": "true"},
    )
    engine = sa.create_engine(url)
    _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA busy_timeout = 10000")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA journal_mode = WAL")
            # The records are the CA's memory of what it signed: durability over speed.
            cursor.execute("PRAGMA synchronous = FULL")
        finally:
            cursor.close()
