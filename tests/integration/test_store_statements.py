"""A read that is one statement costs one statement: no BEGIN and COMMIT around it."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event

from nodepool.store import SqlStore

pytestmark = pytest.mark.parametrize("store_backend", ["sqlite"], indirect=True)


def _statements(store: SqlStore) -> list[str]:
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement.split()[0].upper())

    event.listen(store.engine, "before_cursor_execute", record)
    return seen


def test_single_statement_reads_send_no_transaction_statements(store: SqlStore) -> None:
    store.create_user("ursula", "hash")
    seen = _statements(store)
    store.get_user("ursula")
    store.list_api_keys("ursula")
    store.list_sessions_revoked_since(store._now())
    assert seen == ["SELECT", "SELECT", "SELECT"]


def test_reads_of_several_statements_still_share_one_transaction(store: SqlStore) -> None:
    store.create_user("vera", "hash")
    seen = _statements(store)
    store.list_users(limit=10)
    assert seen == ["BEGIN", "SELECT", "SELECT"]
