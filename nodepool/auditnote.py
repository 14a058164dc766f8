"""What the code behind a call adds to that call's audit entry.

The audit stage sees the caller's certificate and credential, never the request body.
Some calls are about someone else: a failed login is an attack on the account it names,
not on the device that sent it, and an administrator's audit query for that user must find
it. The domain notes such facts here; the audit stage reads the note when it records the
call. Plain Python (a ContextVar), so the domain stays free of gRPC. Each call runs in a
task of its own with its own copy of the context, so a note never reaches another call.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

__all__ = ["AuditNote", "audit_note", "current_audit_note"]


@dataclass(slots=True)
class AuditNote:
    # The account the call was about, when that is not the caller's own (a login).
    subject: str | None = None
    # A refusal for cause (a lockout) rather than a failure: recorded as a denial.
    denied: bool = False
    # Short fixed words only (never request content or secrets).
    detail: dict[str, str] = field(default_factory=dict)


_NOTE: ContextVar[AuditNote | None] = ContextVar("nodepool_audit_note", default=None)


def audit_note() -> AuditNote:
    """The note of the current call, created on first use."""
    note = _NOTE.get()
    if note is None:
        note = AuditNote()
        _NOTE.set(note)
    return note


def current_audit_note() -> AuditNote | None:
    return _NOTE.get()
