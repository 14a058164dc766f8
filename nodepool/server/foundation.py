"""What every other part of the server stands on, opened at start and closed at stop.

The CA records (revocations, renewal), the store and the threads that call it, the
cache, the policy, the token signing keys and the server's TLS files. Every blocking
call the server makes runs on threads sized here from the settings, whatever the entry
point (``nodepool serve``, a test, a bench): nothing relies on the event loop's default
executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor

from nodepool.auth.authorization import Authorizer, default_policy_dir
from nodepool.auth.revocation import RevocationList, RevocationSource
from nodepool.auth.tokens import SigningKeyError, SigningKeys
from nodepool.cache import Cache, CacheUnavailable, create_cache
from nodepool.server.tls import TlsFiles, TlsReloader
from nodepool.settings import Settings, SettingsError
from nodepool.store import SqlStore, StoreCalls, StoreError, open_store
from pki import CertificateAuthority, CertificateStore, PkiError, read_ca_passphrase

__all__ = ["BACKGROUND_STORE_THREADS", "Foundation", "StartupError"]

# Revocations: a stale list fails every call closed after this long.
REVOCATION_MAX_STALENESS = 5.0
# Threads (and connections) for background store work: the session poll, the audit
# flush, the API-key use flush. Apart from the call path's, so a queue of calls cannot
# starve them (a stale session list) and they cannot delay calls.
BACKGROUND_STORE_THREADS = 2


class StartupError(RuntimeError):
    """The server cannot start; the message is one line for the operator."""


class Foundation:
    """Opened by :meth:`start`, in an order that fails fast; closed by :meth:`stop`."""

    def __init__(self, settings: Settings, revocation_source: RevocationSource | None) -> None:
        self.settings = settings
        self._revocation_source = revocation_source
        # Who holds a lease: unique per server process, readable in the cache.
        self.instance_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    # Set by start(); typed here so the rest of the server can rely on them.
    tls: TlsReloader
    authority: CertificateAuthority
    revocations: RevocationList
    store: SqlStore
    cache: Cache
    policy: Authorizer
    signing_keys: SigningKeys
    store_calls: StoreCalls
    background_calls: StoreCalls
    revocation_executor: ThreadPoolExecutor
    hash_executor: ThreadPoolExecutor

    async def start(self) -> None:
        settings = self.settings
        try:
            self.tls = TlsReloader(TlsFiles(*settings.tls_paths()))
        except (SettingsError, ValueError) as exc:
            raise StartupError(str(exc)) from None
        # Revocation reads get a thread of their own: behind a queue of store calls the
        # list would go stale and every call would be refused.
        self.revocation_executor = ThreadPoolExecutor(1, thread_name_prefix="nodepool-revocations")
        self.authority = await asyncio.to_thread(self._open_authority)
        self.revocations = RevocationList(
            self._revocation_source or self.authority.store,
            max_staleness=REVOCATION_MAX_STALENESS,
        )
        try:
            await asyncio.to_thread(self.revocations.refresh)
        except Exception as exc:
            raise StartupError("cannot read the certificate revocation records") from exc

        threads = settings.max_workers
        self.store_calls = StoreCalls(threads, settings.database_timeout)
        self.background_calls = StoreCalls(
            BACKGROUND_STORE_THREADS, settings.database_timeout, name="nodepool-background"
        )
        # argon2 takes a core and 64 MiB per hash; Accounts lets two run at once.
        self.hash_executor = ThreadPoolExecutor(2, thread_name_prefix="nodepool-hash")
        try:
            # One connection per thread that may hold one: no call waits for a connection,
            # and none is opened per call.
            self.store = await asyncio.to_thread(
                lambda: open_store(
                    settings.database_url,
                    pool_size=threads + BACKGROUND_STORE_THREADS,
                    timeout=settings.database_timeout,
                )
            )
        except StoreError as exc:
            raise StartupError(f"database: cannot open ({exc})") from None
        self.cache = create_cache(settings.redis_url, namespace=settings.cache_namespace)
        try:
            await self.cache.ping()
        except CacheUnavailable:
            raise StartupError("NODEPOOL_REDIS_URL: Redis does not answer") from None
        try:
            self.policy = Authorizer.from_directory(settings.policy_dir or default_policy_dir())
        except Exception as exc:
            raise StartupError(f"NODEPOOL_POLICY_DIR: cannot load the policy ({exc})") from None
        try:
            self.signing_keys = await asyncio.to_thread(
                lambda: SigningKeys.load_or_create(settings.jwt_keys, settings.jwt_algorithm)
            )
        except SigningKeyError as exc:
            raise StartupError(f"NODEPOOL_JWT_KEY_DIR: {exc}") from None

    async def stop(self) -> None:
        """Closes whatever :meth:`start` opened, also after a start that failed half-way."""
        names = ("store_calls", "background_calls")
        running = [calls for name in names if (calls := getattr(self, name, None)) is not None]
        for store_calls in running:
            store_calls.shutdown(wait=False)  # no new work; what is queued is dropped
        if running:
            # Store work already on a thread (a loop cancelled mid-call) finishes before the
            # engine goes, or its connection would outlive the pool unclosed.
            def wait_for_threads() -> None:
                for store_calls in running:
                    store_calls.shutdown(wait=True)

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.to_thread(wait_for_threads), self.settings.database_timeout + 1
                )
        if (cache := getattr(self, "cache", None)) is not None:
            await cache.close()
        if (store := getattr(self, "store", None)) is not None:
            await asyncio.to_thread(store.close)
        if (authority := getattr(self, "authority", None)) is not None:
            await asyncio.to_thread(authority.close)
        for name in ("revocation_executor", "hash_executor"):
            if (executor := getattr(self, name, None)) is not None:
                executor.shutdown(wait=False, cancel_futures=True)

    def _open_authority(self) -> CertificateAuthority:
        """The CA: its records give revocations, and its key (if unlocked) signs renewals."""
        pki_dir = self.settings.pki_dir
        if pki_dir is None:
            raise StartupError(
                "NODEPOOL_PKI_DIR: not set (the server reads certificate revocations "
                "from the CA directory)"
            )
        try:
            passphrase = read_ca_passphrase()
        except PkiError as exc:
            raise StartupError(str(exc)) from None
        store: CertificateStore | None = None
        try:
            url = self.settings.pki_database_url
            store = CertificateStore.from_url(url) if url else CertificateStore.open(pki_dir)
            authority = CertificateAuthority.open(pki_dir, passphrase, store=store)
        except PkiError as exc:
            if store is not None:
                store.close()
            raise StartupError(f"NODEPOOL_PKI_DIR: {exc}") from None
        if authority.trust_domain != self.settings.trust_domain:
            authority.close()
            raise StartupError(
                f"NODEPOOL_TRUST_DOMAIN: {self.settings.trust_domain!r} is not the CA's "
                f"trust domain {authority.trust_domain!r}"
            )
        return authority
