"""AuditService: the audit log for administrators."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc

from nodepool.domain.audit import AuditLog
from nodepool.errors import InvalidArgumentError
from nodepool.servicers._convert import timestamp
from nodepool.status import translate_errors
from nodepool.v1 import audit_pb2 as pb
from nodepool.v1 import audit_pb2_grpc as pb_grpc

__all__ = ["AuditServicer"]

_Context = grpc.aio.ServicerContext[Any, Any]


def _since(request: pb.ListAuditEventsRequest) -> datetime | None:
    if not request.HasField("since"):
        return None
    try:
        return request.since.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgumentError("since is out of range") from None


class AuditServicer(pb_grpc.AuditServiceServicer):
    def __init__(self, log: AuditLog) -> None:
        self._log = log

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: _Context
    ) -> pb.ListAuditEventsResponse:
        async with translate_errors(context):
            page = await self._log.list(
                page_size=request.page_size,
                cursor=request.page_token or None,
                username=request.username or None,
                method=request.method or None,
                outcome=request.outcome or None,
                since=_since(request),
            )
        return pb.ListAuditEventsResponse(
            events=[
                pb.AuditEvent(
                    id=entry.id or 0,
                    at=timestamp(entry.at),
                    principal=entry.principal,
                    username=entry.username or "",
                    method=entry.method,
                    outcome=entry.outcome,
                    code=str(entry.detail.get("code", "")),
                    peer=entry.peer,
                    detail={str(k): str(v) for k, v in entry.detail.items()},
                )
                for entry in page.items
            ],
            next_page_token=page.next_cursor or "",
        )
