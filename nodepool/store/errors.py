"""Store-level errors: plain Python, so the domain layer can map them without the database."""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "Conflict",
    "InvalidArgument",
    "LimitExceeded",
    "NodeRemoved",
    "NotFound",
    "StoreError",
    "StoreUnavailable",
]


class StoreError(Exception):
    """Base of every store error. Messages are safe to log; they never carry SQL."""


class NotFound(StoreError):
    """The record does not exist (or is not visible to the given owner)."""


class AlreadyExists(StoreError):
    """A record with the same unique key already exists."""


class Conflict(StoreError):
    """The record is not in the state the operation requires (a failed compare-and-set)."""


class NodeRemoved(Conflict):
    """The node id was removed and may not register until an admin re-admits it."""


class LimitExceeded(StoreError):
    """A quota checked inside the store's transaction (e.g. nodes per owner) was reached."""


class InvalidArgument(StoreError, ValueError):
    """A malformed argument, such as a cursor that this store did not issue."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or is locked; the operation may be retried."""
