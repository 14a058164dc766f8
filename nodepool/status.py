"""The boundary between domain errors and gRPC status codes.

Below both the servicers and the server, which each translate at their edge.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from nodepool import errors
from nodepool.cache.errors import CacheUnavailable
from nodepool.store.errors import StoreUnavailable

__all__ = ["INTERNAL_MESSAGE", "STATUS_BY_ERROR", "status_for", "translate_errors"]

_log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error"

STATUS_BY_ERROR: dict[type[errors.NodePoolError], grpc.StatusCode] = {
    errors.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
}


def status_for(error: errors.NodePoolError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        code = STATUS_BY_ERROR.get(kind)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


class _OutageLog:
    """One warning when calls start failing for an outage; quiet while it lasts."""

    # Failures further apart than this are taken as separate outages.
    quiet_seconds = 30.0

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def seen(self, what: str) -> None:
        now = time.monotonic()
        last = self._last.get(what)
        self._last[what] = now
        if last is None or now - last > self.quiet_seconds:
            _log.warning("calls answer UNAVAILABLE: the %s cannot be reached", what)


_outages = _OutageLog()


@asynccontextmanager
async def translate_errors(
    context: grpc.aio.ServicerContext[object, object],
) -> AsyncIterator[None]:
    """Turn domain errors into their status; anything unexpected into a bare INTERNAL."""
    try:
        yield
    except errors.NodePoolError as error:
        await context.abort(status_for(error), error.public_message)
    except grpc.aio.AbortError:
        raise
    except (CacheUnavailable, StoreUnavailable) as exc:
        # An outage, not a bug: the caller may retry, and it ends by itself when the
        # service returns. Logged once per outage rather than a traceback per call.
        _outages.seen("cache" if isinstance(exc, CacheUnavailable) else "database")
        unavailable = errors.UnavailableError()
        await context.abort(status_for(unavailable), unavailable.public_message)
    except Exception:
        _log.exception("unexpected error in %s", "servicer")
        await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
