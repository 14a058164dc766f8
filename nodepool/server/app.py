"""Assembles and runs the Node Pool gRPC server: mTLS only, every call through the pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from nodepool.auth.authorization import Authorizer, default_policy_dir
from nodepool.auth.certificates import PeerCertificateCache
from nodepool.auth.revocation import RevocationList, RevocationSource
from nodepool.auth.tokens import SigningKeyError, SigningKeys
from nodepool.background import every, in_thread
from nodepool.cache import Cache, CacheUnavailable, create_cache
from nodepool.domain.audit import AuditLog
from nodepool.domain.certificates import CertificateRenewal
from nodepool.domain.nodes import NodeLimits, NodeRegistry
from nodepool.domain.tasks import DeliveryHub, Scheduler, TaskLimits, TaskService, retention_cutoff
from nodepool.server.audit import AuditTrail
from nodepool.server.auth import build_auth
from nodepool.server.health import HealthService
from nodepool.server.methods import HEALTH_SERVICE, METHOD_RULES
from nodepool.server.pipeline import (
    CallPipeline,
    authorization_stage,
    identity_stage,
    revocation_stage,
)
from nodepool.server.tls import TlsFiles, TlsReloader
from nodepool.servicers import (
    AuditServicer,
    CertificateServicer,
    MasterNodeServicer,
    NodeManagerServicer,
    UserManagerServicer,
)
from nodepool.settings import Settings, SettingsError
from nodepool.store import AuditEntry, Store, StoreError, open_store
from nodepool.store.calls import StoreCalls
from nodepool.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    certificates_pb2,
    certificates_pb2_grpc,
    master_node_pb2,
    master_node_pb2_grpc,
    node_manager_pb2,
    node_manager_pb2_grpc,
    user_manager_pb2,
    user_manager_pb2_grpc,
)
from pki import CertificateAuthority, CertificateStore, PkiError, read_ca_passphrase

__all__ = ["SERVICE_NAMES", "NodePoolServer", "StartupError"]

_log = logging.getLogger(__name__)

SERVICE_NAMES = (
    node_manager_pb2.DESCRIPTOR.services_by_name["NodeManager"].full_name,
    user_manager_pb2.DESCRIPTOR.services_by_name["UserManager"].full_name,
    master_node_pb2.DESCRIPTOR.services_by_name["MasterNodeService"].full_name,
    certificates_pb2.DESCRIPTOR.services_by_name["CertificateService"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
)

# Revocations are polled this often; with the staleness bound below, a revoked
# certificate is refused within about a quarter second, and an unreadable store
# makes every call fail closed after five seconds.
_REVOCATION_POLL_SECONDS = 0.25
_REVOCATION_MAX_STALENESS = 5.0
_AUDIT_FLUSH_SECONDS = 0.5
_SESSION_POLL_SECONDS = 1.0
_POLICY_RELOAD_SECONDS = 2.0
_SIGNING_KEY_RELOAD_SECONDS = 5.0
_API_KEY_TOUCH_SECONDS = 30.0
_DATABASE_TIMEOUT = 5.0
_RETENTION_SECONDS = 3600.0


class StartupError(RuntimeError):
    """The server cannot start; the message is one line for the operator."""


class NodePoolServer:
    def __init__(
        self, settings: Settings, *, revocation_source: RevocationSource | None = None
    ) -> None:
        self.settings = settings
        self._revocation_source = revocation_source
        self._server: grpc.aio.Server | None = None
        self._store: Store | None = None
        self._authority: CertificateAuthority | None = None
        self._cache: Cache | None = None
        self._poll_executor: ThreadPoolExecutor | None = None
        self._calls: StoreCalls | None = None
        self._audit: AuditTrail | None = None
        self._health = HealthService()  # Check, Watch and List
        self._tasks: list[asyncio.Task[None]] = []
        self.port = 0

    async def start(self) -> int:
        """Starts serving and returns the bound port. Raises :class:`StartupError`."""
        try:
            return await self._start()
        except BaseException:
            await self._release()
            raise

    async def _start(self) -> int:
        settings = self.settings
        try:
            tls = TlsReloader(TlsFiles(*settings.tls_paths()))
        except (SettingsError, ValueError) as exc:
            raise StartupError(str(exc)) from None
        authority = await asyncio.to_thread(self._open_authority)
        self._authority = authority
        revocations = RevocationList(
            self._revocation_source or authority.store,
            max_staleness=_REVOCATION_MAX_STALENESS,
        )
        try:
            await asyncio.to_thread(revocations.refresh)
        except Exception as exc:
            raise StartupError("cannot read the certificate revocation records") from exc
        try:
            store = await asyncio.to_thread(open_store, settings.database_url)
        except StoreError as exc:
            raise StartupError(f"database: cannot open ({exc})") from None
        self._store = store
        cache = create_cache(settings.redis_url, namespace=settings.cache_namespace)
        self._cache = cache
        try:
            await cache.ping()
        except CacheUnavailable:
            raise StartupError("NODEPOOL_REDIS_URL: Redis does not answer") from None
        try:
            policy = Authorizer.from_directory(settings.policy_dir or default_policy_dir())
        except Exception as exc:
            raise StartupError(f"NODEPOOL_POLICY_DIR: cannot load the policy ({exc})") from None
        try:
            keys = await asyncio.to_thread(
                SigningKeys.load_or_create, settings.jwt_keys, settings.jwt_algorithm
            )
        except SigningKeyError as exc:
            raise StartupError(f"NODEPOOL_JWT_KEY_DIR: {exc}") from None

        # Revocation reads get threads of their own: they must never wait behind a queue
        # of password hashes, or the revocation list would go stale and fail closed.
        self._poll_executor = ThreadPoolExecutor(2, thread_name_prefix="nodepool-revocations")
        auth = build_auth(settings, store, cache, keys, self._poll_executor)

        async def append_audit(entries: Sequence[AuditEntry]) -> None:
            await asyncio.to_thread(store.append_audit, entries)

        audit = AuditTrail(append_audit)
        self._audit = audit
        pipeline = CallPipeline(
            METHOD_RULES,
            stages=[
                identity_stage(PeerCertificateCache(settings.trust_domain)),
                revocation_stage(revocations),
                auth.credentials,
                authorization_stage(policy),
            ],
            auditor=audit,
        )
        server = grpc.aio.server(
            options=[
                # Without this a second server could bind the same port and split traffic.
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.http2.max_pings_without_data", 0),
            ],
        )
        # Every service is added through the pipeline's view of the server, which wraps
        # each handler once; nothing is registered on the server directly.
        guarded = pipeline.guarded(server)
        calls = StoreCalls(settings.max_workers, _DATABASE_TIMEOUT)
        self._calls = calls
        registry = NodeRegistry(
            store,
            calls,
            NodeLimits(
                heartbeat_interval=settings.node_heartbeat_interval,
                timeout=settings.node_timeout,
                max_nodes_per_user=settings.max_nodes_per_user,
            ),
        )
        try:
            await registry.load()
        except Exception as exc:
            raise StartupError(f"database: cannot read the nodes ({exc})") from None
        hub = DeliveryHub()
        scheduler = Scheduler(store, calls, registry, hub)
        tasks = TaskService(
            store,
            calls,
            registry,
            scheduler,
            hub,
            TaskLimits(
                max_payload_bytes=settings.max_task_payload_bytes,
                max_result_bytes=settings.max_task_result_bytes,
                max_pending_per_user=settings.max_pending_tasks_per_user,
            ),
        )
        registry.on_change(tasks.nodes_changed)
        node_manager_pb2_grpc.add_NodeManagerServicer_to_server(
            NodeManagerServicer(registry), guarded
        )
        user_manager_pb2_grpc.add_UserManagerServicer_to_server(
            UserManagerServicer(auth.accounts), guarded
        )
        master_node_pb2_grpc.add_MasterNodeServiceServicer_to_server(
            MasterNodeServicer(tasks), guarded
        )
        certificates_pb2_grpc.add_CertificateServiceServicer_to_server(
            CertificateServicer(CertificateRenewal(authority)), guarded
        )
        audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(AuditLog(store)), guarded)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, guarded)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            # The asyncio servicer is exported as reflection.aio; the stubs predate it.
            reflection.aio.ReflectionServicer((*SERVICE_NAMES, HEALTH_SERVICE)),  # type: ignore[attr-defined]
            guarded,
        )

        try:
            port = server.add_secure_port(settings.bind_address, tls.credentials())
        except RuntimeError:
            port = 0
        if port == 0:
            raise StartupError(f"NODEPOOL_GRPC_PORT: cannot listen on {settings.bind_address}")

        # Credential caches are filled and subscribed before the first call is taken.
        events_ready = asyncio.Event()
        self._spawn(auth.events.run(events_ready))
        try:
            await asyncio.wait_for(events_ready.wait(), timeout=30)
        except TimeoutError:
            raise StartupError("cannot subscribe to credential changes in the cache") from None
        self._spawn(revocations.keep_fresh(_REVOCATION_POLL_SECONDS, self._poll_executor))
        self._spawn(
            every(_SESSION_POLL_SECONDS, auth.credentials.poll_revoked_sessions, "session poll")
        )
        self._spawn(
            every(settings.tls_reload_interval, in_thread(tls.reload_if_changed), "TLS reload")
        )
        self._spawn(every(_AUDIT_FLUSH_SECONDS, audit.flush, "audit write"))
        self._spawn(every(_POLICY_RELOAD_SECONDS, in_thread(policy.reload_if_changed), "policy"))
        self._spawn(
            every(
                _SIGNING_KEY_RELOAD_SECONDS,
                in_thread(auth.signing_keys.reload_if_changed),
                "signing key reload",
            )
        )
        self._spawn(every(_API_KEY_TOUCH_SECONDS, auth.api_keys.flush_last_used, "API key use"))
        # Beats are written behind, well inside a heartbeat interval and a timeout.
        flush_every = min(1.0, settings.node_heartbeat_interval / 4)
        check_every = min(1.0, settings.node_timeout / 4)
        self._spawn(every(flush_every, registry.flush_heartbeats, "heartbeat write"))
        self._spawn(every(check_every, registry.detect_failures, "failure detector"))
        self._spawn(every(check_every, registry.finish_drains, "drain"))
        self._spawn(every(check_every, tasks.fail_overdue, "task timeouts"))
        self._spawn(every(check_every, registry.follow_changes, "node directory"))
        self._spawn(scheduler.run())

        async def retention() -> None:
            await tasks.delete_finished_before(
                retention_cutoff(settings.completed_task_retention_days)
            )
            await calls(
                store.delete_offline_nodes_before,
                retention_cutoff(settings.offline_node_retention_days),
            )

        self._spawn(every(_RETENTION_SECONDS, retention, "retention"))
        await server.start()
        self._server, self.port = server, port
        for service in ("", *SERVICE_NAMES):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        _log.info("Node Pool serving mTLS on %s (port %d)", settings.bind_address, port)
        return port

    async def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, lets in-flight calls finish within ``grace``, closes storage."""
        grace = self.settings.shutdown_grace if grace is None else grace
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        await self._release()

    async def _release(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._audit is not None:
            with contextlib.suppress(Exception):
                await self._audit.flush()
            self._audit = None
        if self._calls is not None:
            # A store call still running would open a connection after the store closes.
            await asyncio.to_thread(self._calls.shutdown)
            self._calls = None
        if self._cache is not None:
            await self._cache.close()
            self._cache = None
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
            self._store = None
        if self._authority is not None:
            await asyncio.to_thread(self._authority.close)
            self._authority = None
        if self._poll_executor is not None:
            self._poll_executor.shutdown(wait=False, cancel_futures=True)
            self._poll_executor = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

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

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.create_task(work))
