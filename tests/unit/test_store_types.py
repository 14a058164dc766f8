"""Store helpers that need no database: the UTC column type and cursors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy.dialects import postgresql, sqlite

from nodepool.store.errors import InvalidArgument
from nodepool.store.schema import UTCDateTime
from nodepool.store.sqlbase import decode_cursor as _decode_cursor
from nodepool.store.sqlbase import encode_cursor as _encode_cursor

PLUS_TWO = timezone(timedelta(hours=2))
SQLITE = sqlite.dialect()
POSTGRES = postgresql.dialect()  # type: ignore[no-untyped-call]


def test_utc_datetime_stores_naive_utc_on_sqlite_and_aware_on_postgres() -> None:
    column = UTCDateTime()
    local = datetime(2030, 1, 1, 14, 0, tzinfo=PLUS_TWO)
    assert column.process_bind_param(local, SQLITE) == datetime(2030, 1, 1, 12, 0)
    assert column.process_bind_param(local, POSTGRES) == datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    assert column.process_bind_param(None, SQLITE) is None


def test_utc_datetime_returns_aware_utc() -> None:
    column = UTCDateTime()
    naive = column.process_result_value(datetime(2030, 1, 1, 12, 0), SQLITE)
    assert naive == datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    assert naive is not None
    assert naive.tzinfo is UTC
    shifted = column.process_result_value(datetime(2030, 1, 1, 14, 0, tzinfo=PLUS_TWO), POSTGRES)
    assert shifted is not None
    assert shifted.tzinfo is UTC
    assert shifted.hour == 12


def test_utc_datetime_refuses_naive_values() -> None:
    with pytest.raises(ValueError, match="naive"):
        UTCDateTime().process_bind_param(datetime(2030, 1, 1), SQLITE)


def test_cursors_round_trip_and_reject_garbage() -> None:
    cursor = _encode_cursor("2030-01-01T00:00:00+00:00", "abc")
    assert _decode_cursor(cursor, 2) == ["2030-01-01T00:00:00+00:00", "abc"]
    for bad in ("%%%", "not base64 at all!", _encode_cursor("only-one")):
        with pytest.raises(InvalidArgument):
            _decode_cursor(bad, 2)
