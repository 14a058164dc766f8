"""Accounts: registration, login, sessions, profiles, roles and API keys.

Plain Python over the store and the cache; the servicer translates. Every rule about who
may do what to which account lives here or in the Casbin policy, never in a servicer.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NoReturn, ParamSpec, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nodepool.auditnote import audit_note
from nodepool.auth.apikeys import generate_api_key
from nodepool.auth.events import AuthEvent, AuthEvents
from nodepool.auth.passwords import (
    PasswordHasher,
    check_signup_username,
    validate_email,
    validate_password,
    validate_username,
)
from nodepool.auth.principal import Credential, Principal
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
_INVALID_CREDENTIAL = "invalid or expired credential"
_LAST_ADMIN = "the last active administrator cannot be removed"
_MAX_FIELD = 1024
# Certificate names as nodepool-pki issues them (pki/identity.py).
_DEVICE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# Profiles read by GetUserInfo are kept this long at most; every change is announced and
# forgets them at once, so this only bounds a lost announcement (as for credentials).
_PROFILE_SECONDS = 10.0
_MAX_PROFILES = 100_000


@dataclass(frozen=True, slots=True)
class LoginPolicy:
    """Login throttles. A "device" is a client certificate identity (our CA issued it).

    ``max_failures`` failed logins for one account from one device lock that pair for
    ``lockout``; ``device_max_failures`` failures from one device over any accounts lock
    the device. Failures for an account from every device together never refuse
    anyone: past ``max_failures`` they only slow that account's logins down (a pause
    that doubles up to ``max_slowdown``), so an attacker cannot lock the owner out.
    """

    max_failures: int = 5
    lockout: timedelta = timedelta(minutes=15)
    attempts_per_user_per_minute: int = 10
    attempts_per_peer_per_minute: int = 30
    registrations_per_peer_per_minute: int = 10
    device_max_failures: int = 50
    max_slowdown: float = 4.0
    # How long a refresh retried from the same device (its reply was lost) gets the same
    # new pair back instead of ending the session as a reused token.
    refresh_reuse_interval: float = 5.0
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


def _reuse_slot(token: str) -> str:
    return "refresh:reuse:" + hashlib.sha256(b"slot\0" + token.encode()).hexdigest()


def _reuse_key(token: str) -> bytes:
    # Domain-separated from the slot name, so the name does not give the key away.
    return hashlib.sha256(b"key\0" + token.encode()).digest()


def _device_identity(actor: Principal, device: str) -> str:
    """``device`` when it names a client certificate of the caller's trust domain."""
    domain = actor.peer.spiffe_id.split("/")[2] if actor.peer.spiffe_id.count("/") >= 3 else ""
    prefix = f"spiffe://{domain}/client/"
    name = device[len(prefix) :] if device.startswith(prefix) else ""
    if not domain or not _DEVICE_NAME.fullmatch(name):
        raise InvalidArgumentError(
            "bound_device must be the identity of a client certificate from this pool's CA"
        )
    return device


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
        check_signup_username(_bounded(username, "username"))

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

    async def login(self, username: str, password: str, peer_host: str, device: str) -> Session:
        """``device`` is the caller's certificate identity; the session is bound to it."""
        if not username or not password:
            raise InvalidArgumentError("username and password are required")
        _bounded(username, "username", 64)
        _bounded(password, "password")
        # Counters and locks are keyed by the canonical name. A name no account could
        # have (outside the username rules, e.g. a long s, U+017F, for an "s", which the
        # database's case folding would match to the plain name) fails under its own key.
        try:
            key: str | None = validate_username(username)
        except InvalidArgumentError:
            key = None
        account = key or username.casefold()
        # The audit entry of this call is filed under the account it was aimed at, so an
        # administrator listing that user's events sees the attacks on it.
        note = audit_note()
        note.subject = account
        policy = self._login
        await self._throttle(f"login:peer:{peer_host}", policy.attempts_per_peer_per_minute)
        await self._throttle(f"login:device:{device}", policy.attempts_per_peer_per_minute)
        await self._throttle(f"login:user:{account}:{device}", policy.attempts_per_user_per_minute)
        # Locks are per device (for one account, or for all when a device guesses across
        # many) and kept for existing and unknown names alike, so being locked out says
        # nothing about whether the account exists. No lock covers a device that has not
        # failed: the owner's own device always gets to try.
        for lock in (f"login:locked:{account}:{device}", f"login:device-locked:{device}"):
            if await self._cache.get(lock) is not None:
                note.denied = True
                note.detail["reason"] = "locked"
                raise ResourceExhaustedError("too many failed logins; try again later")
        # Failures from every device together only slow the account down.
        account_failures = await self._cache.get(f"login:account-failures:{account}")
        excess = int(account_failures or b"0") - policy.max_failures
        if excess >= 0:
            await asyncio.sleep(min(policy.max_slowdown, 0.25 * 2 ** min(excess, 16)))

        user: UserRecord | None = None
        if key is not None:
            try:
                user = await self._db(self._store.get_user, key)
            except NotFound:
                user = None
        if user is None:
            await self._hashing(self._hasher.dummy_verify, password)
            await self._failed_login(account, device)
        if not await self._hashing(self._hasher.verify, user.password_hash, password):
            await self._failed_login(account, device)
        if not user.is_active:
            # Same answer as a wrong password: a disabled account is not confirmed.
            raise UnauthenticatedError(_LOGIN_FAILED)

        # The owner is back on this device: its count starts again. The count for the
        # account keeps running to its window's end (someone else may still be guessing).
        await self._cache.reset(f"login:failures:{account}:{device}")
        await self._db(self._store.record_login_success, user.username)
        await self._events.publish(AuthEvent.PROFILE_CHANGED, user.username)
        if self._hasher.needs_rehash(user.password_hash):
            new_hash = await self._hashing(self._hasher.hash, password)
            await self._db(self._store.update_user_fields, user.username, password_hash=new_hash)
        return await self._new_session(user.username, device)

    async def _throttle(self, key: str, per_minute: int) -> None:
        if await self._cache.hit(key, 60) > per_minute:
            audit_note().denied = True
            audit_note().detail["reason"] = "throttled"
            raise ResourceExhaustedError("too many login attempts; try again later")

    async def _failed_login(self, account: str, device: str) -> NoReturn:
        # Failures and locks live only in the cache, keyed by the name as typed: the same
        # work and the same answers for existing and unknown names, so neither the reply
        # nor its timing says which names exist. (With Redis they also outlive a restart
        # and are shared by every instance.)
        policy = self._login
        window = policy.lockout.total_seconds()
        if await self._cache.hit(f"login:failures:{account}:{device}", window) >= (
            policy.max_failures
        ):
            await self._cache.set(f"login:locked:{account}:{device}", b"1", ttl=window)
        if await self._cache.hit(f"login:device-failures:{device}", window) >= (
            policy.device_max_failures
        ):
            await self._cache.set(f"login:device-locked:{device}", b"1", ttl=window)
        failures = await self._cache.hit(f"login:account-failures:{account}", window)
        # A plain value beside the counter, so a login can read it without counting.
        await self._cache.set(
            f"login:account-failures:{account}", str(failures).encode(), ttl=window
        )
        raise UnauthenticatedError(_LOGIN_FAILED)

    async def _new_session(self, username: str, device: str) -> Session:
        session_id = secrets.token_hex(16)
        refresh = self._issuer.issue_refresh(username, session_id, device=device)
        await self._db(
            self._store.create_session,
            session_id=session_id,
            owner=username,
            token_hash=_token_hash(refresh.token),
            expires_at=refresh.expires_at,
        )
        access = self._issuer.issue_access(username, session_id, device=device)
        return Session(username, access.token, access.expires_at, refresh.token, refresh.expires_at)

    # -- sessions -----------------------------------------------------------------------

    async def refresh(self, refresh_token: str, device: str) -> Session:
        """A new pair for a refresh token presented through its own device, once.

        Presented through another device, or again after the reuse interval, the token
        was copied: the whole session ends. Again within the interval and from the same
        device, the caller lost our reply and gets the same new pair back.
        """
        try:
            claims = self._verifier.verify_refresh(_bounded(refresh_token, "refresh_token", 8192))
        except InvalidToken:
            raise UnauthenticatedError(_INVALID_CREDENTIAL) from None
        if claims.device != device:
            await self._end_session(claims.session_id, "refresh token used by another device")
            raise UnauthenticatedError(_INVALID_CREDENTIAL)
        refresh = self._issuer.issue_refresh(claims.username, claims.session_id, device=device)
        try:
            await self._db(
                self._store.rotate_session,
                claims.session_id,
                old_token_hash=_token_hash(refresh_token),
                new_token_hash=_token_hash(refresh.token),
                expires_at=refresh.expires_at,
            )
        except Conflict:
            retried = await self._rotation_replay(refresh_token, device)
            if retried is not None:
                return retried
            # A refresh token works once. Seeing one again means it was copied: end the
            # whole session so neither the thief nor the owner can go on with it.
            await self._end_session(claims.session_id, "refresh token reused")
            raise UnauthenticatedError(_INVALID_CREDENTIAL) from None
        except NotFound:
            raise UnauthenticatedError(_INVALID_CREDENTIAL) from None
        user = await self._active_user(claims.username)
        access = self._issuer.issue_access(user.username, claims.session_id, device=device)
        session = Session(
            user.username, access.token, access.expires_at, refresh.token, refresh.expires_at
        )
        await self._remember_rotation(refresh_token, device, session)
        return session

    async def _remember_rotation(self, old_token: str, device: str, session: Session) -> None:
        """Keeps the new pair for the reuse interval, readable only with the old token.

        The cache holds it encrypted (AES-GCM) under a key derived from the old refresh
        token, which the cache never sees, and bound to the device as associated data:
        reading the cache gives no usable token, and another device cannot replay it.
        """
        interval = self._login.refresh_reuse_interval
        if interval <= 0:
            return
        plain = json.dumps(
            [
                session.username,
                session.access_token,
                session.access_expires_at.timestamp(),
                session.refresh_token,
                session.refresh_expires_at.timestamp(),
            ]
        ).encode()
        nonce = secrets.token_bytes(12)
        sealed = AESGCM(_reuse_key(old_token)).encrypt(nonce, plain, device.encode())
        await self._cache.set(_reuse_slot(old_token), nonce + sealed, ttl=interval)

    async def _rotation_replay(self, old_token: str, device: str) -> Session | None:
        sealed = await self._cache.get(_reuse_slot(old_token))
        if sealed is None:
            return None
        try:
            plain = AESGCM(_reuse_key(old_token)).decrypt(sealed[:12], sealed[12:], device.encode())
            username, access, access_exp, refresh, refresh_exp = json.loads(plain)
        except (InvalidTag, ValueError, TypeError):
            return None
        return Session(
            username,
            access,
            datetime.fromtimestamp(access_exp, tz=UTC),
            refresh,
            datetime.fromtimestamp(refresh_exp, tz=UTC),
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
        keep_api_keys: bool = False,
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
            await self._end_api_keys_of(user.username, keep_api_keys)
        return updated

    async def _end_api_keys_of(self, username: str, keep: bool) -> None:
        """Revokes a user's API keys after a password change or a deactivation.

        Keys made while an attacker held the password would survive the change; unless
        told to keep them, they go. Keeping them is noted in the call's audit entry.
        """
        if keep:
            audit_note().detail["api_keys"] = "kept"
            return
        revoked = await self._db(self._store.revoke_api_keys_of_user, username)
        for lookup_id in revoked:
            await self._events.publish(AuthEvent.API_KEY_REVOKED, lookup_id)
        if revoked:
            audit_note().detail["api_keys"] = f"revoked {len(revoked)}"

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
            # One transaction that counts the administrators left under a lock.
            user = await self._db(
                self._store.remove_role, username, role, keep_an_admin=role == ADMIN
            )
        except NotFound:
            raise NotFoundError("no such user") from None
        except Conflict:
            raise FailedPreconditionError(_LAST_ADMIN) from None
        await self._events.publish(AuthEvent.USER_CHANGED, user.username)
        return user

    def _grantable(self, actor: Principal, role: str) -> str:
        if role not in ACCOUNT_ROLES:
            raise InvalidArgumentError(f"role must be one of: {', '.join(sorted(ACCOUNT_ROLES))}")
        if role not in actor.roles:
            raise PermissionDeniedError("you cannot grant or revoke a role you do not hold")
        return role

    async def set_active(
        self, actor: Principal, username: str, active: bool, *, keep_api_keys: bool = False
    ) -> UserRecord:
        assert actor.username is not None
        username = _bounded(username, "username", 64)
        if not active and username.casefold() == actor.username.casefold():
            raise FailedPreconditionError("you cannot deactivate your own account")
        try:
            user = await self._db(
                self._store.update_user_fields,
                username,
                is_active=active,
                keep_an_admin=not active,
            )
        except NotFound:
            raise NotFoundError("no such user") from None
        except Conflict:
            raise FailedPreconditionError(_LAST_ADMIN) from None
        if not active:
            await self._end_sessions_of(user.username, "account deactivated")
            await self._end_api_keys_of(user.username, keep_api_keys)
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
        bound_device: str = "",
    ) -> tuple[ApiKeyRecord, str]:
        # Only a person in an interactive session makes keys. A key that could mint keys
        # would let a short-lived or soon-revoked key outlive itself in a longer one.
        if actor.credential is not Credential.ACCESS_TOKEN:
            raise PermissionDeniedError("creating an API key needs a login session")
        device = _device_identity(actor, bound_device) if bound_device else None
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
            bound_device=device,
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
