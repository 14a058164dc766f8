"""Builds the credential stage and the accounts domain over one store and cache."""

from __future__ import annotations

import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from nodepool.auth.credentials import (
    ApiKeyDirectory,
    CredentialResolver,
    SessionDenyList,
    UserDirectory,
    UserSnapshot,
)
from nodepool.auth.events import AuthEvents
from nodepool.auth.passwords import PasswordHasher
from nodepool.auth.tokens import (
    SigningKeyError,
    SigningKeys,
    TokenConfig,
    TokenIssuer,
    TokenVerifier,
)
from nodepool.cache import Cache
from nodepool.domain.accounts import Accounts, LoginPolicy
from nodepool.errors import UnavailableError
from nodepool.settings import Settings
from nodepool.store import ApiKeyRecord, NotFound, Store, StoreCalls, StoreUnavailable

__all__ = ["AuthParts", "SigningKeyWatcher", "build_auth", "password_hasher", "token_config"]

_log = logging.getLogger(__name__)


class SigningKeyWatcher:
    """Picks up a rotated key directory without a restart.

    ``nodepool keys rotate`` writes a new key and points ``current`` at it; every instance
    sharing the directory then signs with it and still accepts the older keys.
    """

    def __init__(self, directory: Path, issuer: TokenIssuer, verifier: TokenVerifier) -> None:
        self._directory = directory
        self._issuer = issuer
        self._verifier = verifier
        self._stamp = self._read_stamp()

    def _read_stamp(self) -> tuple[tuple[str, int, int], ...]:
        entries = []
        for path in sorted(self._directory.iterdir()):
            info = path.stat()
            entries.append((path.name, info.st_mtime_ns, info.st_size))
        return tuple(entries)

    def reload_if_changed(self) -> bool:
        stamp = self._read_stamp()
        if stamp == self._stamp:
            return False
        try:
            keys = SigningKeys.load(self._directory)
        except SigningKeyError as exc:
            _log.warning("token signing keys changed but were not loaded: %s", exc)
            return False
        self._stamp = stamp
        self._verifier.use_keys(keys)
        self._issuer.use_keys(keys)
        _log.info("token signing keys reloaded; signing with %s", keys.current_kid)
        return True


@dataclass(frozen=True, slots=True)
class AuthParts:
    credentials: CredentialResolver
    accounts: Accounts
    events: AuthEvents
    api_keys: ApiKeyDirectory
    signing_keys: SigningKeyWatcher


def token_config(settings: Settings) -> TokenConfig:
    return TokenConfig(
        issuer=settings.token_issuer,
        audience=settings.token_audience,
        access_ttl=timedelta(seconds=settings.access_token_ttl),
        refresh_ttl=timedelta(seconds=settings.refresh_token_ttl),
    )


def password_hasher(settings: Settings) -> PasswordHasher:
    return PasswordHasher(
        time_cost=settings.password_hash_time_cost,
        memory_cost=settings.password_hash_memory_kib,
    )


def build_auth(
    settings: Settings,
    store: Store,
    cache: Cache,
    keys: SigningKeys,
    *,
    store_calls: StoreCalls,
    background_calls: StoreCalls,
    hash_executor: Executor,
) -> AuthParts:
    """``store_calls`` serve the call path (credential loads, account work);
    ``background_calls`` the pollers and flushers, so neither can starve the other."""
    config = token_config(settings)
    verifier = TokenVerifier(keys, config)
    issuer = TokenIssuer(keys, config)
    events = AuthEvents(cache)

    async def load_user(username: str) -> UserSnapshot | None:
        try:
            user = await store_calls(store.get_user, username)
        except NotFound:
            return None
        except StoreUnavailable:
            raise UnavailableError("credential status cannot be verified right now") from None
        return UserSnapshot(user.username, user.roles, user.is_active)

    async def load_api_key(lookup_id: str) -> ApiKeyRecord | None:
        try:
            return await store_calls(store.get_api_key_by_lookup_id, lookup_id)
        except NotFound:
            return None
        except StoreUnavailable:
            raise UnavailableError("credential status cannot be verified right now") from None

    async def touch_api_keys(used: dict[str, datetime]) -> None:
        def touch_all() -> None:
            for lookup_id, at in used.items():
                try:
                    store.touch_api_key_last_used(lookup_id, at)
                except NotFound:
                    continue

        await background_calls(touch_all)

    async def revoked_sessions(since: datetime) -> list[str]:
        return await background_calls(store.list_sessions_revoked_since, since)

    api_keys = ApiKeyDirectory(load_api_key, touch_api_keys)
    credentials = CredentialResolver(
        tokens=verifier,
        # An access token lives access_ttl (plus clock leeway) after its session ends.
        sessions=SessionDenyList(
            revoked_sessions, keep_for=config.access_ttl + timedelta(seconds=config.leeway + 60)
        ),
        users=UserDirectory(load_user),
        api_keys=api_keys,
        events=events,
    )
    accounts = Accounts(
        store,
        cache,
        events,
        store_calls=store_calls,
        hash_executor=hash_executor,
        hasher=password_hasher(settings),
        issuer=issuer,
        verifier=verifier,
        login_policy=LoginPolicy(
            max_failures=settings.login_max_failures,
            lockout=timedelta(seconds=settings.login_lockout_seconds),
            attempts_per_user_per_minute=settings.login_attempts_per_user_per_minute,
            attempts_per_peer_per_minute=settings.login_attempts_per_peer_per_minute,
            registrations_per_peer_per_minute=settings.registrations_per_peer_per_minute,
            refresh_reuse_interval=settings.refresh_reuse_seconds,
        ),
    )
    watcher = SigningKeyWatcher(settings.jwt_keys, issuer, verifier)
    return AuthParts(credentials, accounts, events, api_keys, watcher)
