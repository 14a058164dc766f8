"""The node registry: registration, heartbeats, failure detection, drain and removal.

Plain Python over the node store; the servicer translates. The rules live here:

* a node certificate acts only for its own node id, and the owner is the one the
  certificate records;
* heartbeats are the hot path: they land in an in-process buffer and a directory of known
  nodes answers them from memory; the database gets the latest beat per node in batches
  (write-behind), which is also what other instances and the failure detector read;
* a node silent for the node timeout is marked offline and its tasks go back to the
  queue; after a server start, nobody is declared dead before a full timeout has passed,
  so a restart never marks a healthy fleet offline.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from nodepool.auth.principal import PeerKind, Principal
from nodepool.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from nodepool.store import (
    Conflict,
    Heartbeat,
    LimitExceeded,
    NodeEventRecord,
    NodeRecord,
    NodeStore,
    NotFound,
    Page,
    PoolStats,
    StoreUnavailable,
)
from nodepool.store.calls import StoreCalls
from nodepool.store.errors import NodeRemoved

__all__ = [
    "ADMIN_ROLE",
    "HeartbeatReply",
    "NodeEntry",
    "NodeLimits",
    "NodeRegistration",
    "NodeRegistry",
    "call_store",
    "check_labels",
    "is_admin",
]

_log = logging.getLogger(__name__)

ADMIN_ROLE = "admin"
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_LABEL_KEY = re.compile(r"[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9._:/+=@-]{0,63}")
_MAX_LABELS = 32
_REPORTED_STATUSES = frozenset({"online", "busy", "draining"})
_MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class NodeLimits:
    heartbeat_interval: int = 30
    timeout: int = 120
    max_nodes_per_user: int = 10
    default_drain_deadline: timedelta = timedelta(minutes=10)
    max_drain_deadline: timedelta = timedelta(days=7)


@dataclass(frozen=True, slots=True)
class NodeRegistration:
    node_id: str
    ip_address: str
    port: int
    cpu_cores: int
    memory_gb: float
    disk_gb: float
    labels: Mapping[str, str] = field(default_factory=dict)
    task_slots: int = 0


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """What the hot path and the scheduler know of a node, kept in memory."""

    id: str
    owner: str
    status: str
    drain_requested: bool
    cpu_cores: int
    memory_gb: float
    task_slots: int
    labels: Mapping[str, str]

    @property
    def schedulable(self) -> bool:
        return (
            self.status in ("online", "busy") and not self.drain_requested and self.task_slots > 0
        )


@dataclass(frozen=True, slots=True)
class HeartbeatReply:
    interval_seconds: int
    drain_requested: bool


def _entry(node: NodeRecord) -> NodeEntry:
    return NodeEntry(
        id=node.id,
        owner=node.owner,
        status=node.status,
        drain_requested=node.drain_requested,
        cpu_cores=node.cpu_cores or 0,
        memory_gb=node.memory_gb or 0.0,
        task_slots=node.task_slots,
        labels=dict(node.labels),
    )


def _utcnow() -> datetime:
    return datetime.now(UTC)


def check_labels(labels: Mapping[str, str], what: str = "labels") -> dict[str, str]:
    if len(labels) > _MAX_LABELS:
        raise InvalidArgumentError(f"{what}: at most {_MAX_LABELS}")
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key):
            raise InvalidArgumentError(
                f"{what}: keys are 1-63 lower-case letters, digits, '.', '_', '/' or '-'"
            )
        if not _LABEL_VALUE.fullmatch(value):
            raise InvalidArgumentError(f"{what}: values are at most 63 plain characters")
    return dict(labels)


def _finite(value: float, low: float, high: float, what: str) -> float:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgumentError(f"{what} must be between {low:g} and {high:g}")
    return value


def _check_address(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        pass
    # A name whose last label is all digits is no host name (RFC 3696 §2): "999.1.1.1" is
    # an IPv4 address out of range, not a name to resolve later.
    if _HOSTNAME.fullmatch(address) and not address.rsplit(".", 1)[-1].isdigit():
        return address.lower()
    raise InvalidArgumentError("ip_address must be an IP address or a host name")


def is_admin(principal: Principal) -> bool:
    return ADMIN_ROLE in principal.roles


async def call_store(
    calls: StoreCalls, function: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """A store call from the domain: an unreachable database is the public UNAVAILABLE."""
    try:
        return await calls(function, *args, **kwargs)
    except StoreUnavailable:
        raise UnavailableError() from None


class NodeRegistry:
    """Every node rule, over a :class:`NodeStore`. See the module docstring."""

    def __init__(
        self,
        store: NodeStore,
        calls: StoreCalls,
        limits: NodeLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._calls = calls
        self._limits = limits
        self._clock = clock
        self._directory: dict[str, NodeEntry] = {}
        self._beats: dict[str, Heartbeat] = {}
        self._started_at = clock()
        self._last_event = 0
        # Told the ids of nodes whose state changed here (the scheduler and the task
        # delivery streams listen).
        self._listeners: list[Callable[[set[str]], None]] = []

    @property
    def limits(self) -> NodeLimits:
        return self._limits

    def on_change(self, listener: Callable[[set[str]], None]) -> None:
        self._listeners.append(listener)

    def _changed(self, node_ids: set[str]) -> None:
        for listener in self._listeners:
            listener(node_ids)

    # -- the directory ------------------------------------------------------------------

    def get(self, node_id: str) -> NodeEntry | None:
        return self._directory.get(node_id)

    def schedulable(self) -> list[NodeEntry]:
        return [entry for entry in self._directory.values() if entry.schedulable]

    async def load(self) -> None:
        """Read every node into the directory (at start, before serving)."""
        # The feed position first: a change made while the nodes are read is read again.
        last_event: int = await self._db(self._store.last_node_event_id)
        directory: dict[str, NodeEntry] = {}
        cursor: str | None = None
        while True:
            page = await self._db(self._store.list_nodes, limit=_MAX_PAGE, cursor=cursor)
            directory.update((node.id, _entry(node)) for node in page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
        self._directory = directory
        self._last_event = last_event

    async def follow_changes(self) -> None:
        """Apply what other instances changed (registrations, drains, removals, nodes
        marked offline), read from the node event feed: a few rows, not the whole fleet."""
        while True:
            events: list[NodeEventRecord] = await self._db(
                self._store.node_events_since, self._last_event
            )
            if not events:
                return
            changed = {event.node_id for event in events}
            nodes: list[NodeRecord] = await self._db(self._store.get_nodes, sorted(changed))
            found = {node.id: node for node in nodes}
            for node_id in changed:
                node = found.get(node_id)
                if node is None:
                    self._directory.pop(node_id, None)
                    self._beats.pop(node_id, None)
                else:
                    self._directory[node_id] = _entry(node)
            self._last_event = events[-1].id
            self._changed(changed)

    async def _db(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await call_store(self._calls, function, *args, **kwargs)

    # -- who may act on which node ------------------------------------------------------

    @staticmethod
    def own_node_id(principal: Principal, requested: str) -> str:
        """The node id a node certificate acts for: its own, whatever the request says."""
        peer = principal.peer
        if peer.kind is not PeerKind.NODE:
            raise PermissionDeniedError("only a node certificate may act as a node")
        if requested and requested != peer.name:
            raise PermissionDeniedError("a node may act only as itself")
        return peer.name

    def _owner_scope(self, principal: Principal, owner: str = "") -> str | None:
        """``None`` (every owner) for an admin who names nobody; otherwise one owner."""
        if is_admin(principal):
            return owner or None
        if principal.username is None:
            raise PermissionDeniedError()
        if owner and owner.casefold() != principal.username.casefold():
            raise PermissionDeniedError("only an admin may list other users' nodes")
        return principal.username

    # -- registration and heartbeats -----------------------------------------------------

    async def register(self, principal: Principal, request: NodeRegistration) -> NodeRecord:
        node_id = self.own_node_id(principal, request.node_id)
        owner = principal.peer.owner
        if not owner:
            raise PermissionDeniedError("the node certificate records no owner")
        if not 1 <= request.cpu_cores <= 4096:
            raise InvalidArgumentError("cpu_cores must be between 1 and 4096")
        memory = _finite(request.memory_gb, 0.001, 1 << 20, "memory_gb")
        disk = _finite(request.disk_gb, 0, 1 << 30, "disk_gb")
        if request.port > 65535:
            raise InvalidArgumentError("port must be between 0 and 65535")
        if not 0 <= request.task_slots <= 4096:
            raise InvalidArgumentError("task_slots must be between 0 and 4096")
        address = _check_address(request.ip_address)
        labels = check_labels(request.labels)
        node: NodeRecord
        try:
            node, _created = await self._db(
                self._store.register_node,
                node_id,
                owner=owner,
                ip_address=address,
                port=request.port,
                cpu_cores=request.cpu_cores,
                memory_gb=memory,
                disk_gb=disk,
                labels=labels,
                max_nodes_per_owner=self._limits.max_nodes_per_user,
                task_slots=request.task_slots or request.cpu_cores,
            )
        except NodeRemoved:
            raise PermissionDeniedError(
                "this node was removed; an admin must re-admit it before it can register"
            ) from None
        except LimitExceeded:
            raise ResourceExhaustedError(
                f"the owner already has {self._limits.max_nodes_per_user} nodes"
            ) from None
        except Conflict:
            raise PermissionDeniedError("the node id belongs to another owner") from None
        except NotFound:
            raise FailedPreconditionError("the node's owner has no account") from None
        self._beats.pop(node_id, None)
        self._directory[node_id] = _entry(node)
        self._changed({node_id})
        return node

    async def heartbeat(
        self, principal: Principal, node_id: str, status: str, metrics: Mapping[str, Any]
    ) -> HeartbeatReply:
        node_id = self.own_node_id(principal, node_id)
        entry = self._directory.get(node_id)
        if entry is None:
            raise FailedPreconditionError("the node is not registered; call RegisterNode")
        if status not in _REPORTED_STATUSES:
            raise InvalidArgumentError("status must be online, busy or draining")
        now = _utcnow()
        if entry.status == "offline":
            # Back from the dead: the change (and its event) is written now, not behind.
            if await self._db(self._store.mark_node_online, node_id, now):
                _log.info("node %s is online again", node_id)
            entry = replace(entry, status="draining" if entry.drain_requested else "online")
            self._directory[node_id] = entry
            self._changed({node_id})
        elif not entry.drain_requested and entry.status != status and status != "draining":
            entry = replace(entry, status=status)
            self._directory[node_id] = entry
        self._beats[node_id] = Heartbeat(node_id, status, metrics, now)
        return HeartbeatReply(self._limits.heartbeat_interval, entry.drain_requested)

    async def flush_heartbeats(self) -> None:
        """Write the buffered beats, the latest per node, in one batch."""
        if not self._beats:
            return
        beats, self._beats = self._beats, {}
        try:
            await self._db(self._store.apply_heartbeats, list(beats.values()))
        except BaseException:
            # Keep them for the next flush, unless a newer beat arrived meanwhile.
            for node_id, beat in beats.items():
                self._beats.setdefault(node_id, beat)
            raise

    # -- failure detection and drains ----------------------------------------------------

    async def detect_failures(self) -> list[str]:
        """Mark silent nodes offline and requeue their tasks; returns the node ids."""
        if self._clock() - self._started_at < self._limits.timeout:
            # The grace after a start: every live node gets a full timeout to reach us.
            return []
        await self.flush_heartbeats()
        older_than = _utcnow() - timedelta(seconds=self._limits.timeout)
        node_ids: list[str]
        task_ids: list[str]
        node_ids, task_ids = await self._db(self._store.fail_silent_nodes, older_than)
        for node_id in node_ids:
            entry = self._directory.get(node_id)
            if entry is not None:
                self._directory[node_id] = replace(entry, status="offline")
        if node_ids:
            _log.warning(
                "%d node(s) silent for %d s marked offline; %d task(s) requeued",
                len(node_ids),
                self._limits.timeout,
                len(task_ids),
            )
            self._changed(set(node_ids))
        return node_ids

    async def finish_drains(self) -> list[str]:
        removed: list[str]
        removed = await self._db(self._store.finish_drains, _utcnow(), "drain")
        for node_id in removed:
            self._directory.pop(node_id, None)
            self._beats.pop(node_id, None)
        if removed:
            _log.info("drained and removed: %s", ", ".join(removed))
            self._changed(set(removed))
        return removed

    # -- what users and admins do --------------------------------------------------------

    async def list_page(
        self,
        principal: Principal,
        *,
        status: str | None,
        owner: str,
        labels: Mapping[str, str],
        page_size: int,
        cursor: str | None,
    ) -> Page[NodeRecord]:
        scope = self._owner_scope(principal, owner)
        wanted = check_labels(labels, "label filter")
        size = min(page_size or 100, _MAX_PAGE)
        try:
            page: Page[NodeRecord] = await self._db(
                self._store.list_nodes,
                owner=scope,
                status=status,
                labels=wanted,
                limit=size,
                cursor=cursor or None,
            )
        except ValueError:  # the store's InvalidArgument: a bad page token
            raise InvalidArgumentError("invalid page_token") from None
        return page

    async def _visible(self, principal: Principal, node_id: str) -> NodeRecord:
        """The node if the caller owns it or is an admin; NOT_FOUND otherwise (no probing)."""
        try:
            node: NodeRecord = await self._db(self._store.get_node, node_id)
        except NotFound:
            raise NotFoundError("no such node") from None
        if not is_admin(principal) and (
            principal.username is None or node.owner.casefold() != principal.username.casefold()
        ):
            raise NotFoundError("no such node")
        return node

    async def remove(
        self, principal: Principal, node_id: str, *, drain: bool, deadline_seconds: int
    ) -> NodeRecord | None:
        """Remove now (``None``), or start a drain and return the draining node."""
        if not _NODE_ID.fullmatch(node_id):
            raise InvalidArgumentError("node_id is not a valid node id")
        await self._visible(principal, node_id)
        if drain:
            wait = (
                timedelta(seconds=deadline_seconds)
                if deadline_seconds
                else self._limits.default_drain_deadline
            )
            if wait > self._limits.max_drain_deadline:
                raise InvalidArgumentError("drain_deadline_seconds is too long")
            try:
                node = await self._db(self._store.request_drain, node_id, deadline=_utcnow() + wait)
            except NotFound:
                raise NotFoundError("no such node") from None
            self._directory[node_id] = _entry(node)
            self._changed({node_id})
            drained: NodeRecord = node
            return drained
        try:
            await self._db(
                self._store.remove_node,
                node_id,
                removed_by=principal.audit_name,
                reason="removed by " + (principal.username or principal.peer.name),
            )
        except NotFound:
            raise NotFoundError("no such node") from None
        self._directory.pop(node_id, None)
        self._beats.pop(node_id, None)
        self._changed({node_id})
        return None

    async def events(
        self, principal: Principal, node_id: str, *, page_size: int, cursor: str | None
    ) -> Page[NodeEventRecord]:
        if not is_admin(principal):
            await self._visible(principal, node_id)
        try:
            page: Page[NodeEventRecord] = await self._db(
                self._store.list_node_events,
                node_id,
                limit=min(page_size or 100, _MAX_PAGE),
                cursor=cursor or None,
            )
        except ValueError:
            raise InvalidArgumentError("invalid page_token") from None
        return page

    async def stats(self) -> PoolStats:
        stats: PoolStats = await self._db(self._store.pool_stats)
        return stats

    async def readmit(self, principal: Principal, node_id: str) -> None:
        if not _NODE_ID.fullmatch(node_id):
            raise InvalidArgumentError("node_id is not a valid node id")
        try:
            await self._db(self._store.readmit_node, node_id, principal.audit_name)
        except NotFound:
            raise NotFoundError("that node id was not removed") from None
