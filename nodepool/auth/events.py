"""Fan-out of credential changes to every server instance.

Logging out, revoking an API key or changing a user's roles happens on one instance; the
others hold caches of sessions, keys and users that must forget the old state within
moments. Each change is published on one cache channel (Redis pub/sub across instances,
in-process without Redis). While the subscription is down, :attr:`AuthEvents.healthy` is
false and the credential stage fails closed; when it comes back every cache is reloaded
before calls pass again. Announcements are the fast path only: revoked sessions are also
read from the database every second, and cached users and keys expire after seconds.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable

from nodepool.cache import Cache, CacheUnavailable

__all__ = ["AUTH_EVENTS_CHANNEL", "CREDENTIAL_EVENTS", "AuthEvent", "AuthEvents"]

_log = logging.getLogger(__name__)

AUTH_EVENTS_CHANNEL = "auth-events"


class AuthEvent(enum.StrEnum):
    SESSION_REVOKED = "session"
    API_KEY_REVOKED = "apikey"
    # Roles or the active flag changed: credentials and profiles are re-read.
    USER_CHANGED = "user"
    # Only what a profile shows changed (e-mail, last login): cached profiles are re-read,
    # credentials are untouched.
    PROFILE_CHANGED = "profile"


# The changes that can take a credential's rights away.
CREDENTIAL_EVENTS = (
    AuthEvent.SESSION_REVOKED,
    AuthEvent.API_KEY_REVOKED,
    AuthEvent.USER_CHANGED,
)


Handler = Callable[[str], object]
Resync = Callable[[], Awaitable[None]]


class AuthEvents:
    def __init__(self, cache: Cache, *, retry_after: float = 1.0) -> None:
        self._cache = cache
        self._retry_after = retry_after
        self._handlers: dict[AuthEvent, list[Handler]] = {kind: [] for kind in AuthEvent}
        self._resyncs: list[Resync] = []
        self.healthy = False

    def on(self, kind: AuthEvent, handler: Handler) -> None:
        self._handlers[kind].append(handler)

    def on_resync(self, resync: Resync) -> None:
        """``resync`` reloads a cache from the database after a gap in the events."""
        self._resyncs.append(resync)

    async def publish(self, kind: AuthEvent, subject: str) -> None:
        # This instance applies its own change at once, whatever the channel does.
        self._dispatch(kind, subject)
        try:
            await self._cache.publish(AUTH_EVENTS_CHANNEL, f"{kind}:{subject}".encode())
        except CacheUnavailable:
            # The change is committed; other instances learn it from the database instead:
            # sessions within a second, users and API keys within their cache lifetime.
            _log.warning("cannot announce a credential change; others will read it later")

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Listens forever, resubscribing (and resyncing) after any failure.

        An outage is logged once when it starts and once when it ends, not at every retry.
        """
        lost = False
        while True:
            try:
                async with self._cache.subscribe(AUTH_EVENTS_CHANNEL) as messages:
                    for resync in self._resyncs:
                        await resync()
                    self.healthy = True
                    if lost:
                        _log.warning("credential change subscription restored")
                        lost = False
                    if ready is not None:
                        ready.set()
                    async for message in messages:
                        self._handle(message)
            except asyncio.CancelledError:
                raise
            except CacheUnavailable:
                if not lost:
                    _log.warning("credential change subscription lost; failing closed")
                lost = True
            except Exception:
                if not lost:
                    _log.exception("credential change subscription lost; failing closed")
                lost = True
            self.healthy = False
            await asyncio.sleep(self._retry_after)

    def _handle(self, message: bytes) -> None:
        kind, _, subject = message.decode(errors="replace").partition(":")
        try:
            event = AuthEvent(kind)
        except ValueError:
            _log.warning("ignoring an unknown credential change %r", kind)
            return
        self._dispatch(event, subject)

    def _dispatch(self, kind: AuthEvent, subject: str) -> None:
        for handler in self._handlers[kind]:
            handler(subject)
