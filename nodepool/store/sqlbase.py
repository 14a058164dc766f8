"""What every SQL aggregate shares: transactions, driver-error translation, cursors."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeAlias

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    Select,
    select,
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
)
from nodepool.store.engine import SINGLE_STATEMENT, WRITE
from nodepool.store.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NotFound,
    StoreError,
    StoreUnavailable,
)
from nodepool.store.schema import User

__all__ = [
    "MAX_PAGE_SIZE",
    "AnyRow",
    "AnySelect",
    "SqlBase",
    "canonical_username",
    "check_limit",
    "check_roles",
    "decode_cursor",
    "decode_int_cursor",
    "encode_cursor",
    "json_object",
    "translated",
    "utcnow",
]

AnyRow: TypeAlias = Row[*tuple[Any, ...]]
AnySelect: TypeAlias = Select[*tuple[Any, ...]]

MAX_PAGE_SIZE = 1000


def utcnow() -> datetime:
    return datetime.now(UTC)


def canonical_username(username: str) -> str:
    return username.casefold()


def check_roles(roles: Iterable[str]) -> frozenset[str]:
    wanted = frozenset(roles)
    unknown = wanted - ROLES
    if unknown:
        raise InvalidArgument(f"unknown role(s): {', '.join(sorted(unknown))}")
    return wanted


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"limit must be between 1 and {MAX_PAGE_SIZE}")
    return limit


def json_object(value: Mapping[str, Any]) -> dict[str, Any]:
    """A plain JSON-compatible copy; checked here because drivers differ in where (and
    whether) they would fail on anything else."""
    try:
        copy: dict[str, Any] = json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError):
        raise InvalidArgument("a value is not JSON-serialisable") from None
    return copy


def encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode("\x1f".join(parts).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, count: int) -> list[str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("invalid cursor") from None
    parts = raw.split("\x1f")
    if len(parts) != count:
        raise InvalidArgument("invalid cursor")
    return parts


def decode_int_cursor(cursor: str) -> int:
    (value,) = decode_cursor(cursor, 1)
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument("invalid cursor") from None


def is_unique_violation(exc: IntegrityError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate is not None:
        return bool(sqlstate == "23505")
    return "UNIQUE constraint failed" in str(exc.orig) or "PRIMARY KEY" in str(exc.orig)


@contextmanager
def translated() -> Iterator[None]:
    """Turn driver errors into store errors; messages never carry SQL or parameters."""
    try:
        yield
    except StoreError:
        raise
    except IntegrityError as exc:
        if is_unique_violation(exc):
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


class SqlBase:
    """The engine, the clock and the transaction helpers every aggregate uses.

    ``clock`` is the source of "now" (tests pass a fake one).
    """

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = utcnow) -> None:
        self._engine = engine
        self._clock = clock
        self._sqlite = engine.dialect.name == "sqlite"
        # SQLite has one writer at a time. Writers that meet in SQLite wait in its busy
        # handler, which sleeps 1, 2, 5, 10... ms between tries: tens of milliseconds per
        # write under load. Queued on a lock here, the next writer starts the moment the
        # previous one commits. (Several processes on one file still meet in SQLite.)
        self._write_lock = threading.Lock() if self._sqlite else contextlib.nullcontext()

    @property
    def engine(self) -> Engine:
        return self._engine

    # -- transactions -------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with translated(), self._engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _read_one(self) -> Iterator[Connection]:
        """For a read that is one statement: no BEGIN and COMMIT around it.

        A single statement is atomic on its own; the transaction round trips cost more
        than the read. PostgreSQL runs it in autocommit; on SQLite no BEGIN is sent.
        Reads of several statements that must agree use :meth:`_read`.
        """
        options: dict[str, Any] = {SINGLE_STATEMENT: True}
        if not self._sqlite:
            options["isolation_level"] = "AUTOCOMMIT"
        with translated(), self._engine.connect().execution_options(**options) as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with (
            translated(),
            self._write_lock,
            self._engine.connect().execution_options(**{WRITE: True}) as conn,
            conn.begin(),
        ):
            yield conn

    def _now(self) -> datetime:
        return self._clock()

    def _user_id(self, conn: Connection, username: str, *, lock: bool = False) -> int:
        query = select(User.id).where(User.username_canonical == canonical_username(username))
        if lock:
            query = query.with_for_update()
        user_id = conn.scalar(query)
        if user_id is None:
            raise NotFound("no such user")
        return user_id

    @staticmethod
    def _owner_filter(column: InstrumentedAttribute[int], owner: str) -> ColumnElement[bool]:
        return column.in_(
            select(User.id).where(User.username_canonical == canonical_username(owner))
        )
