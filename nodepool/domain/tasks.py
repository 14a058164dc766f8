"""Tasks: submission, the scheduler, delivery to workers, reports, cancel and timeouts.

Plain Python over the task store; the servicer translates. The database is the truth:
a task is persisted before its submission is answered, every assignment is a
compare-and-set recorded with its attempt number, and a report counts only from the node
holding the task's current attempt, so nothing is run twice by mistake when nodes die,
servers restart or users cancel. What lives in memory only makes things fast: the
scheduler is woken by events (a submission, a freed slot, a node joining) rather than a
tick, and each node's delivery stream is woken when something is assigned to it or taken
from it. A periodic wake-up bounds how long a missed event (or one raised on another
instance) can delay anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from nodepool.auth.principal import Principal
from nodepool.background import Lease
from nodepool.domain.nodes import NodeEntry, NodeRegistry, call_store, check_labels, is_admin
from nodepool.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from nodepool.store import (
    TASK_TERMINAL_STATUSES,
    Conflict,
    LimitExceeded,
    NotFound,
    Page,
    StoreUnavailable,
    TaskRecord,
    TaskStore,
)
from nodepool.store.base import NewTask, NodeLoad, ReportState, ReportVerdict, TaskReportIn
from nodepool.store.calls import GroupCommit, StoreCalls

__all__ = [
    "TASK_TYPES",
    "Delivery",
    "DeliveryHub",
    "Scheduler",
    "TaskLimits",
    "TaskService",
    "TaskSubmission",
]

_log = logging.getLogger(__name__)

# What the reference worker runs; a task of any other type could never be placed.
TASK_TYPES = frozenset({"echo", "sleep", "sha256", "python"})
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_TASK_ID = re.compile(r"[0-9a-f]{32}")
_MAX_PAGE = 1000
_MAX_BATCH = 1000
_MAX_WAIT_SECONDS = 60
_MAX_ERROR_CHARS = 2048
# A missed wake-up (or one raised on another instance) delays work at most this long.
# Waits use asyncio.timeout, not asyncio.wait_for, which on Python 3.11 can swallow the
# cancellation that stops a loop (when the awaited thing finishes at the same moment).
_FALLBACK_WAKE_SECONDS = 1.0
# How often a delivery stream reads what its node holds even when nothing said it changed
# (assignments made by another instance).
_RECONCILE_SECONDS = 3.0
# At most this many scheduling rounds a second under load (see Scheduler.run).
_MIN_ROUND_SECONDS = 0.005


@dataclass(frozen=True, slots=True)
class TaskLimits:
    max_payload_bytes: int = 1 << 20
    max_result_bytes: int = 1 << 20
    max_pending_per_user: int = 10_000
    default_max_attempts: int = 3
    max_attempts: int = 10
    default_timeout_seconds: int = 3600
    max_timeout_seconds: int = 7 * 86400


@dataclass(frozen=True, slots=True)
class TaskSubmission:
    task_type: str
    payload: bytes = b""
    cpu_cores: int = 0
    memory_gb: float = 0.0
    max_attempts: int = 0
    timeout_seconds: int = 0
    idempotency_key: str = ""
    priority: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message of a node's delivery stream."""

    assignments: list[TaskRecord]
    stop_task_ids: list[str]


@dataclass(eq=False, slots=True)
class _Stream:
    """One open delivery stream and what is waiting to be sent on it."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Assigned here and handed over directly: no read of the database to deliver them.
    assigned: list[TaskRecord] = field(default_factory=list)
    stop: set[str] = field(default_factory=set)
    # Finished by the node itself: no need to tell it to stop them.
    settled: set[str] = field(default_factory=set)
    # Something changed that only the database knows: read what the node holds.
    reconcile: bool = True


class DeliveryHub:
    """The delivery streams (and status waiters) of this instance, and what wakes them."""

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._waiters: dict[str, asyncio.Event] = {}

    def open(self, node_id: str) -> _Stream:
        old = self._streams.get(node_id)
        if old is not None:
            # One stream per node: a reconnecting worker replaces its old stream.
            old.wake.set()
        stream = _Stream()
        self._streams[node_id] = stream
        return stream

    def is_current(self, node_id: str, stream: _Stream) -> bool:
        return self._streams.get(node_id) is stream

    def close(self, node_id: str, stream: _Stream) -> None:
        if self._streams.get(node_id) is stream:
            del self._streams[node_id]

    def assigned(self, tasks: Iterable[TaskRecord]) -> None:
        for task in tasks:
            stream = self._streams.get(task.assigned_node_id or "")
            if stream is not None:
                stream.assigned.append(task)
                stream.wake.set()

    def stop(self, node_id: str, task_ids: Iterable[str]) -> None:
        stream = self._streams.get(node_id)
        if stream is not None:
            stream.stop.update(task_ids)
            stream.wake.set()

    def notify(self, node_ids: Iterable[str]) -> None:
        """Something changed for these nodes: their streams re-read what they hold."""
        for node_id in node_ids:
            stream = self._streams.get(node_id)
            if stream is not None:
                stream.reconcile = True
                stream.wake.set()

    def settle(self, node_id: str, task_ids: Iterable[str]) -> None:
        stream = self._streams.get(node_id)
        if stream is not None:
            stream.settled.update(task_ids)

    def waiter(self, task_id: str) -> asyncio.Event:
        return self._waiters.setdefault(task_id, asyncio.Event())

    def forget_waiter(self, task_id: str, event: asyncio.Event) -> None:
        if self._waiters.get(task_id) is event:
            del self._waiters[task_id]

    def finished(self, task_ids: Iterable[str]) -> None:
        for task_id in task_ids:
            event = self._waiters.pop(task_id, None)
            if event is not None:
                event.set()


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Scheduler:
    """Places pending tasks on online, non-draining nodes whose free resources fit.

    Priority first; within a priority, owners take turns (the store's queue order, ties
    going to the owner served longest ago), so one owner's flood does not starve the
    others; each task goes to the least-loaded node that fits. Assignments are
    compare-and-set in the store, so even two schedulers could never give one task to two
    nodes; in a pool of several instances, one runs it at a time (a lease).
    """

    def __init__(
        self,
        store: TaskStore,
        calls: StoreCalls,
        nodes: NodeRegistry,
        hub: DeliveryHub,
        *,
        batch: int = 500,
        per_owner: int = 100,
    ) -> None:
        self._store = store
        self._calls = calls
        self._nodes = nodes
        self._hub = hub
        self._batch = batch
        self._per_owner = per_owner
        self._wake = asyncio.Event()
        # The (priority, owner id) queues with pending tasks. Reading them costs a pass over
        # the backlog, so it is done when something may have gone back to the queue, and
        # at least every second (for submissions made on other instances).
        self._queues: set[tuple[int, int]] = set()
        self._queues_read_at = -math.inf
        self._reread_queues = True
        # Queues that gained tasks while a round was on its store thread: the round's answer
        # was read before them and must not replace them.
        self._enqueued_in_round: set[tuple[int, int]] = set()
        # owner id -> the count of assignments made when the owner was last given a slot:
        # the store puts the owner served longest ago first within a turn. In memory; a
        # restart only forgets who went last.
        self._served: dict[int, int] = {}
        self._assignments_made = 0

    def wake(self) -> None:
        self._wake.set()

    def enqueued(self, tasks: Iterable[TaskRecord]) -> None:
        """New tasks were submitted here."""
        queues = {(task.priority, task.owner_id) for task in tasks}
        self._queues.update(queues)
        self._enqueued_in_round.update(queues)
        self._wake.set()

    def requeued(self) -> None:
        """Tasks may have gone back to the queue (a node lost, a failed attempt)."""
        self._reread_queues = True
        self._wake.set()

    async def run(self, lease: Lease | None = None) -> None:
        """Places tasks whenever woken (and at least every second), until cancelled.

        With a ``lease`` it places only while this instance holds it, so several instances
        sharing one database schedule one at a time (assignments would stay correct without
        it, being compare-and-set, but rounds would collide).
        """
        loop = asyncio.get_running_loop()
        last_round = -math.inf
        holding = False
        renewed_at = -math.inf
        failing = False
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_FALLBACK_WAKE_SECONDS):
                    await self._wake.wait()
            # Rounds close together are merged: under load every report would wake a
            # round of its own, each paying the reads and the transaction for a task or
            # two. An idle scheduler still starts at once.
            since = loop.time() - last_round
            if since < _MIN_ROUND_SECONDS:
                await asyncio.sleep(_MIN_ROUND_SECONDS - since)
            last_round = loop.time()
            self._wake.clear()
            if lease is not None and (not holding or last_round - renewed_at > lease.ttl / 3):
                try:
                    holding = await lease.hold(holding)
                except Exception:  # the cache is down: nobody may be sure to hold it
                    holding = False
                renewed_at = last_round
                if not holding:
                    continue
            try:
                placed = await self.place()
            except Exception as error:
                # The loop must outlive any one round: if it ended, nothing would ever be
                # placed again. One line per failing streak, not one per retry.
                if not failing:
                    if isinstance(error, StoreUnavailable | UnavailableError):
                        _log.warning("scheduler: the database is unavailable; will retry")
                    else:
                        _log.exception("scheduler: a round failed; will retry")
                failing = True
                await asyncio.sleep(_FALLBACK_WAKE_SECONDS)
                continue
            if failing:
                _log.info("scheduler: placing tasks again")
                failing = False
            if placed >= self._batch:
                self._wake.set()  # more is waiting

    async def place(self) -> int:
        """One round: returns how many tasks were assigned."""
        nodes = self._nodes.schedulable()
        if not nodes:
            return 0
        now = asyncio.get_running_loop().time()
        reread = self._reread_queues or now - self._queues_read_at >= _FALLBACK_WAKE_SECONDS
        if reread:
            self._reread_queues = False
            self._queues_read_at = now
        elif not self._queues:
            return 0
        # The reads, the plan and the assignment run in one trip to a store thread.
        self._enqueued_in_round = set()
        assigned, queues = await self._calls(
            self._round, nodes, None if reread else sorted(self._queues), dict(self._served)
        )
        self._queues = queues | self._enqueued_in_round
        for task in assigned:
            self._assignments_made += 1
            self._served[task.owner_id] = self._assignments_made
        self._hub.assigned(assigned)
        return len(assigned)

    def _round(
        self,
        nodes: list[NodeEntry],
        queues: list[tuple[int, int]] | None,
        served: dict[int, int],
    ) -> tuple[list[TaskRecord], set[tuple[int, int]]]:
        """Runs on a store thread: what is free, what waits, who gets what."""
        if queues is None:
            queues = self._store.pending_queues()
        if not queues:
            return [], set()
        loads = self._store.node_loads()
        free: dict[str, list[float]] = {}
        heap: list[tuple[float, str]] = []
        by_id: dict[str, NodeEntry] = {}
        for node in nodes:
            load = loads.get(node.id, NodeLoad(0, 0, 0.0))
            slots = node.task_slots - load.tasks
            if slots <= 0:
                continue
            free[node.id] = [
                slots,
                node.cpu_cores - load.cpu_cores,
                node.memory_gb - load.memory_gb,
            ]
            by_id[node.id] = node
            heapq.heappush(heap, (load.tasks / node.task_slots, node.id))
        free_slots = int(sum(room[0] for room in free.values()))
        if not free_slots:
            return [], set(queues)
        limit = min(self._batch, free_slots)
        queue = self._store.queued_tasks(
            per_owner=self._per_owner, limit=limit, queues=queues, last_served=served
        )
        remaining = set(queues)
        if len(queue) < limit:
            # Every queue was read to its end: the ones that gave nothing are empty.
            remaining = {(task.priority, task.owner_id) for task in queue}
        assignments: list[tuple[str, str]] = []
        for task in queue:
            if not heap:
                break
            skipped: list[tuple[float, str]] = []
            chosen: str | None = None
            # The least-loaded node first; nodes that do not fit this task are set aside.
            while heap:
                load_ratio, node_id = heapq.heappop(heap)
                room = free[node_id]
                node = by_id[node_id]
                if (
                    task.required_cpu_cores <= room[1]
                    and task.required_memory_gb <= room[2] + 1e-9
                    and all(node.labels.get(k) == v for k, v in task.required_labels.items())
                ):
                    chosen = node_id
                    room[0] -= 1
                    room[1] -= task.required_cpu_cores
                    room[2] -= task.required_memory_gb
                    if room[0] > 0:
                        used = node.task_slots - room[0]
                        skipped.append((used / node.task_slots, node_id))
                    break
                skipped.append((load_ratio, node_id))
            for item in skipped:
                heapq.heappush(heap, item)
            if chosen is not None:
                assignments.append((task.id, chosen))
        if not assignments:
            return [], remaining
        return self._store.assign_tasks(assignments), remaining


def _check_submission(submission: TaskSubmission, limits: TaskLimits) -> NewTask:
    if submission.task_type not in TASK_TYPES:
        raise InvalidArgumentError(
            f"unknown task type; known types: {', '.join(sorted(TASK_TYPES))}"
        )
    if len(submission.payload) > limits.max_payload_bytes:
        raise ResourceExhaustedError(f"payload exceeds {limits.max_payload_bytes} bytes")
    if not 0 <= submission.cpu_cores <= 4096:
        raise InvalidArgumentError("requirements.cpu_cores must be at most 4096")
    memory = submission.memory_gb
    if not math.isfinite(memory) or not 0 <= memory <= 1 << 20:
        raise InvalidArgumentError("requirements.memory_gb must be between 0 and 1048576")
    attempts = submission.max_attempts or limits.default_max_attempts
    if attempts > limits.max_attempts:
        raise InvalidArgumentError(f"max_attempts must be at most {limits.max_attempts}")
    timeout = submission.timeout_seconds or limits.default_timeout_seconds
    if timeout > limits.max_timeout_seconds:
        raise InvalidArgumentError(f"timeout_seconds must be at most {limits.max_timeout_seconds}")
    if not -100 <= submission.priority <= 100:
        raise InvalidArgumentError("priority must be between -100 and 100")
    key = submission.idempotency_key
    if key and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidArgumentError("idempotency_key must be 1-128 plain characters")
    return NewTask(
        task_type=submission.task_type,
        payload=submission.payload,
        required_cpu_cores=submission.cpu_cores,
        required_memory_gb=memory,
        required_labels=check_labels(submission.labels, "labels"),
        priority=submission.priority,
        max_attempts=attempts,
        timeout_seconds=timeout,
        idempotency_key=key or None,
    )


def _check_task_id(task_id: str) -> str:
    if not _TASK_ID.fullmatch(task_id):
        # Not a task id we could have made: answered like a missing task.
        raise NotFoundError("no such task")
    return task_id


class TaskService:
    """Every task rule users and workers meet. See the module docstring."""

    def __init__(
        self,
        store: TaskStore,
        calls: StoreCalls,
        nodes: NodeRegistry,
        scheduler: Scheduler,
        hub: DeliveryHub,
        limits: TaskLimits,
    ) -> None:
        self._store = store
        self._calls = calls
        self._nodes = nodes
        self._scheduler = scheduler
        self._hub = hub
        self._limits = limits
        # Workers report all the time: concurrent reports share one transaction.
        self._reports: GroupCommit[tuple[str, Sequence[TaskReportIn]], list[ReportVerdict]] = (
            GroupCommit(self._apply_reports)
        )

    async def _apply_reports(
        self, batches: list[tuple[str, Sequence[TaskReportIn]]]
    ) -> list[list[ReportVerdict]]:
        results: list[list[ReportVerdict]] = await self._db(self._store.report_batches, batches)
        return results

    async def _db(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await call_store(self._calls, function, *args, **kwargs)

    # -- users ---------------------------------------------------------------------------

    @staticmethod
    def _username(principal: Principal) -> str:
        if principal.username is None:
            raise PermissionDeniedError()
        return principal.username

    async def submit(
        self, principal: Principal, submissions: Sequence[TaskSubmission]
    ) -> list[TaskRecord]:
        owner = self._username(principal)
        if not submissions:
            raise InvalidArgumentError("no tasks to submit")
        if len(submissions) > _MAX_BATCH:
            raise InvalidArgumentError(f"at most {_MAX_BATCH} tasks per call")
        tasks = [_check_submission(submission, self._limits) for submission in submissions]
        try:
            created: list[tuple[TaskRecord, bool]] = await self._db(
                self._store.create_tasks,
                owner,
                tasks,
                max_pending=self._limits.max_pending_per_user,
            )
        except LimitExceeded:
            raise ResourceExhaustedError(
                f"at most {self._limits.max_pending_per_user} pending tasks per user"
            ) from None
        except NotFound:
            raise FailedPreconditionError("the account no longer exists") from None
        self._scheduler.enqueued(record for record, new in created if new)
        return [record for record, _ in created]

    async def _visible(self, principal: Principal, task_id: str) -> TaskRecord:
        try:
            task: TaskRecord = await self._db(self._store.get_task, _check_task_id(task_id))
        except NotFound:
            raise NotFoundError("no such task") from None
        if (
            not is_admin(principal)
            and task.owner.casefold() != self._username(principal).casefold()
        ):
            raise NotFoundError("no such task")
        return task

    async def status(self, principal: Principal, task_id: str, wait_seconds: int) -> TaskRecord:
        if wait_seconds > _MAX_WAIT_SECONDS:
            raise InvalidArgumentError(f"wait_seconds must be at most {_MAX_WAIT_SECONDS}")
        if not wait_seconds:
            return await self._visible(principal, task_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while True:
            # The waiter comes before the read: a task finishing in between still wakes it.
            event = self._hub.waiter(task_id)
            try:
                task = await self._visible(principal, task_id)
                remaining = deadline - loop.time()
                if task.status in TASK_TERMINAL_STATUSES or remaining <= 0:
                    return task
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, _FALLBACK_WAKE_SECONDS)):
                        await event.wait()
            finally:
                self._hub.forget_waiter(task_id, event)

    async def cancel(self, principal: Principal, task_id: str) -> TaskRecord:
        task = await self._visible(principal, task_id)
        try:
            cancelled: TaskRecord = await self._db(self._store.cancel_task, task.id)
        except NotFound:
            raise NotFoundError("no such task") from None
        except Conflict:
            raise FailedPreconditionError(f"the task has already {task.status}") from None
        if task.assigned_node_id:
            self._hub.stop(task.assigned_node_id, [task.id])
            self._scheduler.wake()
        self._hub.finished([task.id])
        return cancelled

    async def list_page(
        self,
        principal: Principal,
        *,
        status: str | None,
        owner: str,
        page_size: int,
        cursor: str | None,
    ) -> Page[TaskRecord]:
        if is_admin(principal):
            scope = owner or None
        else:
            scope = self._username(principal)
            if owner and owner.casefold() != scope.casefold():
                raise PermissionDeniedError("only an admin may list other users' tasks")
        try:
            page: Page[TaskRecord] = await self._db(
                self._store.list_tasks,
                owner=scope,
                status=status,
                limit=min(page_size or 100, _MAX_PAGE),
                cursor=cursor or None,
            )
        except ValueError:
            raise InvalidArgumentError("invalid page_token") from None
        return page

    # -- workers -------------------------------------------------------------------------

    async def deliveries(self, principal: Principal, node_id: str) -> AsyncIterator[Delivery]:
        """The node's delivery stream: its assignments as they come, and what to stop.

        Ends (raises) when the node is removed. Each (re)connection first sends every task
        the node holds, so a worker that reconnects learns what it still owns. Tasks
        assigned on this instance are handed to the stream directly; what only the
        database knows (assignments made by another instance, tasks taken away) is read
        when something changed, and every few seconds in any case.
        """
        node_id = self._nodes.own_node_id(principal, node_id)
        if self._nodes.get(node_id) is None:
            raise FailedPreconditionError("the node is not registered; call RegisterNode")
        stream = self._hub.open(node_id)
        loop = asyncio.get_running_loop()
        sent: dict[str, int] = {}
        read_at = -math.inf
        try:
            while True:
                if not self._hub.is_current(node_id, stream):
                    raise FailedPreconditionError("another delivery stream replaced this one")
                if self._nodes.get(node_id) is None:
                    raise NotFoundError("the node was removed")
                stream.wake.clear()
                new: dict[str, TaskRecord] = {}
                stop: set[str] = set()
                if stream.reconcile or loop.time() - read_at >= _RECONCILE_SECONDS:
                    stream.reconcile = False
                    read_at = loop.time()
                    held: dict[str, int] = await self._db(self._store.held_task_attempts, node_id)
                    # What was handed over meanwhile need not be read again.
                    pushed = {task.id: task.attempts for task in stream.assigned}
                    missing = [
                        tid
                        for tid, attempt in held.items()
                        if sent.get(tid) != attempt and pushed.get(tid) != attempt
                    ]
                    if missing:
                        records: list[TaskRecord] = await self._db(self._store.get_tasks, missing)
                        new.update((task.id, task) for task in records)
                    stop.update(tid for tid, attempt in sent.items() if held.get(tid) != attempt)
                for task in stream.assigned:
                    if sent.get(task.id) != task.attempts:
                        new[task.id] = task
                stream.assigned.clear()
                stop.update(tid for tid in stream.stop if tid in sent)
                stream.stop.clear()
                for tid in stream.settled:
                    sent.pop(tid, None)
                    stop.discard(tid)
                stream.settled.clear()
                for tid in stop:
                    sent.pop(tid, None)
                for task in new.values():
                    sent[task.id] = task.attempts
                if new or stop:
                    yield Delivery(list(new.values()), sorted(stop))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_RECONCILE_SECONDS):
                        await stream.wake.wait()
        finally:
            self._hub.close(node_id, stream)

    async def report(
        self, principal: Principal, node_id: str, reports: Sequence[TaskReportIn]
    ) -> list[ReportVerdict]:
        node_id = self._nodes.own_node_id(principal, node_id)
        if len(reports) > _MAX_BATCH:
            raise InvalidArgumentError(f"at most {_MAX_BATCH} reports per call")
        checked: list[TaskReportIn] = []
        for report in reports:
            _check_task_id(report.task_id)
            if report.attempt < 1:
                raise InvalidArgumentError("attempt must be at least 1")
            if not math.isfinite(report.progress) or not 0 <= report.progress <= 1:
                raise InvalidArgumentError("progress must be between 0 and 1")
            if len(report.error) > _MAX_ERROR_CHARS:
                report = TaskReportIn(
                    report.task_id,
                    report.attempt,
                    report.state,
                    report.progress,
                    report.result,
                    report.error[:_MAX_ERROR_CHARS],
                    report.exit_code,
                )
            if len(report.result) > self._limits.max_result_bytes:
                # Nothing is lost silently: the task fails, and says why.
                report = TaskReportIn(
                    report.task_id,
                    report.attempt,
                    ReportState.FAILED,
                    error=f"result exceeds {self._limits.max_result_bytes} bytes",
                    exit_code=report.exit_code,
                )
            checked.append(report)
        verdicts = await self._reports.submit((node_id, checked)) if checked else []
        done = [
            report.task_id
            for report, verdict in zip(checked, verdicts, strict=True)
            if verdict is ReportVerdict.ACCEPTED and report.state is not ReportState.RUNNING
        ]
        if done:
            self._hub.settle(node_id, done)
            self._hub.finished(done)
            if any(report.state is ReportState.FAILED for report in checked):
                self._scheduler.requeued()  # a failed attempt may be retried
            else:
                self._scheduler.wake()  # slots were freed
        return verdicts

    # -- housekeeping ----------------------------------------------------------------------

    async def fail_overdue(self) -> list[TaskRecord]:
        """Tasks past their timeout fail; their nodes are told to stop them."""
        overdue: list[TaskRecord] = await self._db(self._store.fail_overdue_tasks, _utcnow())
        if overdue:
            _log.info("%d task(s) ran past their timeout and failed", len(overdue))
            for task in overdue:
                if task.assigned_node_id:
                    self._hub.stop(task.assigned_node_id, [task.id])
            self._hub.finished(t.id for t in overdue)
            self._scheduler.wake()
        return overdue

    async def delete_finished_before(self, cutoff: datetime) -> int:
        count: int = await self._db(self._store.delete_finished_tasks_before, cutoff)
        return count

    def nodes_changed(self, node_ids: set[str]) -> None:
        """A node joined, left, drained or died: streams re-check, the scheduler re-plans."""
        self._hub.notify(node_ids)
        self._scheduler.requeued()


def retention_cutoff(days: int) -> datetime:
    return _utcnow() - timedelta(days=days)
