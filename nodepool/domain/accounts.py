"""Accounts: registration, login, sessions, profiles, roles and API keys.

Plain Python over the store and the cache; the servicer translates. Every rule about who
may do what to which account lives here or in the Casbin policy, never in a servicer.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NoReturn, ParamSpec, TypeVar

from nodepool.auth.apikeys import generate_api_key
from nodepool.auth.events import AuthEvent, AuthEvents
from nodepool.auth.passwords import (
    PasswordHasher,
    validate_email,
    validate_password,
    validate_username,
)
from nodepool.auth.principal import Principal
from nodepool.auth.tokens import InvalidToken, TokenIssuer, TokenVerifier
from nodepool.cache import Cache
from nodepool.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from nodepool.store import (
    UNSET,
    AlreadyExists,
    ApiKeyRecord,
    Conflict,
    NotFound,
    Store,
    StoreCalls,
    StoreUnavailable,
    Unset,
    UserRecord,
)

__all__ = ["ADMIN", "USER", "Accounts", "LoginPolicy", "Session", "register_account"]

P = ParamSpec("P")
R = TypeVar("R")

ADMIN = "admin"
USER = "user"
# Roles a person's account may hold; "node" belongs to node certificates, not people.
ACCOUNT_ROLES = frozenset({ADMIN, USER})
API_KEY_SCOPES = ACCOUNT_ROLES

_LOGIN_FAILED = "invalid username or password"
_MAX_FIELD = 1024
# Profiles read by GetUserInfo are kept this long at most; every change is announced and
# forgets them at once, so this only bounds a lost announcement (as for credentials).
_PROFILE_SECONDS = 10.0
_MAX_PROFILES = 100_000


@dataclass(frozen=True, slots=True)
class LoginPolicy:
    max_failures: int = 5
    lockout: timedelta = timedelta(minutes=15)
    attempts_per_user_per_minute: int = 10
    attempts_per_peer_per_minute: int = 30
    registrations_per_peer_per_minute: int = 10
    # Password hashes computed at once; keep it below the server's worker threads.
    concurrent_hashes: int = 2


@dataclass(frozen=True, slots=True)
class Session:
    username: str
    access_token: str
    access_expires_at: datetime
    refresh_token: str
    refresh_expires_at: datetime


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _bounded(value: str, field: str, limit: int = _MAX_FIELD) -> str:
    if len(value) > limit:
        raise InvalidArgumentError(f"{field} is too long")
    return value


async def register_account(
    store: Store,
    hash_password: Callable[[str], Awaitable[str]],
    username: str,
    password: str,
    email: str,
    roles: Sequence[str] = (USER,),
    *,
    store_calls: StoreCalls | None = None,
) -> UserRecord:
    """A new account after every rule on names and passwords.

    Remote sign-up always gets ``("user",)``; administrators are made on the server host
    (``nodepool user create-admin``), never by a remote registration. The server passes its
    ``store_calls``; a local command, with no other work waiting, runs it in a thread.
    """
    username = validate_username(_bounded(username, "username"))
    validate_password(_bounded(password, "password"), username=username)
    email = validate_email(_bounded(email, "email"))
    password_hash = await hash_password(password)
    create = functools.partial(
        store.create_user, username, password_hash, email=email or None, roles=tuple(roles)
    )
    try:
        if store_calls is None:
            return await asyncio.to_thread(create)
        return await store_calls(create)
    except AlreadyExists:
        raise AlreadyExistsError("that username is taken") from None
    except StoreUnavailable:
        raise UnavailableError() from None


class Accounts:
    def __init__(
        self,
        store: Store,
        cache: Cache,
        events: AuthEvents,
        *,
        store_calls: StoreCalls,
        hash_executor: Executor,
        hasher: PasswordHasher,
        issuer: TokenIssuer,
        verifier: TokenVerifier,
        login_policy: LoginPolicy = LoginPolicy(),
        api_key_ttl: timedelta = timedelta(days=90),
        api_key_max_ttl: timedelta = timedelta(days=365),
    ) -> None:
        self._store = store
        # Store work runs on the server's bounded store threads; password hashes on
        # threads of their own, so neither can hold up the other.
        self._calls = store_calls
        self._hash_executor = hash_executor
        self._cache = cache
        self._events = events
        self._hasher = hasher
        self._issuer = issuer
        self._verifier = verifier
        self._login = login_policy
        self._api_key_ttl = api_key_ttl
        self._api_key_max_ttl = api_key_max_ttl
        self._hash_slots = asyncio.Semaphore(login_policy.concurrent_hashes)
        self._profiles = _ProfileCache()
        events.on(AuthEvent.USER_CHANGED, self._profiles.forget)
        events.on(AuthEvent.PROFILE_CHANGED, self._profiles.forget)
        events.on_resync(self._profiles.clear)

    async def _db(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await self._calls(function, *args, **kwargs)
        except StoreUnavailable:
            raise UnavailableError() from None

    # -- registration and login -----------------------------------------------------------

    async def register(
        self, username: str, password: str, email: str, peer_host: str
    ) -> UserRecord:
        # Sign-up says when a name is taken (it must) and costs a password hash, so it is
        # rate limited per address like login.
        if await self._cache.hit(f"register:peer:{peer_host}", 60) > (
            self._login.registrations_per_peer_per_minute
        ):
            raise ResourceExhaustedError("too many sign-ups; try again later")

        async def hash_password(password: str) -> str:
            return await self._hashing(self._hasher.hash, password)

        return await register_account(
            self._store, hash_password, username, password, email, store_calls=self._calls
        )

    async def _hashing(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """argon2 work, a few at a time: it takes 64 MiB and a core for ~0.1 s each, and
        must never occupy every worker thread the rest of the server needs."""
        async with self._hash_slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._hash_executor, functools.partial(function, *args, **kwargs)
            )

    async def login(self, username: str, password: str, peer_host: str) -> Session:
        if not username or not password:
            raise InvalidArgumentError("username and password are required")
        _bounded(username, "username", 64)
        _bounded(password, "password")
        # Counters and the lock are keyed by the canonical name. A name no account could
        # have (outside the username rules, e.g. a long s, U+017F, for an "s", which the
        # database's case folding would match to the plain name) fails under its own key.
        try:
            key: str | None = validate_username(username)
        except InvalidArgumentError:
            key = None
        counter_key = key or username.casefold()
        if await self._cache.hit(f"login:peer:{peer_host}", 60) > (
            self._login.attempts_per_peer_per_minute
        ):
            raise ResourceExhaustedError("too many login attempts; try again later")
        if await self._cache.hit(f"login:user:{counter_key}", 60) > (
            self._login.attempts_per_user_per_minute
        ):
            raise ResourceExhaustedError("too many login attempts; try again later")
        # The lock is kept in the cache for existing and unknown names alike, so being
        # locked out says nothing about whether the account exists.
        if await self._cache.get(f"login:locked:{counter_key}") is not None:
            raise ResourceExhaustedError("too many failed logins; try again later")

        user: UserRecord | None = None
        if key is not None:
            try:
                user = await self._db(self._store.get_user, key)
            except NotFound:
                user = None
        if user is None:
            await self._hashing(self._hasher.dummy_verify, password)
            await self._failed_login(counter_key)
        if not await self._hashing(self._hasher.verify, user.password_hash, password):
            await self._failed_login(counter_key)
        if not user.is_active:
            # Same answer as a wrong password: a disabled account is not confirmed.
            raise UnauthenticatedError(_LOGIN_FAILED)

        await self._cache.delete(f"login:failures:{key}")
        await self._db(self._store.record_login_success, user.username)
        await self._events.publish(AuthEvent.PROFILE_CHANGED, user.username)
        if self._hasher.needs_rehash(user.password_hash):
            new_hash = await self._hashing(self._hasher.hash, password)
            await self._db(self._store.update_user_fields, user.username, password_hash=new_hash)
        return await self._new_session(user.username)

    async def _failed_login(self, key: str) -> NoReturn:
        # Failures and the lock live only in the cache, keyed by the name as typed: the
        # same work and the same answers for existing and unknown names, so neither the
        # reply nor its timing says which names exist. (With Redis they also outlive a
        # restart and are shared by every instance.)
        window = self._login.lockout.total_seconds()
        failures = await self._cache.hit(f"login:failures:{key}", window)
        if failures >= self._login.max_failures:
            await self._cache.set(f"login:locked:{key}", b"1", ttl=window)
        raise UnauthenticatedError(_LOGIN_FAILED)

    async def _new_session(self, username: str) -> Session:
        session_id = secrets.token_hex(16)
        refresh = self._issuer.issue_refresh(username, session_id)
        await self._db(
            self._store.create_session,
            session_id=session_id,
            owner=username,
            token_hash=_token_hash(refresh.token),
            expires_at=refresh.expires_at,
        )
        access = self._issuer.issue_access(username, session_id)
        return Session(username, access.token, access.expires_at, refresh.token, refresh.expires_at)

    # -- sessions -----------------------------------------------------------------------

    async def refresh(self, refresh_token: str) -> Session:
        try:
            claims = self._verifier.verify_refresh(_bounded(refresh_token, "refresh_token", 8192))
        except InvalidToken:
            raise UnauthenticatedError("invalid or expired credential") from None
        refresh = self._issuer.issue_refresh(claims.username, claims.session_id)
        try:
            await self._db(
                self._store.rotate_session,
                claims.session_id,
                old_token_hash=_token_hash(refresh_token),
                new_token_hash=_token_hash(refresh.token),
                expires_at=refresh.expires_at,
            )
        except Conflict:
            # A refresh token works once. Seeing one again means it was copied: end the
            # whole session so neither the thief nor the owner can go on with it.
            await self._end_session(claims.session_id, "refresh token reused")
            raise UnauthenticatedError("invalid or expired credential") from None
        except NotFound:
            raise UnauthenticatedError("invalid or expired credential") from None
        user = await self._active_user(claims.username)
        access = self._issuer.issue_access(user.username, claims.session_id)
        return Session(
            user.username, access.token, access.expires_at, refresh.token, refresh.expires_at
        )

    async def logout(self, actor: Principal) -> None:
        if actor.session_id is None:
            raise FailedPreconditionError("this credential has no session to end")
        await self._end_session(actor.session_id, "logout")

    async def _end_session(self, session_id: str, reason: str) -> None:
        try:
            await self._db(self._store.revoke_session, session_id, reason=reason)
        except NotFound:
            return
        await self._events.publish(AuthEvent.SESSION_REVOKED, session_id)

    async def _end_sessions_of(
        self, username: str, reason: str, except_session_id: str | None = None
    ) -> None:
        ended = await self._db(
            self._store.revoke_sessions_of_user,
            username,
            reason=reason,
            except_session_id=except_session_id,
        )
        for session_id in ended:
            await self._events.publish(AuthEvent.SESSION_REVOKED, session_id)

    async def _active_user(self, username: str) -> UserRecord:
        try:
            user = await self._db(self._store.get_user, username)
        except NotFound:
            raise UnauthenticatedError("invalid or expired credential") from None
        if not user.is_active:
            raise UnauthenticatedError("invalid or expired credential")
        return user

    # -- profiles -----------------------------------------------------------------------

    def _target(self, actor: Principal, username: str) -> str:
        """The account a call is about: the caller's own, or any for an administrator."""
        assert actor.username is not None
        if not username or username.casefold() == actor.username.casefold():
            return actor.username
        if ADMIN not in actor.roles:
            # Same answer whether or not that user exists.
            raise PermissionDeniedError("you may only act on your own account")
        return _bounded(username, "username", 64)

    async def get_user(self, actor: Principal, username: str) -> UserRecord:
        """A profile, from memory when no change was announced since it was read."""
        target = self._target(actor, username)
        cached = self._profiles.get(target)
        if cached is not None:
            return cached
        generation = self._profiles.generation
        try:
            user = await self._db(self._store.get_user, target)
        except NotFound:
            raise NotFoundError("no such user") from None
        self._profiles.put(user, generation)
        return user

    async def update_profile(
        self,
        actor: Principal,
        username: str,
        *,
        email: str | None,
        current_password: str,
        new_password: str,
    ) -> UserRecord:
        target = self._target(actor, username)
        user = await self._fresh_user(target)
        password_hash: str | Unset = UNSET
        if new_password:
            validate_password(_bounded(new_password, "new_password"), username=user.username)
            if target == actor.username:
                # Even with a live session, changing the password needs the old one.
                ok = await self._hashing(
                    self._hasher.verify, user.password_hash, _bounded(current_password, "pw")
                )
                if not ok:
                    raise PermissionDeniedError("current password is wrong")
            password_hash = await self._hashing(self._hasher.hash, new_password)
        email_value = UNSET if email is None else (validate_email(_bounded(email, "email")) or None)
        updated = await self._db(
            self._store.update_user_fields,
            user.username,
            email=email_value,
            password_hash=password_hash,
        )
        await self._events.publish(AuthEvent.PROFILE_CHANGED, updated.username)
        if new_password:
            keep = actor.session_id if target == actor.username else None
            await self._end_sessions_of(user.username, "password changed", keep)
        return updated

    async def _fresh_user(self, username: str) -> UserRecord:
        """The record from the database, for decisions (a password check, scopes)."""
        try:
            return await self._db(self._store.get_user, username)
        except NotFound:
            raise NotFoundError("no such user") from None

    # -- roles and activation (administrators) ---------------------------------------------

    async def grant_role(self, actor: Principal, username: str, role: str) -> UserRecord:
        role = self._grantable(actor, role)
        try:
            user = await self._db(self._store.add_role, _bounded(username, "username", 64), role)
        except NotFound:
            raise NotFoundError("no such user") from None
        await self._events.publish(AuthEvent.USER_CHANGED, user.username)
        return user

    async def revoke_role(self, actor: Principal, username: str, role: str) -> UserRecord:
        role = self._grantable(actor, role)
        username = _bounded(username, "username", 64)
        try:
            user = await self._db(self._store.remove_role, username, role)
        except NotFound:
            raise NotFoundError("no such user") from None
        if role == ADMIN and not await self._an_admin_remains():
            await self._db(self._store.add_role, username, ADMIN)
            self._profiles.forget(username)
            raise FailedPreconditionError("the last active administrator cannot be removed")
        await self._events.publish(AuthEvent.USER_CHANGED, user.username)
        return user

    def _grantable(self, actor: Principal, role: str) -> str:
        if role not in ACCOUNT_ROLES:
            raise InvalidArgumentError(f"role must be one of: {', '.join(sorted(ACCOUNT_ROLES))}")
        if role not in actor.roles:
            raise PermissionDeniedError("you cannot grant or revoke a role you do not hold")
        return role

    async def _an_admin_remains(self) -> bool:
        # Checked after the change, which is undone when none remains: two administrators
        # demoting each other at once both see none left and both undo, so the race can
        # only ever keep an administrator, never lose the last one.
        return any(ADMIN in u.roles and u.is_active for u in await self._all_users())

    async def _all_users(self) -> list[UserRecord]:
        users: list[UserRecord] = []
        cursor: str | None = None
        while True:
            page = await self._db(self._store.list_users, limit=500, cursor=cursor)
            users.extend(page.items)
            if page.next_cursor is None:
                return users
            cursor = page.next_cursor

    async def set_active(self, actor: Principal, username: str, active: bool) -> UserRecord:
        assert actor.username is not None
        username = _bounded(username, "username", 64)
        if not active and username.casefold() == actor.username.casefold():
            raise FailedPreconditionError("you cannot deactivate your own account")
        try:
            user = await self._db(self._store.update_user_fields, username, is_active=active)
        except NotFound:
            raise NotFoundError("no such user") from None
        if not active and not await self._an_admin_remains():
            await self._db(self._store.update_user_fields, username, is_active=True)
            self._profiles.forget(username)
            raise FailedPreconditionError("the last active administrator cannot be removed")
        if not active:
            await self._end_sessions_of(user.username, "account deactivated")
        await self._events.publish(AuthEvent.USER_CHANGED, user.username)
        return user

    # -- API keys -------------------------------------------------------------------------

    async def create_api_key(
        self,
        actor: Principal,
        *,
        owner: str,
        name: str,
        scopes: Sequence[str],
        ttl_days: int,
    ) -> tuple[ApiKeyRecord, str]:
        target = self._target(actor, owner)
        user = await self._fresh_user(target)
        wanted = frozenset(scopes) or frozenset({USER})
        if not wanted <= API_KEY_SCOPES:
            raise InvalidArgumentError("scopes must be roles such as 'user' or 'admin'")
        if not wanted <= user.roles:
            raise PermissionDeniedError("a key cannot have a role its owner does not hold")
        if not wanted <= actor.roles:
            raise PermissionDeniedError("you cannot give a key a role you do not hold")
        # Compared as a number first: a huge value would overflow timedelta.
        if ttl_days > self._api_key_max_ttl.days:
            raise InvalidArgumentError(f"ttl_days must be at most {self._api_key_max_ttl.days}")
        ttl = timedelta(days=ttl_days) if ttl_days else self._api_key_ttl
        generated = generate_api_key()
        record = await self._db(
            self._store.create_api_key,
            owner=user.username,
            lookup_id=generated.lookup_id,
            secret_hash=generated.secret_hash,
            name=_bounded(name, "name", 128),
            scopes=sorted(wanted),
            expires_at=datetime.now(UTC) + ttl,
        )
        return record, generated.key

    async def list_api_keys(self, actor: Principal, owner: str) -> list[ApiKeyRecord]:
        target = self._target(actor, owner)
        return await self._db(self._store.list_api_keys, target)

    async def revoke_api_key(self, actor: Principal, key_id: str) -> ApiKeyRecord:
        owner = None if ADMIN in actor.roles else actor.username
        try:
            record = await self._db(
                self._store.revoke_api_key, _bounded(key_id, "key_id", 64), owner=owner
            )
        except NotFound:
            raise NotFoundError("no such API key") from None
        await self._events.publish(AuthEvent.API_KEY_REVOKED, record.lookup_id)
        return record


class _ProfileCache:
    """Profiles by canonical username, forgotten on every announced change.

    A profile read while a change was announced may be the old one: it is returned to
    its caller but not kept (the generation moved).
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, UserRecord]] = {}
        self.generation = 0

    def get(self, username: str) -> UserRecord | None:
        entry = self._entries.get(username.casefold())
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, user: UserRecord, loaded_at_generation: int) -> None:
        if loaded_at_generation != self.generation:
            return
        if len(self._entries) >= _MAX_PROFILES:
            self._entries.clear()
        self._entries[user.username.casefold()] = (time.monotonic() + _PROFILE_SECONDS, user)

    def forget(self, username: str) -> None:
        self.generation += 1
        self._entries.pop(username.casefold(), None)

    async def clear(self) -> None:
        self.generation += 1
        self._entries.clear()
