"""Domain errors: the one catalog of what can go wrong, in plain Python.

The domain raises these; the server boundary (``nodepool.status``) maps each
kind to one gRPC status code. ``public_message`` is safe to show a caller: it never
carries internals (SQL, paths, exception text) or whether a username exists.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExistsError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NodePoolError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
]


class NodePoolError(Exception):
    """Base of every error that crosses the service boundary with a public message."""

    default_message = "request failed"

    def __init__(self, public_message: str | None = None) -> None:
        self.public_message = public_message or self.default_message
        super().__init__(self.public_message)


class InvalidArgumentError(NodePoolError):
    default_message = "invalid request"


class UnauthenticatedError(NodePoolError):
    default_message = "authentication required"


class PermissionDeniedError(NodePoolError):
    default_message = "permission denied"


class NotFoundError(NodePoolError):
    default_message = "not found"


class AlreadyExistsError(NodePoolError):
    default_message = "already exists"


class ResourceExhaustedError(NodePoolError):
    default_message = "limit reached"


class FailedPreconditionError(NodePoolError):
    default_message = "not allowed in the current state"


class UnavailableError(NodePoolError):
    default_message = "service temporarily unavailable"
