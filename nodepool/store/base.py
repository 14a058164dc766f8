"""The storage contract: plain records in and out, one abstract ``Store``.

Every backend passes ``tests/integration/test_store_contract.py``. Records are frozen
dataclasses; no ORM object ever leaves a backend. Methods are synchronous (the server
runs them in a thread pool) and raise only :mod:`nodepool.store.errors`.

Conventions that hold for every method:

* Times are timezone-aware UTC ``datetime`` values, in and out.
* ``owner`` is a username. Usernames are unique case-insensitively and every lookup by
  username ignores case; records carry the spelling given at registration.
* ``get_*`` methods raise :class:`NotFound`, they never return ``None``.
* Where an ``owner`` argument is accepted and not ``None``, a record owned by someone else
  behaves exactly as a missing one (:class:`NotFound`), so callers cannot probe ids.
* Listings return a :class:`Page`; ``cursor`` is the opaque ``next_cursor`` of the previous
  page (``None`` on the first call, and ``None`` in the last page).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Generic, NamedTuple, TypeVar

__all__ = [
    "NODE_STATUSES",
    "ROLES",
    "TASK_ACTIVE_STATUSES",
    "TASK_STATUSES",
    "TASK_TERMINAL_STATUSES",
    "UNSET",
    "ApiKeyRecord",
    "AuditEntry",
    "AuditStore",
    "Heartbeat",
    "NewTask",
    "NodeEventRecord",
    "NodeLoad",
    "NodeRecord",
    "NodeStore",
    "Page",
    "PoolStats",
    "QueuedTask",
    "ReportState",
    "ReportVerdict",
    "SessionRecord",
    "Store",
    "TaskRecord",
    "TaskReportIn",
    "TaskStore",
    "Unset",
    "UserRecord",
    "UserStore",
]

ROLES: Final = frozenset({"admin", "user", "node"})
NODE_STATUSES: Final = frozenset({"online", "offline", "busy", "draining"})
TASK_STATUSES: Final = frozenset(
    {"pending", "assigned", "running", "completed", "failed", "cancelled"}
)
# A task in one of these states holds (or waits for) a node; it can still be cancelled.
TASK_ACTIVE_STATUSES: Final = frozenset({"pending", "assigned", "running"})
TASK_TERMINAL_STATUSES: Final = frozenset({"completed", "failed", "cancelled"})

T = TypeVar("T")


class Unset(enum.Enum):
    """Marks "leave this field unchanged" where ``None`` is a meaningful new value."""

    UNSET = "UNSET"


UNSET: Final = Unset.UNSET


class Page(NamedTuple, Generic[T]):
    """One page of a listing; unpacks as ``items, next_cursor``."""

    items: list[T]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class UserRecord:
    id: int
    username: str
    password_hash: str
    email: str | None
    roles: frozenset[str]
    is_active: bool
    created_at: datetime
    updated_at: datetime
    last_login: datetime | None
    failed_logins: int
    locked_until: datetime | None
    password_changed_at: datetime | None


@dataclass(frozen=True, slots=True)
class NodeRecord:
    id: str
    owner_id: int
    owner: str
    ip_address: str
    port: int
    status: str
    cpu_cores: int | None
    memory_gb: float | None
    disk_gb: float | None
    labels: Mapping[str, str]
    metrics: Mapping[str, Any]
    drain_requested: bool
    registered_at: datetime
    last_heartbeat: datetime | None
    updated_at: datetime
    drain_deadline: datetime | None = None
    task_slots: int = 0


@dataclass(frozen=True, slots=True)
class NodeEventRecord:
    id: int
    node_id: str
    at: datetime
    event: str
    status: str
    detail: str


@dataclass(frozen=True, slots=True)
class PoolStats:
    nodes_by_status: Mapping[str, int]
    tasks_by_status: Mapping[str, int]
    task_slots_online: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One buffered heartbeat, applied by :meth:`Store.apply_heartbeats`."""

    node_id: str
    status: str
    metrics: Mapping[str, Any]
    at: datetime


@dataclass(frozen=True, slots=True)
class TaskRecord:
    id: str
    owner_id: int
    owner: str
    task_type: str
    status: str
    payload: bytes
    required_cpu_cores: int
    required_memory_gb: float
    assigned_node_id: str | None
    result: bytes | None
    error: str | None
    attempts: int
    max_attempts: int
    timeout_seconds: int
    progress: float
    idempotency_key: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    lease_expires_at: datetime | None
    priority: int = 0
    required_labels: Mapping[str, str] = field(default_factory=dict)
    exit_code: int | None = None


@dataclass(frozen=True, slots=True)
class NewTask:
    """One task of a :meth:`TaskStore.create_tasks` batch."""

    task_type: str
    payload: bytes = b""
    required_cpu_cores: int = 0
    required_memory_gb: float = 0.0
    required_labels: Mapping[str, str] = field(default_factory=dict)
    priority: int = 0
    max_attempts: int = 3
    timeout_seconds: int = 3600
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class QueuedTask:
    """What the scheduler needs to place a pending task."""

    id: str
    owner_id: int
    priority: int
    required_cpu_cores: int
    required_memory_gb: float
    required_labels: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class NodeLoad:
    """What a node's active tasks hold of it."""

    tasks: int
    cpu_cores: int
    memory_gb: float


class ReportState(enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class TaskReportIn:
    """A worker's word on one attempt of one task."""

    task_id: str
    attempt: int
    state: ReportState
    progress: float = 0.0
    result: bytes = b""
    error: str = ""
    exit_code: int | None = None


class ReportVerdict(enum.Enum):
    ACCEPTED = "accepted"
    NOT_FOUND = "not_found"
    # The node held this attempt once, but the task has moved on (requeued, cancelled,
    # timed out, finished): a late report.
    STALE = "stale"
    # The node never held this attempt of the task.
    NOT_ASSIGNED = "not_assigned"


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    id: int
    owner_id: int
    owner: str
    lookup_id: str
    secret_hash: str
    name: str
    scopes: frozenset[str]
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    # The certificate identity (URI SAN) the key works through; None: any device.
    bound_device: str | None = None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A refresh-token family: ``id`` stays fixed while the token hash rotates."""

    id: str
    owner_id: int
    owner: str
    current_token_hash: str
    generation: int
    created_at: datetime
    expires_at: datetime
    rotated_at: datetime | None
    revoked_at: datetime | None
    revoked_reason: str | None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit line. ``id`` is ``None`` until stored; ``detail`` must already be redacted."""

    at: datetime
    principal: str
    method: str
    outcome: str
    username: str | None = None
    peer: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)
    id: int | None = None


class UserStore(abc.ABC):
    """Users and their credentials: accounts, roles, API keys and refresh sessions."""

    # -- users -------------------------------------------------------------------------

    @abc.abstractmethod
    def create_user(
        self,
        username: str,
        password_hash: str,
        *,
        email: str | None = None,
        roles: Iterable[str] = ("user",),
    ) -> UserRecord:
        """Create an active user with ``roles``.

        Raises :class:`AlreadyExists` when the username is taken in any letter case, and
        :class:`InvalidArgument` for a role outside :data:`ROLES`.
        """

    @abc.abstractmethod
    def get_user(self, username: str) -> UserRecord:
        """The user named ``username`` (any letter case); :class:`NotFound` otherwise."""

    @abc.abstractmethod
    def get_user_by_id(self, user_id: int) -> UserRecord:
        """The user with primary key ``user_id``; :class:`NotFound` otherwise."""

    @abc.abstractmethod
    def update_user_fields(
        self,
        username: str,
        *,
        email: str | Unset | None = UNSET,
        password_hash: str | Unset = UNSET,
        is_active: bool | Unset = UNSET,
        keep_an_admin: bool = False,
    ) -> UserRecord:
        """Change the given fields, leave the :data:`UNSET` ones; bumps ``updated_at``.

        A new ``password_hash`` also sets ``password_changed_at``. :class:`NotFound` for an
        unknown user. With ``keep_an_admin``, :class:`Conflict` (and nothing changed) when
        the change would leave no active administrator; the count is taken under a lock
        in the same transaction, so two concurrent changes cannot both pass it.
        """

    @abc.abstractmethod
    def set_roles(self, username: str, roles: Iterable[str]) -> UserRecord:
        """Replace the user's roles with exactly ``roles`` (may be empty)."""

    @abc.abstractmethod
    def add_role(self, username: str, role: str) -> UserRecord:
        """Grant ``role``; granting a role already held is a no-op."""

    @abc.abstractmethod
    def remove_role(self, username: str, role: str, *, keep_an_admin: bool = False) -> UserRecord:
        """Withdraw ``role``; withdrawing a role not held is a no-op.

        ``keep_an_admin`` as for :meth:`update_user_fields`.
        """

    @abc.abstractmethod
    def record_login_success(self, username: str) -> UserRecord:
        """Set ``last_login`` to now and clear ``failed_logins`` and ``locked_until``."""

    @abc.abstractmethod
    def record_login_failure(
        self, username: str, *, lock_after: int, lock_for: timedelta
    ) -> UserRecord:
        """Count one failed login atomically.

        When the count reaches ``lock_after``, ``locked_until`` becomes now + ``lock_for``
        (a later success resets both). Concurrent failures are all counted.
        """

    @abc.abstractmethod
    def list_users(self, *, limit: int = 100, cursor: str | None = None) -> Page[UserRecord]:
        """Users in creation (id) order."""

    # -- api keys ----------------------------------------------------------------------

    @abc.abstractmethod
    def create_api_key(
        self,
        *,
        owner: str,
        lookup_id: str,
        secret_hash: str,
        name: str,
        scopes: Iterable[str],
        expires_at: datetime | None = None,
        bound_device: str | None = None,
    ) -> ApiKeyRecord:
        """Store a key's public lookup id and secret hash (never the secret).

        ``bound_device``: the certificate identity the key is restricted to (None: any).

        :class:`AlreadyExists` for a reused ``lookup_id``; :class:`NotFound` for an unknown
        owner; :class:`InvalidArgument` for a scope outside :data:`ROLES`.
        """

    @abc.abstractmethod
    def get_api_key_by_lookup_id(self, lookup_id: str) -> ApiKeyRecord:
        """The key with ``lookup_id``, revoked or expired ones included (the caller
        decides); :class:`NotFound` otherwise."""

    @abc.abstractmethod
    def list_api_keys(self, owner: str) -> list[ApiKeyRecord]:
        """All of ``owner``'s keys, oldest first, revoked ones included."""

    @abc.abstractmethod
    def revoke_api_key(self, lookup_id: str, *, owner: str | None = None) -> ApiKeyRecord:
        """Set ``revoked_at`` (idempotent: the first revocation time is kept)."""

    @abc.abstractmethod
    def revoke_api_keys_of_user(self, owner: str) -> list[str]:
        """Revoke every unrevoked key of ``owner``; returns their lookup ids, sorted."""

    @abc.abstractmethod
    def touch_api_key_last_used(self, lookup_id: str, at: datetime | None = None) -> None:
        """Move ``last_used_at`` forward to ``at`` (never backwards); unknown ids ignored."""

    # -- refresh sessions --------------------------------------------------------------

    @abc.abstractmethod
    def create_session(
        self, *, session_id: str, owner: str, token_hash: str, expires_at: datetime
    ) -> SessionRecord:
        """Start a refresh-token family at generation 0. :class:`AlreadyExists` for a reused
        id or token hash."""

    @abc.abstractmethod
    def get_session(self, session_id: str) -> SessionRecord:
        """The session ``session_id``; :class:`NotFound` otherwise."""

    @abc.abstractmethod
    def get_session_by_token_hash(self, token_hash: str) -> SessionRecord:
        """The session whose *current* token hash is ``token_hash``; :class:`NotFound`
        otherwise (a rotated-away hash is not found)."""

    @abc.abstractmethod
    def rotate_session(
        self,
        session_id: str,
        *,
        old_token_hash: str,
        new_token_hash: str,
        expires_at: datetime | None = None,
    ) -> SessionRecord:
        """Compare-and-set the token hash: succeeds only while ``old_token_hash`` is current
        and the session is neither revoked nor expired; bumps ``generation``.

        :class:`Conflict` otherwise (a stale hash means token reuse: the caller should revoke
        the family); :class:`NotFound` for an unknown id.
        """

    @abc.abstractmethod
    def revoke_session(self, session_id: str, *, reason: str) -> SessionRecord:
        """Revoke the family (idempotent: the first time and reason are kept)."""

    @abc.abstractmethod
    def revoke_sessions_of_user(
        self, owner: str, *, reason: str, except_session_id: str | None = None
    ) -> list[str]:
        """Revoke every live session of ``owner`` but ``except_session_id``; returns the ids
        revoked now."""

    @abc.abstractmethod
    def list_sessions_revoked_since(self, since: datetime) -> list[str]:
        """Ids of sessions revoked at or after ``since``, oldest first: what every server
        instance must refuse while access tokens issued before the revocation live."""

    @abc.abstractmethod
    def delete_sessions_expired_before(self, cutoff: datetime) -> int:
        """Delete sessions that expired before ``cutoff`` (retention)."""


class NodeStore(abc.ABC):
    """Worker nodes: registration, liveness, drain and retention."""

    # -- nodes -------------------------------------------------------------------------

    @abc.abstractmethod
    def register_node(
        self,
        node_id: str,
        *,
        owner: str,
        ip_address: str,
        port: int,
        cpu_cores: int | None = None,
        memory_gb: float | None = None,
        disk_gb: float | None = None,
        labels: Mapping[str, str] | None = None,
        max_nodes_per_owner: int | None = None,
        task_slots: int = 0,
    ) -> tuple[NodeRecord, bool]:
        """Insert the node, or update it when ``owner`` already holds ``node_id``.

        A ``registered`` event is recorded. :class:`NodeRemoved` when the id was removed
        and not re-admitted.

        Either way the node becomes ``online`` with ``last_heartbeat`` = now; a pending drain
        request is kept. Returns the record and whether it was created.

        Raises :class:`NotFound` for an unknown owner, :class:`Conflict` when another user
        holds ``node_id``, and :class:`LimitExceeded` when inserting would give the owner
        more than ``max_nodes_per_owner`` nodes (checked atomically with the insert; updates
        are never refused).
        """

    @abc.abstractmethod
    def get_node(self, node_id: str) -> NodeRecord:
        """The node ``node_id``; :class:`NotFound` otherwise."""

    @abc.abstractmethod
    def list_nodes(
        self,
        *,
        owner: str | None = None,
        status: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Page[NodeRecord]:
        """Nodes ordered by id, optionally only ``owner``'s, in ``status``, and carrying
        every one of ``labels``."""

    @abc.abstractmethod
    def count_nodes(self, *, owner: str | None = None, status: str | None = None) -> int:
        """How many nodes match (an unknown owner has none)."""

    @abc.abstractmethod
    def remove_node(
        self, node_id: str, *, owner: str | None = None, removed_by: str = "", reason: str = ""
    ) -> None:
        """Delete the node; its unfinished tasks go back to ``pending`` in the same
        transaction (finished ones keep their history with ``assigned_node_id`` NULL).
        The id is recorded as removed (it may not register again until re-admitted) and a
        ``removed`` event is kept.

        :class:`NotFound` when missing, or not ``owner``'s when ``owner`` is given.
        """

    @abc.abstractmethod
    def set_node_drain(self, node_id: str, drain: bool) -> NodeRecord:
        """Set or clear the drain request that the next heartbeat reply carries."""

    @abc.abstractmethod
    def apply_heartbeats(self, beats: Sequence[Heartbeat]) -> None:
        """Write a batch of buffered heartbeats in one statement and one transaction.

        Each sets ``status``, ``metrics``, ``last_heartbeat`` = ``at``. A beat older than the
        stored ``last_heartbeat`` is ignored (out-of-order delivery never rewinds a node), as
        is a beat for a node that no longer exists.
        """

    @abc.abstractmethod
    def mark_stale_nodes_offline(self, older_than: datetime) -> list[str]:
        """Set ``offline`` every non-offline node whose last heartbeat (or registration, if it
        never beat) is before ``older_than``; returns their ids. Tasks are not touched: call
        :meth:`requeue_tasks_of_nodes` with the result."""

    @abc.abstractmethod
    def delete_offline_nodes_before(self, cutoff: datetime) -> int:
        """Delete offline nodes last seen before ``cutoff`` (retention); returns the count."""

    @abc.abstractmethod
    def request_drain(
        self, node_id: str, *, deadline: datetime, owner: str | None = None
    ) -> NodeRecord:
        """Mark the node draining until ``deadline`` (no new tasks; its heartbeat reply
        says so); records a ``drain_requested`` event. :class:`NotFound` as for
        :meth:`remove_node`."""

    @abc.abstractmethod
    def finish_drains(self, now: datetime, removed_by: str) -> list[str]:
        """Remove every draining node that has no active task left or whose deadline has
        passed (its tasks requeued), as :meth:`remove_node` does; returns their ids."""

    @abc.abstractmethod
    def readmit_node(self, node_id: str, actor: str) -> None:
        """Let a removed node id register again; :class:`NotFound` if it was not removed."""

    @abc.abstractmethod
    def fail_silent_nodes(self, older_than: datetime) -> tuple[list[str], list[str]]:
        """In one transaction: mark offline every non-offline node last seen before
        ``older_than`` (an ``offline`` event each), and requeue their active tasks.
        Returns (node ids, task ids)."""

    @abc.abstractmethod
    def mark_node_online(self, node_id: str, at: datetime) -> bool:
        """An offline node that beats again: ``online`` now (an ``online`` event);
        ``True`` if it was offline."""

    @abc.abstractmethod
    def list_node_events(
        self, node_id: str, *, limit: int = 100, cursor: str | None = None
    ) -> Page[NodeEventRecord]:
        """The node's events, newest first (kept after the node is removed)."""

    @abc.abstractmethod
    def node_events_since(self, after_id: int, *, limit: int = 1000) -> list[NodeEventRecord]:
        """Events of every node with an id above ``after_id``, oldest first: the feed an
        instance follows to learn what other instances changed."""

    @abc.abstractmethod
    def last_node_event_id(self) -> int:
        """The id of the newest node event (0 when there is none)."""

    @abc.abstractmethod
    def get_nodes(self, node_ids: Sequence[str]) -> list[NodeRecord]:
        """The nodes among ``node_ids`` that exist, in no particular order."""

    @abc.abstractmethod
    def pool_stats(self) -> PoolStats:
        """Nodes by status, active tasks by status, and the task slots of online nodes."""


class TaskStore(abc.ABC):
    """Tasks: submission, claims by nodes, reports, requeues and retention."""

    # -- tasks -------------------------------------------------------------------------

    @abc.abstractmethod
    def create_task(
        self,
        *,
        owner: str,
        task_type: str,
        payload: bytes = b"",
        required_cpu_cores: int = 0,
        required_memory_gb: float = 0.0,
        max_attempts: int = 3,
        timeout_seconds: int = 3600,
        idempotency_key: str | None = None,
    ) -> tuple[TaskRecord, bool]:
        """Create a ``pending`` task with a fresh uuid4-hex id; returns it and ``True``.

        With an ``idempotency_key`` the owner has used before, nothing is created and the
        earlier task is returned with ``False`` (also under concurrent submissions).
        :class:`NotFound` for an unknown owner.
        """

    @abc.abstractmethod
    def get_task(self, task_id: str) -> TaskRecord:
        """The task ``task_id``; :class:`NotFound` otherwise."""

    @abc.abstractmethod
    def list_tasks(
        self,
        *,
        owner: str | None = None,
        status: str | None = None,
        assigned_node_id: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[TaskRecord]:
        """Tasks newest first, optionally filtered."""

    @abc.abstractmethod
    def cancel_task(self, task_id: str, *, owner: str | None = None) -> TaskRecord:
        """Compare-and-set an active task (pending/assigned/running) to ``cancelled``.

        :class:`NotFound` when missing (or not ``owner``'s); :class:`Conflict` when the task
        already finished.
        """

    @abc.abstractmethod
    def claim_next_task(
        self, node_id: str, *, cpu_cores: int, memory_gb: float
    ) -> TaskRecord | None:
        """Atomically assign the oldest pending task that fits the node's resources.

        The task becomes ``assigned`` to ``node_id``, ``attempts`` goes up by one and
        ``lease_expires_at`` = now + ``timeout_seconds``. Concurrent callers (threads,
        processes, server instances) never receive the same task. ``None`` when nothing
        fits.
        """

    @abc.abstractmethod
    def update_task_progress(self, task_id: str, node_id: str, progress: float) -> TaskRecord:
        """Record progress (0.0-1.0) from the assigned node; an ``assigned`` task becomes
        ``running`` (``started_at`` set once).

        :class:`NotFound` when missing; :class:`Conflict` when the task is not active or
        ``node_id`` is not the node it is assigned to.
        """

    @abc.abstractmethod
    def complete_task(self, task_id: str, node_id: str, result: bytes) -> TaskRecord:
        """Store ``result`` and mark the task ``completed`` (progress 1.0). Errors as for
        :meth:`update_task_progress`."""

    @abc.abstractmethod
    def fail_task(
        self, task_id: str, node_id: str, error: str, *, retry: bool = True
    ) -> TaskRecord:
        """Record ``error``. With ``retry`` and attempts left the task returns to ``pending``
        (unassigned), otherwise it becomes ``failed``. Errors as for
        :meth:`update_task_progress`."""

    @abc.abstractmethod
    def requeue_tasks_of_nodes(self, node_ids: Iterable[str]) -> list[str]:
        """Take the active tasks away from lost nodes: back to ``pending`` when attempts
        remain, else ``failed``. Returns the ids of the tasks touched."""

    @abc.abstractmethod
    def requeue_expired_tasks(self, now: datetime | None = None) -> list[str]:
        """As :meth:`requeue_tasks_of_nodes`, for assigned/running tasks whose lease
        expired before ``now`` (default: the store clock)."""

    @abc.abstractmethod
    def delete_finished_tasks_before(
        self,
        cutoff: datetime,
        statuses: Iterable[str] = TASK_TERMINAL_STATUSES,
    ) -> int:
        """Delete tasks in ``statuses`` (terminal only) that finished before ``cutoff``."""

    @abc.abstractmethod
    def create_tasks(
        self, owner: str, tasks: Sequence[NewTask], *, max_pending: int | None = None
    ) -> list[tuple[TaskRecord, bool]]:
        """Create ``tasks`` for ``owner`` in one transaction, all or none; each as
        :meth:`create_task` (an idempotency key seen before returns the earlier task with
        ``False``). :class:`LimitExceeded` when the owner would have more than
        ``max_pending`` pending tasks. The n-th task of the batch is created n
        microseconds after the first, so the batch is queued (and listed) in its order."""

    @abc.abstractmethod
    def pending_queues(self) -> list[tuple[int, int]]:
        """Every (priority, owner id) that has pending tasks."""

    @abc.abstractmethod
    def queued_tasks(
        self,
        *,
        per_owner: int,
        limit: int,
        queues: Sequence[tuple[int, int]] | None = None,
        last_served: Mapping[int, int] | None = None,
    ) -> list[QueuedTask]:
        """Pending tasks in the order the scheduler should place them: higher priority
        first; within a priority, owners take turns (each owner's oldest first), so one
        owner's flood does not starve the others. At most ``per_owner`` of each owner.

        ``queues`` limits the read to those (priority, owner id) queues (a caller that
        tracks them saves reading the whole backlog); ``None`` reads every queue.

        ``last_served`` (owner id -> a number that grows each time the owner is given a
        slot) orders the owners within a turn: the one served longest ago (or never) first,
        then the oldest task. Without it, when one slot frees at a time every owner's next
        task stands at the first turn and the oldest backlog (a flood) would win each one."""

    @abc.abstractmethod
    def node_loads(self) -> dict[str, NodeLoad]:
        """For every node with active (assigned or running) tasks, what they hold."""

    @abc.abstractmethod
    def assign_tasks(self, assignments: Sequence[tuple[str, str]]) -> list[TaskRecord]:
        """Compare-and-set each (task id, node id): a task still ``pending`` becomes
        ``assigned`` to the node, ``attempts`` + 1, lease = now + timeout, and the attempt
        is recorded. Returns the tasks assigned (a task cancelled meanwhile is skipped)."""

    @abc.abstractmethod
    def active_tasks_of_node(self, node_id: str) -> list[TaskRecord]:
        """The node's assigned and running tasks, oldest assignment first."""

    @abc.abstractmethod
    def held_task_attempts(self, node_id: str) -> dict[str, int]:
        """The node's assigned and running tasks: task id -> current attempt."""

    @abc.abstractmethod
    def get_tasks(self, task_ids: Sequence[str]) -> list[TaskRecord]:
        """The tasks among ``task_ids`` that exist, in no particular order."""

    @abc.abstractmethod
    def report_tasks(self, node_id: str, reports: Sequence[TaskReportIn]) -> list[ReportVerdict]:
        """Apply a worker's reports in one transaction, each fenced by (node, attempt):
        only the node holding the task's current attempt changes it. Running reports
        set progress (``started_at`` once); completed stores the result; failed retries
        while attempts remain, else fails. One verdict per report, in order."""

    @abc.abstractmethod
    def report_batches(
        self, batches: Sequence[tuple[str, Sequence[TaskReportIn]]]
    ) -> list[list[ReportVerdict]]:
        """:meth:`report_tasks` for several nodes' batches in one transaction (a group
        commit of concurrent reports); one list of verdicts per batch, in order."""

    @abc.abstractmethod
    def fail_overdue_tasks(self, now: datetime) -> list[TaskRecord]:
        """Assigned or running tasks whose lease ended before ``now`` become ``failed``
        ("timed out"); returns them as they were (with their node) so it can be told."""

    @abc.abstractmethod
    def unfinished_task_count(self, owner: str) -> int:
        """How many of ``owner``'s tasks are pending, assigned or running."""


class AuditStore(abc.ABC):
    """The append-only audit trail."""

    # -- audit -------------------------------------------------------------------------

    @abc.abstractmethod
    def append_audit(self, entries: Sequence[AuditEntry]) -> None:
        """Append a batch of entries in one transaction (their ``id`` is ignored)."""

    @abc.abstractmethod
    def list_audit(
        self,
        *,
        limit: int = 100,
        cursor: str | None = None,
        principal: str | None = None,
        username: str | None = None,
        method: str | None = None,
        outcome: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Page[AuditEntry]:
        """Entries newest first; ``since`` inclusive, ``until`` exclusive."""

    @abc.abstractmethod
    def delete_audit_before(self, cutoff: datetime) -> int:
        """Delete entries older than ``cutoff`` (retention)."""


class Store(UserStore, NodeStore, TaskStore, AuditStore):
    """Everything Node Pool persists. See the module docstring for the shared conventions.

    The domain depends on the narrow part it needs (:class:`UserStore`, :class:`NodeStore`,
    :class:`TaskStore`, :class:`AuditStore`); the server assembles one whole store.
    """

    # -- operations --------------------------------------------------------------------

    @abc.abstractmethod
    def ping(self) -> None:
        """Return when the database answers; :class:`StoreUnavailable` otherwise."""

    @abc.abstractmethod
    def backup(self, path: Path) -> None:
        """Write a consistent online copy of a live database to ``path`` (mode 0600),
        replacing it atomically. Backends that cannot raise :class:`NotImplementedError`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections. The store must not be used afterwards."""
