"""Stage 3: the user credential a call carries, if any, and the roles it gives.

A node certificate is a node's whole credential (role ``node``). A client certificate
alone is a device (role ``device``: sign up, log in, health). With an access token
(``authorization: Bearer <jwt>``) or an API key (``x-api-key: npk_...``, or as the bearer
value) the call acts for that user with the user's current roles; an API key only with
the roles it was scoped to that the user still holds.

The common case costs dictionary lookups: verified tokens, users and API keys are cached
in memory and forgotten when a change is announced (see :mod:`nodepool.auth.events`).
Only a miss awaits the database.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from nodepool.auth.apikeys import MalformedApiKey, looks_like_api_key, parse_api_key, secret_matches
from nodepool.auth.call import Call
from nodepool.auth.events import CREDENTIAL_EVENTS, AuthEvent, AuthEvents
from nodepool.auth.principal import Credential, PeerKind, Principal
from nodepool.auth.rules import Access
from nodepool.auth.tokens import AccessClaims, InvalidToken, TokenVerifier
from nodepool.errors import PermissionDeniedError, UnauthenticatedError, UnavailableError
from nodepool.store import ApiKeyRecord

__all__ = [
    "DEVICE_ROLE",
    "ApiKeyDirectory",
    "CredentialResolver",
    "SessionDenyList",
    "UserDirectory",
    "UserSnapshot",
]

DEVICE_ROLE = "device"
NODE_ROLE = "node"
_NODE_ROLES = frozenset({NODE_ROLE})
_DEVICE_ROLES = frozenset({DEVICE_ROLE})
_INVALID = "invalid or expired credential"
# Cached users, keys and admissions are re-read at least this often even when no change
# is announced, so a lost announcement cannot keep a revoked credential alive for long.
# The bound is on what a call is admitted with, end to end: an admission lasts no longer
# than the cached user (and key) it was made from, so the caches do not stack.
_ADMITTED_SECONDS = 10.0
# Wide enough to cover several missed polls.
_SESSION_POLL_WINDOW = timedelta(seconds=30)
_MAX_ADMITTED = 100_000

K = TypeVar("K")
V = TypeVar("V")


class _TtlCache(Generic[K, V]):
    """A small bounded map whose entries go stale after ``ttl`` seconds."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        # Bumped by every forget/clear. A value loaded while a change was announced may be
        # the old one; it is returned to its caller but not kept.
        self.generation = 0

    def get(self, key: K) -> tuple[bool, V | None]:
        entry = self._entries.get(key)
        if entry is None or entry[0] < self._clock():
            return False, None
        return True, entry[1]

    def remaining(self, key: K) -> float:
        """Seconds until ``key``'s entry must be re-read; 0 when there is none."""
        entry = self._entries.get(key)
        return 0.0 if entry is None else max(0.0, entry[0] - self._clock())

    def put(self, key: K, value: V, loaded_at_generation: int) -> None:
        if loaded_at_generation != self.generation:
            return
        self._entries[key] = (self._clock() + self._ttl, value)
        self._entries.move_to_end(key)
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def forget(self, key: K) -> None:
        self.generation += 1
        self._entries.pop(key, None)

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()


@dataclass(frozen=True, slots=True)
class UserSnapshot:
    username: str
    roles: frozenset[str]
    is_active: bool


class UserDirectory:
    """Users' roles and active flags, cached; a role change is announced and forgotten."""

    def __init__(
        self,
        load: Callable[[str], Awaitable[UserSnapshot | None]],
        *,
        ttl: float = _ADMITTED_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._cache: _TtlCache[str, UserSnapshot | None] = _TtlCache(ttl, 100_000, clock)

    def cached(self, username: str) -> tuple[bool, UserSnapshot | None]:
        return self._cache.get(username.lower())

    async def get(self, username: str) -> UserSnapshot | None:
        found, user = self.cached(username)
        if not found:
            generation = self._cache.generation
            user = await self._load(username)
            self._cache.put(username.lower(), user, generation)
        return user

    def fresh_for(self, username: str) -> float:
        """Seconds the cached entry of ``username`` may still be trusted (0: none)."""
        return self._cache.remaining(username.lower())

    def forget(self, username: str) -> None:
        self._cache.forget(username.lower())

    async def resync(self) -> None:
        self._cache.clear()


class ApiKeyDirectory:
    """API key records by lookup id, cached briefly; revocation is announced and forgotten."""

    def __init__(
        self,
        load: Callable[[str], Awaitable[ApiKeyRecord | None]],
        touch: Callable[[dict[str, datetime]], Awaitable[None]],
        *,
        ttl: float = _ADMITTED_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._touch = touch
        self._cache: _TtlCache[str, ApiKeyRecord | None] = _TtlCache(ttl, 100_000, clock)
        self._last_used: dict[str, datetime] = {}

    def cached(self, lookup_id: str) -> tuple[bool, ApiKeyRecord | None]:
        return self._cache.get(lookup_id)

    async def get(self, lookup_id: str) -> ApiKeyRecord | None:
        found, record = self._cache.get(lookup_id)
        if not found:
            generation = self._cache.generation
            record = await self._load(lookup_id)
            self._cache.put(lookup_id, record, generation)
        return record

    def fresh_for(self, lookup_id: str) -> float:
        """Seconds the cached record of ``lookup_id`` may still be trusted (0: none)."""
        return self._cache.remaining(lookup_id)

    def used(self, lookup_id: str) -> None:
        # Written behind in batches: a key used on every call costs no write per call.
        self._last_used[lookup_id] = datetime.now(UTC)

    async def flush_last_used(self) -> None:
        if self._last_used:
            batch, self._last_used = self._last_used, {}
            try:
                await self._touch(batch)
            except Exception:
                # Keep the times for the next flush; newer uses win.
                self._last_used = batch | self._last_used
                raise

    def forget(self, lookup_id: str) -> None:
        self._cache.forget(lookup_id)

    async def resync(self) -> None:
        self._cache.clear()


class SessionDenyList:
    """Sessions ended (logout, refresh-token reuse, password change, deactivation).

    An access token names its session; the token is refused once the session is here.
    Entries are kept as long as an access token issued before the revocation can live.
    """

    def __init__(
        self,
        load_revoked_since: Callable[[datetime], Awaitable[Iterable[str]]],
        *,
        keep_for: timedelta,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load_revoked_since
        self._keep_for = keep_for
        self._clock = clock
        self._revoked: dict[str, float] = {}

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._revoked

    def add(self, session_id: str) -> bool:
        """Records a revoked session; True when it was not known yet."""
        known = session_id in self._revoked
        self._revoked[session_id] = self._clock() + self._keep_for.total_seconds()
        if len(self._revoked) % 1024 == 0:
            self._expire()
        return not known

    async def resync(self) -> None:
        for session_id in await self._load(datetime.now(UTC) - self._keep_for):
            self.add(session_id)
        self._expire()

    async def load_recent(self, window: timedelta) -> bool:
        """Adds sessions revoked in the last ``window``; True when any was new.

        The backstop for a lost announcement (a publisher that died between its commit
        and its publish): every revocation is in the database, and this reads it.
        """
        added = False
        for session_id in await self._load(datetime.now(UTC) - window):
            added = self.add(session_id) or added
        return added

    def _expire(self) -> None:
        now = self._clock()
        for session_id in [sid for sid, until in self._revoked.items() if until < now]:
            del self._revoked[session_id]


class CredentialResolver:
    """The credential stage. Returns None when settled from memory, else an awaitable."""

    def __init__(
        self,
        *,
        tokens: TokenVerifier,
        sessions: SessionDenyList,
        users: UserDirectory,
        api_keys: ApiKeyDirectory,
        events: AuthEvents,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._tokens = tokens
        self._sessions = sessions
        self._users = users
        self._api_keys = api_keys
        self._events = events
        # (credential, certificate serial) -> (principal, valid until, API key id): a
        # repeated call with the same credential over the same certificate is one lookup.
        # Any announced change empties it, so it never outlives a revocation.
        self._admitted: dict[tuple[str, int], tuple[Principal, float, str | None]] = {}
        self._generation = 0
        events.on(AuthEvent.SESSION_REVOKED, sessions.add)
        events.on(AuthEvent.USER_CHANGED, users.forget)
        events.on(AuthEvent.API_KEY_REVOKED, api_keys.forget)
        for kind in CREDENTIAL_EVENTS:
            events.on(kind, self._forget_admitted)
        events.on_resync(sessions.resync)
        events.on_resync(users.resync)
        events.on_resync(api_keys.resync)
        events.on_resync(self._resync_admitted)

    def _forget_admitted(self, _subject: str) -> None:
        self._generation += 1
        self._admitted.clear()

    async def _resync_admitted(self) -> None:
        self._forget_admitted("")

    async def poll_revoked_sessions(self) -> None:
        """Reads recent session revocations from the database (run about once a second)."""
        if await self._sessions.load_recent(_SESSION_POLL_WINDOW):
            self._forget_admitted("")

    def __call__(self, call: Call) -> Awaitable[None] | None:
        peer = call.peer
        assert peer is not None, "the identity stage runs first"
        credential = _find_credential(call.context.invocation_metadata())
        if credential is None:
            if peer.kind is PeerKind.NODE:
                call.principal = Principal(peer=peer, roles=_NODE_ROLES)
                return None
            if call.rule.access is Access.USER:
                raise UnauthenticatedError("authentication required")
            call.principal = Principal(peer=peer, roles=_DEVICE_ROLES)
            return None
        if peer.kind is not PeerKind.CLIENT:
            raise PermissionDeniedError(
                "user credentials are accepted only with a client certificate"
            )
        if not self._events.healthy:
            raise UnavailableError("credential status cannot be verified right now")
        admitted = self._admitted.get((credential, peer.serial))
        if admitted is not None and admitted[1] > self._clock():
            call.principal = admitted[0]
            if admitted[2] is not None:
                self._api_keys.used(admitted[2])
            return None
        if looks_like_api_key(credential):
            return self._with_api_key(call, credential)
        try:
            claims = self._tokens.verify_access(credential)
        except InvalidToken:
            raise UnauthenticatedError(_INVALID) from None
        if claims.session_id in self._sessions:
            raise UnauthenticatedError(_INVALID)
        if claims.device != peer.spiffe_id:
            # Issued through another device's certificate: a copied token.
            raise UnauthenticatedError(_INVALID)
        found, user = self._users.cached(claims.username)
        if found:
            self._admit_user(
                call,
                credential,
                user,
                Credential.ACCESS_TOKEN,
                claims.expires_at,
                session_id=claims.session_id,
            )
            return None
        return self._admit_loaded_user(call, credential, claims.username, claims)

    async def _admit_loaded_user(
        self, call: Call, credential: str, username: str, claims: AccessClaims
    ) -> None:
        generation = self._generation
        user = await self._users.get(username)
        self._admit_user(
            call,
            credential,
            user,
            Credential.ACCESS_TOKEN,
            claims.expires_at,
            session_id=claims.session_id,
            generation=generation,
        )

    def _admit_user(
        self,
        call: Call,
        credential_text: str,
        user: UserSnapshot | None,
        credential: Credential,
        expires_at: float,
        *,
        scopes: frozenset[str] | None = None,
        session_id: str | None = None,
        api_key_id: str | None = None,
        generation: int | None = None,
    ) -> None:
        if user is None or not user.is_active:
            raise UnauthenticatedError(_INVALID)
        assert call.peer is not None
        # Measured before anything else can run: the admission may not outlive the
        # cached facts it was made from.
        fresh_for = self._users.fresh_for(user.username)
        if api_key_id is not None:
            fresh_for = min(fresh_for, self._api_keys.fresh_for(api_key_id))
        roles = user.roles if scopes is None else user.roles & scopes
        principal = Principal(
            peer=call.peer,
            credential=credential,
            username=user.username,
            roles=roles,
            session_id=session_id,
        )
        call.principal = principal
        # Kept only if no change was announced while the user was being loaded.
        if generation is None or generation == self._generation:
            if len(self._admitted) >= _MAX_ADMITTED:
                self._admitted.clear()
            now = self._clock()
            valid_until = min(expires_at, now + _ADMITTED_SECONDS, now + fresh_for)
            self._admitted[(credential_text, call.peer.serial)] = (
                principal,
                valid_until,
                api_key_id,
            )

    async def _with_api_key(self, call: Call, text: str) -> None:
        try:
            parsed = parse_api_key(text)
        except MalformedApiKey:
            raise UnauthenticatedError(_INVALID) from None
        generation = self._generation
        record = await self._api_keys.get(parsed.lookup_id)
        if (
            record is None
            or not secret_matches(parsed.secret, record.secret_hash)
            or record.revoked_at is not None
            or (record.expires_at is not None and record.expires_at <= datetime.now(UTC))
        ):
            raise UnauthenticatedError(_INVALID)
        assert call.peer is not None  # the identity stage ran first
        if record.bound_device is not None and record.bound_device != call.peer.spiffe_id:
            # A key bound to one device, presented through another certificate.
            raise UnauthenticatedError(_INVALID)
        user = await self._users.get(record.owner)
        self._admit_user(
            call,
            text,
            user,
            Credential.API_KEY,
            record.expires_at.timestamp() if record.expires_at else float("inf"),
            scopes=frozenset(record.scopes),
            api_key_id=record.lookup_id,
            generation=generation,
        )
        self._api_keys.used(record.lookup_id)


def _find_credential(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise UnauthenticatedError("authorization must be 'Bearer <token>'")
            return token.strip()
        if key == "x-api-key" and isinstance(value, str):
            return value.strip()
    return None
