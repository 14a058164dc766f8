"""Reading the audit log (administrators only, by policy)."""

from __future__ import annotations

from datetime import datetime

from nodepool.errors import InvalidArgumentError, UnavailableError
from nodepool.store import (
    AuditEntry,
    AuditStore,
    InvalidArgument,
    Page,
    StoreCalls,
    StoreUnavailable,
)

__all__ = ["MAX_PAGE_SIZE", "AuditLog"]

MAX_PAGE_SIZE = 500


class AuditLog:
    def __init__(self, store: AuditStore, store_calls: StoreCalls) -> None:
        self._store = store
        self._calls = store_calls

    async def list(
        self,
        *,
        page_size: int,
        cursor: str | None,
        username: str | None,
        method: str | None,
        outcome: str | None,
        since: datetime | None,
    ) -> Page[AuditEntry]:
        limit = min(page_size or 100, MAX_PAGE_SIZE)
        try:
            return await self._calls(
                self._store.list_audit,
                limit=limit,
                cursor=cursor,
                username=username,
                method=method,
                outcome=outcome,
                since=since,
            )
        except InvalidArgument:
            raise InvalidArgumentError("page_token is not valid") from None
        except StoreUnavailable:
            raise UnavailableError() from None
