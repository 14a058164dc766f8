"""Assembles the Node Pool gRPC server: mTLS only, every call through the pipeline.

Assembly only. The parts live elsewhere and each starts and stops
(:mod:`nodepool.server.components`):

- :class:`Foundation` — CA records, store, cache, policy, keys and the threads that call
  them;
- :func:`build_domains` — the node registry and the task service over the store;
- :func:`background_loops` — every periodic or long-running task; a new loop (failure
  detector, heartbeat flusher, scheduler) is one more entry there;
- :func:`services` — every servicer with the generated function that adds it; a new
  service is one more entry there (and its methods in ``methods.py`` and the policy);
- :class:`GrpcServer` — the listener, with the pipeline as its interceptor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from nodepool.auth.certificates import PeerCertificateCache
from nodepool.auth.revocation import RevocationSource
from nodepool.background import Lease, in_thread
from nodepool.domain.audit import AuditLog
from nodepool.domain.certificates import CertificateRenewal
from nodepool.domain.nodes import NodeLimits, NodeRegistry
from nodepool.domain.tasks import DeliveryHub, Scheduler, TaskLimits, TaskService, retention_cutoff
from nodepool.server import reflection_v1
from nodepool.server.audit import AuditTrail
from nodepool.server.auth import AuthParts, build_auth
from nodepool.server.components import Background, Component, Components, Periodic
from nodepool.server.foundation import Foundation, StartupError
from nodepool.server.health import HealthService
from nodepool.server.methods import HEALTH_SERVICE, METHOD_RULES, REFLECTION_SERVICES
from nodepool.server.pipeline import (
    CallPipeline,
    authorization_stage,
    identity_stage,
    revocation_stage,
)
from nodepool.servicers import (
    AuditServicer,
    CertificateServicer,
    MasterNodeServicer,
    NodeManagerServicer,
    UserManagerServicer,
)
from nodepool.settings import Settings
from nodepool.store import AuditEntry
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

__all__ = [
    "SERVICE_NAMES",
    "Domains",
    "GrpcServer",
    "NodePoolServer",
    "Service",
    "StartupError",
    "background_loops",
    "build_domains",
    "services",
]

_log = logging.getLogger(__name__)

SERVICE_NAMES = (
    node_manager_pb2.DESCRIPTOR.services_by_name["NodeManager"].full_name,
    user_manager_pb2.DESCRIPTOR.services_by_name["UserManager"].full_name,
    master_node_pb2.DESCRIPTOR.services_by_name["MasterNodeService"].full_name,
    certificates_pb2.DESCRIPTOR.services_by_name["CertificateService"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
)

# With the staleness bound in Foundation, a revoked certificate is refused within about a
# quarter second, and an unreadable CA record makes every call fail closed after 5 s.
_REVOCATION_POLL_SECONDS = 0.25
_AUDIT_FLUSH_SECONDS = 0.5
_SESSION_POLL_SECONDS = 1.0
_POLICY_RELOAD_SECONDS = 2.0
_SIGNING_KEY_RELOAD_SECONDS = 5.0
_API_KEY_TOUCH_SECONDS = 30.0
_EVENTS_READY_SECONDS = 30.0
_RETENTION_SECONDS = 3600.0
# Pool-wide loops (failure detection, drains, timeouts, retention, scheduling) run on the
# one instance holding their lease; if it dies another takes over when the lease lapses.
_LEASE_MARGIN_SECONDS = 5.0

# As the generated add_*Servicer_to_server functions are typed.
_AddServicer = Callable[[Any, grpc.aio.Server], None]


@dataclass(frozen=True, slots=True)
class Service:
    """A servicer and the generated function that registers it."""

    add: _AddServicer
    servicer: object


@dataclass(frozen=True, slots=True)
class Domains:
    """The node and task domains, over the store and its call threads."""

    registry: NodeRegistry
    hub: DeliveryHub
    scheduler: Scheduler
    tasks: TaskService


async def build_domains(settings: Settings, base: Foundation) -> Domains:
    calls = base.store_calls
    registry = NodeRegistry(
        base.store,
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
    scheduler = Scheduler(base.store, calls, registry, hub)
    tasks = TaskService(
        base.store,
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
    return Domains(registry, hub, scheduler, tasks)


def services(
    base: Foundation, auth: AuthParts, domains: Domains, health_servicer: object
) -> list[Service]:
    """Every service the server answers; each method must also be in ``methods.py``."""
    # The asyncio servicer is exported as reflection.aio; the stubs predate it. It answers
    # reflection v1alpha and, through reflection_v1, v1.
    reflector = reflection.aio.ReflectionServicer(  # type: ignore[attr-defined]
        (*SERVICE_NAMES, HEALTH_SERVICE, *REFLECTION_SERVICES)
    )
    return [
        Service(
            node_manager_pb2_grpc.add_NodeManagerServicer_to_server,
            NodeManagerServicer(domains.registry),
        ),
        Service(
            user_manager_pb2_grpc.add_UserManagerServicer_to_server,
            UserManagerServicer(auth.accounts),
        ),
        Service(
            master_node_pb2_grpc.add_MasterNodeServiceServicer_to_server,
            MasterNodeServicer(domains.tasks),
        ),
        Service(
            certificates_pb2_grpc.add_CertificateServiceServicer_to_server,
            CertificateServicer(CertificateRenewal(base.authority)),
        ),
        Service(
            audit_pb2_grpc.add_AuditServiceServicer_to_server,
            AuditServicer(AuditLog(base.store, base.store_calls)),
        ),
        Service(health_pb2_grpc.add_HealthServicer_to_server, health_servicer),
        Service(reflection_pb2_grpc.add_ServerReflectionServicer_to_server, reflector),
        Service(reflection_v1.add_to_server, reflector),
    ]


def background_loops(
    settings: Settings, base: Foundation, auth: AuthParts, audit: AuditTrail, domains: Domains
) -> list[Component]:
    """Every task that runs beside the calls, started before the listener.

    A loop that must run on one instance at a time takes a ``lease=Lease(base.cache, name,
    holder, ttl)`` (see :func:`nodepool.background.every`).
    """
    registry, tasks = domains.registry, domains.tasks
    # Beats are written behind, well inside a heartbeat interval and a timeout.
    flush_every = min(1.0, settings.node_heartbeat_interval / 4)
    check_every = min(1.0, settings.node_timeout / 4)

    # A pool-wide run is a few store calls; it may take two database timeouts at most.
    run_timeout = 2 * settings.database_timeout

    def lease(name: str, every_seconds: float) -> Lease:
        # Held a few seconds past one interval plus one run, as renewal requires.
        ttl = every_seconds + run_timeout + _LEASE_MARGIN_SECONDS
        return Lease(base.cache, name, base.instance_id, ttl)

    async def retention() -> None:
        await tasks.delete_finished_before(retention_cutoff(settings.completed_task_retention_days))
        await base.background_calls(
            base.store.delete_offline_nodes_before,
            retention_cutoff(settings.offline_node_retention_days),
        )

    events_ready = asyncio.Event()

    async def wait_for_events() -> None:
        # Credential caches are filled and subscribed before the first call is taken.
        try:
            await asyncio.wait_for(events_ready.wait(), timeout=_EVENTS_READY_SECONDS)
        except TimeoutError:
            raise StartupError("cannot subscribe to credential changes in the cache") from None

    return [
        Background(lambda: auth.events.run(events_ready), ready=wait_for_events),
        Background(
            lambda: base.revocations.keep_fresh(_REVOCATION_POLL_SECONDS, base.revocation_executor)
        ),
        Periodic(_SESSION_POLL_SECONDS, auth.credentials.poll_revoked_sessions, "session poll"),
        Periodic(settings.tls_reload_interval, in_thread(base.tls.reload_if_changed), "TLS reload"),
        # The last flush at stop keeps what the final calls recorded.
        Periodic(_AUDIT_FLUSH_SECONDS, audit.flush, "audit write", on_stop=audit.flush),
        Periodic(_POLICY_RELOAD_SECONDS, in_thread(base.policy.reload_if_changed), "policy"),
        Periodic(
            _SIGNING_KEY_RELOAD_SECONDS,
            in_thread(auth.signing_keys.reload_if_changed),
            "signing key reload",
        ),
        Periodic(_API_KEY_TOUCH_SECONDS, auth.api_keys.flush_last_used, "API key use"),
        # Each instance writes the beats it received, and follows what the others changed.
        Periodic(
            flush_every,
            registry.flush_heartbeats,
            "heartbeat write",
            on_stop=registry.flush_heartbeats,
        ),
        Periodic(check_every, registry.follow_changes, "node directory"),
        Periodic(
            check_every,
            registry.detect_failures,
            "failure detector",
            timeout=run_timeout,
            lease=lease("nodes.failures", check_every),
        ),
        Periodic(
            check_every,
            registry.finish_drains,
            "drain",
            timeout=run_timeout,
            lease=lease("nodes.drains", check_every),
        ),
        Periodic(
            check_every,
            tasks.fail_overdue,
            "task timeouts",
            timeout=run_timeout,
            lease=lease("tasks.timeouts", check_every),
        ),
        Background(lambda: domains.scheduler.run(lease("tasks.scheduler", 1.0))),
        Periodic(
            _RETENTION_SECONDS,
            retention,
            "retention",
            timeout=run_timeout,
            lease=lease("retention", _RETENTION_SECONDS),
        ),
    ]


class GrpcServer:
    """The listener: every registered service behind the pipeline, which is its interceptor."""

    def __init__(
        self,
        settings: Settings,
        base: Foundation,
        pipeline: CallPipeline,
        registrations: Sequence[Service],
        health_servicer: Any,
    ) -> None:
        self._settings = settings
        self._base = base
        self._pipeline = pipeline
        self._registrations = registrations
        self._health = health_servicer
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.grace: float = settings.shutdown_grace

    async def start(self) -> None:
        settings = self._settings
        server = grpc.aio.server(
            interceptors=[self._pipeline],
            options=[
                # Without this a second server could bind the same port and split traffic.
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.http2.max_pings_without_data", 0),
            ],
        )
        for registration in self._registrations:
            registration.add(registration.servicer, server)
        try:
            port = server.add_secure_port(settings.bind_address, self._base.tls.credentials())
        except RuntimeError:
            port = 0
        if port == 0:
            raise StartupError(f"NODEPOOL_GRPC_PORT: cannot listen on {settings.bind_address}")
        await server.start()
        self._server, self.port = server, port
        for service in ("", *SERVICE_NAMES):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        _log.info("Node Pool serving mTLS on %s (port %d)", settings.bind_address, port)

    async def stop(self) -> None:
        """Stops taking calls and lets in-flight calls finish within :attr:`grace`."""
        await self._health.enter_graceful_shutdown()
        server, self._server = self._server, None
        if server is not None:
            await server.stop(self.grace)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


class NodePoolServer:
    def __init__(
        self, settings: Settings, *, revocation_source: RevocationSource | None = None
    ) -> None:
        self.settings = settings
        self._revocation_source = revocation_source
        self._components = Components()
        self._listener: GrpcServer | None = None
        self.port = 0

    async def start(self) -> int:
        """Starts serving and returns the bound port. Raises :class:`StartupError`."""
        settings = self.settings
        try:
            base = Foundation(settings, self._revocation_source)
            await self._components.start(base)
            auth = build_auth(
                settings,
                base.store,
                base.cache,
                base.signing_keys,
                store_calls=base.store_calls,
                background_calls=base.background_calls,
                hash_executor=base.hash_executor,
            )

            async def append_audit(entries: Sequence[AuditEntry]) -> None:
                await base.background_calls(base.store.append_audit, entries)

            audit = AuditTrail(append_audit)
            pipeline = CallPipeline(
                METHOD_RULES,
                stages=[
                    identity_stage(PeerCertificateCache(settings.trust_domain)),
                    revocation_stage(base.revocations),
                    auth.credentials,
                    authorization_stage(base.policy),
                ],
                auditor=audit,
            )
            domains = await build_domains(settings, base)
            health_servicer = HealthService()  # Check, Watch and List
            listener = GrpcServer(
                settings,
                base,
                pipeline,
                services(base, auth, domains, health_servicer),
                health_servicer,
            )
            await self._components.start(
                *background_loops(settings, base, auth, audit, domains), listener
            )
        except BaseException:
            await self._components.stop()
            raise
        self._listener, self.port = listener, listener.port
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, lets in-flight calls finish within ``grace``, closes storage."""
        if self._listener is not None and grace is not None:
            self._listener.grace = grace
        self._listener = None
        await self._components.stop()

    async def wait_for_termination(self) -> None:
        if self._listener is not None:
            await self._listener.wait_for_termination()
