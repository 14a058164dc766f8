"""The Store contract for node drain/removal/events and the batched task pipeline.

Every test runs on SQLite and PostgreSQL (the ``store`` fixture); time-dependent cases run
on a fake clock, never on sleeps.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from nodepool.store import (
    Conflict,
    Heartbeat,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    SqlStore,
    Store,
    TaskRecord,
    create_engine_for,
)
from nodepool.store.base import (
    NewTask,
    NodeLoad,
    QueuedTask,
    ReportState,
    ReportVerdict,
    TaskReportIn,
)
from nodepool.store.errors import NodeRemoved

T0 = datetime(2030, 1, 1, tzinfo=UTC)

ACCEPTED = ReportVerdict.ACCEPTED
STALE = ReportVerdict.STALE
NOT_ASSIGNED = ReportVerdict.NOT_ASSIGNED
NOT_FOUND = ReportVerdict.NOT_FOUND


class FakeClock:
    """A settable clock, so ordering and expiry do not depend on real time."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> datetime:
        self.now += timedelta(**kwargs)
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def timed(store: SqlStore, clock: FakeClock) -> SqlStore:
    """The same database as ``store``, on the fake clock."""
    return SqlStore(store.engine, clock=clock)


@pytest.fixture
def alice(store: Store) -> str:
    store.create_user("alice", "hash-a")
    return "alice"


@pytest.fixture
def bob(store: Store) -> str:
    store.create_user("bob", "hash-b")
    return "bob"


@pytest.fixture
def carol(store: Store) -> str:
    store.create_user("carol", "hash-c")
    return "carol"


def _register(
    store: Store,
    node_id: str,
    owner: str,
    *,
    labels: dict[str, str] | None = None,
    task_slots: int = 0,
) -> None:
    store.register_node(
        node_id,
        owner=owner,
        ip_address="10.0.0.1",
        port=50052,
        cpu_cores=4,
        memory_gb=8.0,
        labels=labels,
        task_slots=task_slots,
    )


def _submit(store: Store, owner: str, count: int = 1, **kwargs: object) -> list[TaskRecord]:
    new = NewTask(task_type="echo", **kwargs)  # type: ignore[arg-type]
    return [record for record, _ in store.create_tasks(owner, [new] * count)]


def _assign(store: Store, task: TaskRecord | str, node_id: str) -> TaskRecord:
    task_id = task if isinstance(task, str) else task.id
    (assigned,) = store.assign_tasks([(task_id, node_id)])
    return assigned


def _report(
    store: Store, node_id: str, task_id: str, attempt: int, state: ReportState, **kwargs: object
) -> ReportVerdict:
    report = TaskReportIn(task_id, attempt, state, **kwargs)  # type: ignore[arg-type]
    (verdict,) = store.report_tasks(node_id, [report])
    return verdict


def _events(store: Store, node_id: str) -> list[tuple[str, str, str]]:
    """(event, status, detail), newest first."""
    return [(e.event, e.status, e.detail) for e in store.list_node_events(node_id).items]


def _ids(tasks: Sequence[TaskRecord | QueuedTask]) -> list[str]:
    return [task.id for task in tasks]


# -- registration, removal, re-admission -------------------------------------------------


def test_register_node_keeps_task_slots_and_records_events(
    timed: SqlStore, clock: FakeClock, alice: str
) -> None:
    node, created = timed.register_node(
        "n1", owner=alice, ip_address="10.0.0.1", port=1, task_slots=4
    )
    assert created
    assert (node.task_slots, node.status, node.drain_deadline) == (4, "online", None)
    clock.advance(seconds=5)
    node, created = timed.register_node(
        "n1", owner=alice, ip_address="10.0.0.1", port=1, task_slots=2
    )
    assert not created
    assert node.task_slots == 2
    assert timed.get_node("n1").task_slots == 2
    events = timed.list_node_events("n1").items
    assert [(e.event, e.status) for e in events] == [
        ("registered", "online"),
        ("registered", "online"),
    ]
    assert [e.at for e in events] == [clock.now, T0]
    assert {e.node_id for e in events} == {"n1"}


def test_removed_node_may_not_register_until_readmitted(store: Store, alice: str, bob: str) -> None:
    _register(store, "n1", alice)
    store.remove_node("n1", removed_by="admin", reason="retired")
    with pytest.raises(NodeRemoved):
        _register(store, "n1", alice)
    with pytest.raises(NodeRemoved):
        _register(store, "n1", bob)
    assert issubclass(NodeRemoved, Conflict)
    with pytest.raises(NotFound):
        store.get_node("n1")

    store.readmit_node("n1", "admin")
    with pytest.raises(NotFound):
        store.readmit_node("n1", "admin")  # no longer removed
    with pytest.raises(NotFound):
        store.readmit_node("never-removed", "admin")
    node, created = store.register_node("n1", owner=bob, ip_address="10.0.0.9", port=2)
    assert created
    assert (node.owner, node.status) == ("bob", "online")
    # Events outlive the removal, newest first.
    assert _events(store, "n1") == [
        ("registered", "online", ""),
        ("readmitted", "offline", "admin"),
        ("removed", "offline", "retired"),
        ("registered", "online", ""),
    ]


def test_remove_node_requeues_unfinished_tasks_and_keeps_history(
    store: Store, alice: str, bob: str
) -> None:
    _register(store, "n1", alice)
    _register(store, "n2", alice)
    done, running, assigned, elsewhere = _submit(store, alice, 4)
    for task in (done, running, assigned):
        _assign(store, task, "n1")
    _assign(store, elsewhere, "n2")
    assert _report(store, "n1", done.id, 1, ReportState.COMPLETED, result=b"ok") is ACCEPTED
    assert _report(store, "n1", running.id, 1, ReportState.RUNNING, progress=0.5) is ACCEPTED

    with pytest.raises(NotFound):
        store.remove_node("n1", owner=bob)
    assert store.get_node("n1").id == "n1"
    store.remove_node("n1", owner="ALICE", removed_by="alice")

    for task in (running, assigned):
        requeued = store.get_task(task.id)
        assert (requeued.status, requeued.assigned_node_id, requeued.started_at) == (
            "pending",
            None,
            None,
        )
        assert requeued.lease_expires_at is None
        assert requeued.progress == 0.0
    finished = store.get_task(done.id)
    assert (finished.status, finished.result, finished.assigned_node_id) == (
        "completed",
        b"ok",
        None,
    )
    assert store.get_task(elsewhere.id).assigned_node_id == "n2"
    assert _events(store, "n1")[0] == ("removed", "offline", "removed")
    with pytest.raises(NotFound):
        store.remove_node("n1")


def test_list_nodes_by_labels(store: Store, alice: str, bob: str) -> None:
    _register(store, "n1", alice, labels={"zone": "a", "gpu": "yes"})
    _register(store, "n2", alice, labels={"zone": "a"})
    _register(store, "n3", bob, labels={"zone": "b", "gpu": "yes"})
    _register(store, "n4", bob, labels={"topology.kubernetes.io/zone": "eu-1", "n": "1"})
    _register(store, "n5", bob)

    def ids(**kwargs: object) -> list[str]:
        return [n.id for n in store.list_nodes(**kwargs).items]  # type: ignore[arg-type]

    assert ids(labels={"zone": "a"}) == ["n1", "n2"]
    assert ids(labels={"zone": "a", "gpu": "yes"}) == ["n1"]
    assert ids(labels={"gpu": "yes"}) == ["n1", "n3"]
    assert ids(labels={"gpu": "no"}) == []
    assert ids(labels={"zone": "c"}) == []
    assert ids(labels={"topology.kubernetes.io/zone": "eu-1"}) == ["n4"]
    assert ids(labels={"n": "1"}) == ["n4"]
    assert ids(labels={}) == ["n1", "n2", "n3", "n4", "n5"]
    assert ids(labels={"gpu": "yes"}, owner="BOB") == ["n3"]
    store.request_drain("n1", deadline=T0)
    assert ids(labels={"zone": "a"}, status="online") == ["n2"]
    page = store.list_nodes(labels={"gpu": "yes"}, limit=1)
    assert [n.id for n in page.items] == ["n1"]
    assert page.next_cursor is not None
    page = store.list_nodes(labels={"gpu": "yes"}, limit=1, cursor=page.next_cursor)
    assert [n.id for n in page.items] == ["n3"]
    assert page.next_cursor is None


# -- drain -------------------------------------------------------------------------------


def test_request_drain(timed: SqlStore, clock: FakeClock, alice: str, bob: str) -> None:
    _register(timed, "n1", alice)
    deadline = clock.now + timedelta(minutes=10)
    with pytest.raises(NotFound):
        timed.request_drain("n1", deadline=deadline, owner=bob)
    with pytest.raises(NotFound):
        timed.request_drain("missing", deadline=deadline)
    assert timed.get_node("n1").status == "online"

    clock.advance(seconds=1)
    node = timed.request_drain("n1", deadline=deadline, owner="Alice")
    assert (node.status, node.drain_requested, node.drain_deadline) == (
        "draining",
        True,
        deadline,
    )
    assert timed.get_node("n1") == node
    assert _events(timed, "n1")[0] == ("drain_requested", "draining", "")
    assert timed.list_node_events("n1").items[0].at == clock.now

    # A draining node that registers again is still draining, its deadline kept.
    _register(timed, "n1", alice)
    again = timed.get_node("n1")
    assert (again.status, again.drain_requested, again.drain_deadline) == (
        "draining",
        True,
        deadline,
    )


def test_request_drain_of_an_offline_node_keeps_it_offline(
    timed: SqlStore, clock: FakeClock, alice: str
) -> None:
    _register(timed, "n1", alice)
    clock.advance(minutes=5)
    assert timed.fail_silent_nodes(clock.now) == (["n1"], [])
    node = timed.request_drain("n1", deadline=clock.now + timedelta(minutes=1))
    assert (node.status, node.drain_requested) == ("offline", True)
    assert _events(timed, "n1")[0] == ("drain_requested", "offline", "")


def test_finish_drains(timed: SqlStore, clock: FakeClock, alice: str) -> None:
    for node_id in ("idle", "busy", "late", "working"):
        _register(timed, node_id, alice)
    on_busy, on_late, on_working = _submit(timed, alice, 3)
    _assign(timed, on_busy, "busy")
    _assign(timed, on_late, "late")
    _assign(timed, on_working, "working")  # not draining: never removed
    timed.request_drain("idle", deadline=clock.now + timedelta(minutes=10))
    timed.request_drain("busy", deadline=clock.now + timedelta(minutes=10))
    timed.request_drain("late", deadline=clock.now + timedelta(minutes=1))
    assert _report(timed, "late", on_late.id, 1, ReportState.RUNNING, progress=0.3) is ACCEPTED

    clock.advance(minutes=1)  # exactly at the deadline: not passed yet
    assert timed.finish_drains(clock.now, "drainer") == ["idle"]
    clock.advance(seconds=1)
    assert timed.finish_drains(clock.now, "drainer") == ["late"]
    requeued = timed.get_task(on_late.id)
    assert (requeued.status, requeued.assigned_node_id) == ("pending", None)
    assert timed.get_task(on_busy.id).status == "assigned"
    assert sorted(n.id for n in timed.list_nodes().items) == ["busy", "working"]
    with pytest.raises(NodeRemoved):
        _register(timed, "idle", alice)
    assert _events(timed, "idle")[0] == ("removed", "offline", "drained")
    assert _events(timed, "late")[0] == ("removed", "offline", "drain deadline passed")

    # Once its last task finished, the busy node goes too.
    assert _report(timed, "busy", on_busy.id, 1, ReportState.COMPLETED) is ACCEPTED
    assert timed.finish_drains(clock.now, "drainer") == ["busy"]
    assert timed.get_task(on_busy.id).status == "completed"
    assert timed.finish_drains(clock.now, "drainer") == []
    assert [n.id for n in timed.list_nodes().items] == ["working"]


# -- liveness ----------------------------------------------------------------------------


def test_heartbeats_never_bring_back_offline_or_undrain(
    timed: SqlStore, clock: FakeClock, alice: str
) -> None:
    for node_id in ("lost", "draining", "live"):
        _register(timed, node_id, alice)
    clock.advance(minutes=5)
    timed.apply_heartbeats(
        [
            Heartbeat("draining", "online", {}, clock.now),
            Heartbeat("live", "online", {}, clock.now),
        ]
    )
    assert timed.fail_silent_nodes(clock.now - timedelta(minutes=1)) == (["lost"], [])
    timed.request_drain("draining", deadline=clock.now + timedelta(hours=1))
    at = clock.advance(seconds=10)
    timed.apply_heartbeats(
        [
            Heartbeat("lost", "online", {"cpu_percent": 1.0}, at),
            Heartbeat("draining", "busy", {"cpu_percent": 2.0}, at),
            Heartbeat("live", "busy", {"cpu_percent": 3.0}, at),
        ]
    )
    lost, draining, live = (timed.get_node(n) for n in ("lost", "draining", "live"))
    assert (lost.status, draining.status, live.status) == ("offline", "draining", "busy")
    assert draining.metrics == {"cpu_percent": 2.0}
    assert draining.last_heartbeat == live.last_heartbeat == at


def test_mark_node_online(timed: SqlStore, clock: FakeClock, alice: str) -> None:
    _register(timed, "n1", alice)
    _register(timed, "n2", alice)
    assert not timed.mark_node_online("n1", clock.now)  # not offline: nothing to do
    assert not timed.mark_node_online("missing", clock.now)
    assert _events(timed, "n1") == [("registered", "online", "")]

    clock.advance(minutes=5)
    assert timed.fail_silent_nodes(clock.now) == (["n1", "n2"], [])
    at = clock.advance(seconds=30)
    assert timed.mark_node_online("n1", at)
    node = timed.get_node("n1")
    assert (node.status, node.last_heartbeat) == ("online", at)
    assert _events(timed, "n1")[0][:2] == ("online", "online")
    assert timed.list_node_events("n1").items[0].at == at
    assert not timed.mark_node_online("n1", at)

    # A node asked to drain while it was offline comes back draining, and its event
    # says so.
    timed.request_drain("n2", deadline=at + timedelta(hours=1))
    assert timed.mark_node_online("n2", at)
    assert timed.get_node("n2").status == "draining"
    assert _events(timed, "n2")[0][:2] == ("online", "draining")


def test_fail_silent_nodes_requeues_their_tasks(
    timed: SqlStore, clock: FakeClock, alice: str
) -> None:
    for node_id in ("silent", "quiet-draining", "already-offline", "fresh"):
        _register(timed, node_id, alice)
    clock.advance(minutes=1)
    timed.fail_silent_nodes(clock.now)  # every node so far goes offline...
    for node_id in ("silent", "quiet-draining", "fresh"):
        timed.mark_node_online(node_id, T0)  # ...and three come back, seen at T0
    timed.request_drain("quiet-draining", deadline=clock.now + timedelta(hours=1))
    retry, running, pending, fresh_task = _submit(timed, alice, 4)
    (last_try,) = _submit(timed, alice, max_attempts=1)
    _assign(timed, retry, "silent")
    _assign(timed, last_try, "silent")
    _assign(timed, running, "quiet-draining")
    _report(timed, "quiet-draining", running.id, 1, ReportState.RUNNING, progress=0.9)
    timed.apply_heartbeats([Heartbeat("fresh", "online", {}, clock.now)])
    _assign(timed, fresh_task, "fresh")

    clock.advance(seconds=1)
    nodes, tasks = timed.fail_silent_nodes(clock.now - timedelta(seconds=30))
    assert nodes == ["quiet-draining", "silent"]
    assert tasks == sorted([retry.id, last_try.id, running.id])
    for node_id in nodes:
        assert timed.get_node(node_id).status == "offline"
        assert _events(timed, node_id)[0] == ("offline", "offline", "no heartbeat")
        assert timed.list_node_events(node_id).items[0].at == clock.now
    assert timed.get_node("fresh").status == "online"
    assert timed.get_task(retry.id).status == "pending"
    assert timed.get_task(retry.id).assigned_node_id is None
    assert timed.get_task(running.id).status == "pending"
    assert timed.get_task(last_try.id).status == "failed"
    assert timed.get_task(pending.id).status == "pending"
    assert timed.get_task(fresh_task.id).assigned_node_id == "fresh"
    assert timed.fail_silent_nodes(clock.now - timedelta(seconds=30)) == ([], [])


def test_list_node_events_pages_newest_first(timed: SqlStore, clock: FakeClock, alice: str) -> None:
    for _ in range(5):
        _register(timed, "n1", alice)
        clock.advance(seconds=1)
    _register(timed, "other", alice)
    page = timed.list_node_events("n1", limit=2)
    seen = list(page.items)
    while page.next_cursor is not None:
        page = timed.list_node_events("n1", limit=2, cursor=page.next_cursor)
        seen += page.items
    assert len(seen) == 5
    assert [e.at for e in seen] == sorted((e.at for e in seen), reverse=True)
    assert len({e.id for e in seen}) == 5
    assert {e.node_id for e in seen} == {"n1"}
    assert timed.list_node_events("missing").items == []
    with pytest.raises(InvalidArgument):
        timed.list_node_events("n1", cursor="bogus")


def test_pool_stats(timed: SqlStore, clock: FakeClock, alice: str) -> None:
    empty = timed.pool_stats()
    assert (dict(empty.nodes_by_status), dict(empty.tasks_by_status)) == ({}, {})
    assert empty.task_slots_online == 0

    _register(timed, "gone", alice, task_slots=16)
    clock.advance(minutes=5)
    timed.fail_silent_nodes(clock.now)
    _register(timed, "on1", alice, task_slots=4)
    _register(timed, "on2", alice, task_slots=2)
    _register(timed, "drain", alice, task_slots=8)
    _register(timed, "busy", alice)
    timed.request_drain("drain", deadline=clock.now + timedelta(hours=1))
    timed.apply_heartbeats([Heartbeat("busy", "busy", {}, clock.now)])
    _, _, assigned, running, done, cancelled = _submit(timed, alice, 6)  # two stay pending
    _assign(timed, assigned, "on1")
    _assign(timed, running, "on1")
    _assign(timed, done, "on2")
    _report(timed, "on1", running.id, 1, ReportState.RUNNING)
    _report(timed, "on2", done.id, 1, ReportState.COMPLETED)
    timed.cancel_task(cancelled.id)

    stats = timed.pool_stats()
    assert dict(stats.nodes_by_status) == {"offline": 1, "online": 2, "draining": 1, "busy": 1}
    assert dict(stats.tasks_by_status) == {"pending": 2, "assigned": 1, "running": 1}
    assert stats.task_slots_online == 6


# -- task submission ---------------------------------------------------------------------


def test_create_tasks_batch(timed: SqlStore, clock: FakeClock, alice: str) -> None:
    batch = [
        NewTask("a", payload=b"\x00one", priority=5, required_labels={"gpu": "yes"}),
        NewTask("b", required_cpu_cores=2, required_memory_gb=1.5, max_attempts=1),
        NewTask("c", timeout_seconds=60, idempotency_key="k"),
    ]
    results = timed.create_tasks("ALICE", batch)
    assert [created for _, created in results] == [True, True, True]
    records = [record for record, _ in results]
    assert len({r.id for r in records}) == 3
    assert [r.task_type for r in records] == ["a", "b", "c"]
    for position, record in enumerate(records):
        assert (record.owner, record.status, record.attempts) == ("alice", "pending", 0)
        # A microsecond apart: the batch is first in, first out in the order given.
        assert record.created_at == clock.now + timedelta(microseconds=position)
        assert record.exit_code is None
        assert timed.get_task(record.id) == record
    first, second, third = records
    assert (first.payload, first.priority, dict(first.required_labels)) == (
        b"\x00one",
        5,
        {"gpu": "yes"},
    )
    assert (second.required_cpu_cores, second.required_memory_gb, second.max_attempts) == (
        2,
        1.5,
        1,
    )
    assert (third.timeout_seconds, third.idempotency_key, third.priority) == (60, "k", 0)
    assert dict(third.required_labels) == {}
    assert timed.create_tasks(alice, []) == []
    with pytest.raises(NotFound):
        timed.create_tasks("nobody", [NewTask("a")])


def test_create_tasks_idempotency(store: Store, alice: str, bob: str) -> None:
    ((earlier, created),) = store.create_tasks(alice, [NewTask("first", idempotency_key="k1")])
    assert created
    results = store.create_tasks(
        alice,
        [
            NewTask("again", idempotency_key="k1"),
            NewTask("new", idempotency_key="k2"),
            NewTask("repeat", idempotency_key="k2"),  # the same key in one batch
            NewTask("plain"),
        ],
    )
    assert [created for _, created in results] == [False, True, False, True]
    assert results[0][0] == earlier
    assert results[2][0] == results[1][0]
    assert results[1][0].task_type == "new"
    assert store.get_task(results[1][0].id) == results[1][0]
    assert store.unfinished_task_count(alice) == 3
    # Keys are per owner.
    ((bobs, bob_created),) = store.create_tasks(bob, [NewTask("b", idempotency_key="k1")])
    assert bob_created
    assert bobs.id != earlier.id


def test_create_tasks_is_all_or_none(store: Store, alice: str, bob: str) -> None:
    with pytest.raises(InvalidArgument):
        store.create_tasks(alice, [NewTask("ok"), NewTask("bad", max_attempts=0)])
    with pytest.raises(InvalidArgument):
        store.create_tasks(alice, [NewTask("ok"), NewTask("bad", timeout_seconds=0)])
    assert store.unfinished_task_count(alice) == 0

    _register(store, "n1", alice)
    pending, assigned, cancelled = _submit(store, alice, 3)
    _assign(store, assigned, "n1")
    store.cancel_task(cancelled.id)
    _submit(store, bob, 5)  # another owner's pending tasks do not count
    # alice has 1 pending task now.
    with pytest.raises(LimitExceeded):
        store.create_tasks(
            alice, [NewTask("x", idempotency_key="fresh"), NewTask("y")], max_pending=2
        )
    assert store.unfinished_task_count(alice) == 2
    assert store.list_tasks(owner=alice, status="pending").items[0].id == pending.id
    # The key of the refused batch was not used up.
    ((record, created),) = store.create_tasks(
        alice, [NewTask("x", idempotency_key="fresh")], max_pending=2
    )
    assert created
    # At the limit, tasks already submitted (repeated keys) still come back.
    assert store.create_tasks(alice, [NewTask("x", idempotency_key="fresh")], max_pending=2) == [
        (record, False)
    ]
    with pytest.raises(LimitExceeded):
        store.create_tasks(alice, [NewTask("z")], max_pending=2)
    assert store.unfinished_task_count(alice) == 3


def test_create_tasks_same_key_concurrently_makes_one_task(
    store: Store, store_url: str, alice: str
) -> None:
    stores = [SqlStore(create_engine_for(store_url)) for _ in range(4)]
    barrier = threading.Barrier(len(stores))

    def submit(index: int) -> list[tuple[TaskRecord, bool]]:
        barrier.wait()
        return stores[index].create_tasks(
            alice,
            [NewTask("echo", idempotency_key="same"), NewTask("echo", idempotency_key=f"k{index}")],
        )

    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            outcomes = list(pool.map(submit, range(len(stores))))
    finally:
        for s in stores:
            s.close()
    shared = [outcome[0] for outcome in outcomes]
    assert len({record.id for record, _ in shared}) == 1
    assert [created for _, created in shared].count(True) == 1
    assert all(outcome[1][1] for outcome in outcomes)
    assert store.unfinished_task_count(alice) == 1 + len(stores)


# -- the queue ---------------------------------------------------------------------------


def test_queued_tasks_priority_then_owners_take_turns(
    timed: SqlStore, clock: FakeClock, alice: str, bob: str, carol: str
) -> None:
    def submit(owner: str, priority: int = 0) -> str:
        clock.advance(seconds=1)
        return _submit(timed, owner, priority=priority)[0].id

    a1, a2, a3, a4 = (submit(alice) for _ in range(4))
    b1, b2 = submit(bob), submit(bob)
    c1 = submit(carol, priority=5)
    a5 = submit(alice, priority=5)
    low = submit(carol, priority=-1)
    _register(timed, "n1", alice)
    _assign(timed, submit(bob), "n1")  # not pending: not queued
    timed.cancel_task(submit(bob, priority=9))

    assert _ids(timed.queued_tasks(per_owner=10, limit=100)) == [
        c1, a5, a1, b1, a2, b2, a3, a4, low,
    ]  # fmt: skip
    assert _ids(timed.queued_tasks(per_owner=10, limit=3)) == [c1, a5, a1]
    # At most per_owner of each owner, all priorities together: her most urgent first.
    assert _ids(timed.queued_tasks(per_owner=2, limit=100)) == [c1, a5, a1, b1, b2, low]
    assert _ids(timed.queued_tasks(per_owner=1, limit=100)) == [c1, a5, b1]

    (queued,) = [q for q in timed.queued_tasks(per_owner=10, limit=100) if q.id == a5]
    assert queued == QueuedTask(
        id=a5,
        owner_id=timed.get_user(alice).id,
        priority=5,
        required_cpu_cores=0,
        required_memory_gb=0.0,
        required_labels={},
    )


def test_queued_task_carries_requirements(store: Store, alice: str) -> None:
    (task,) = _submit(
        store, alice, required_cpu_cores=3, required_memory_gb=2.5, required_labels={"gpu": "a"}
    )
    (queued,) = store.queued_tasks(per_owner=5, limit=5)
    assert (queued.id, queued.required_cpu_cores, queued.required_memory_gb) == (task.id, 3, 2.5)
    assert dict(queued.required_labels) == {"gpu": "a"}


def test_node_loads(store: Store, alice: str) -> None:
    assert store.node_loads() == {}
    for node_id in ("n1", "n2", "idle"):
        _register(store, node_id, alice)
    small = _submit(store, alice, 2, required_cpu_cores=1, required_memory_gb=0.5)
    (big,) = _submit(store, alice, required_cpu_cores=3, required_memory_gb=4.0)
    (done,) = _submit(store, alice, required_cpu_cores=8, required_memory_gb=8.0)
    _submit(store, alice, required_cpu_cores=16)  # pending: held by no node
    _assign(store, small[0], "n1")
    _assign(store, big, "n1")
    _assign(store, small[1], "n2")
    _assign(store, done, "n2")
    _report(store, "n1", big.id, 1, ReportState.RUNNING)
    _report(store, "n2", done.id, 1, ReportState.COMPLETED)
    assert store.node_loads() == {
        "n1": NodeLoad(tasks=2, cpu_cores=4, memory_gb=4.5),
        "n2": NodeLoad(tasks=1, cpu_cores=1, memory_gb=0.5),
    }


# -- assignment --------------------------------------------------------------------------


def test_assign_tasks_compare_and_set(timed: SqlStore, clock: FakeClock, alice: str) -> None:
    _register(timed, "n1", alice)
    _register(timed, "n2", alice)
    first, second, cancelled, taken = _submit(timed, alice, 4, timeout_seconds=30)
    _assign(timed, taken, "n2")
    timed.cancel_task(cancelled.id)
    assert timed.assign_tasks([]) == []

    clock.advance(seconds=7)
    assigned = timed.assign_tasks(
        [(first.id, "n1"), (second.id, "n2"), (cancelled.id, "n1"), (taken.id, "n1"),
         ("0" * 32, "n1")]
    )  # fmt: skip
    assert sorted(_ids(assigned)) == sorted([first.id, second.id])
    by_id = {task.id: task for task in assigned}
    for task, node_id in ((first, "n1"), (second, "n2")):
        record = by_id[task.id]
        assert (record.status, record.assigned_node_id, record.attempts) == (
            "assigned",
            node_id,
            1,
        )
        assert record.lease_expires_at == clock.now + timedelta(seconds=30)
        assert timed.get_task(task.id) == record
    assert timed.get_task(cancelled.id).status == "cancelled"
    assert timed.get_task(taken.id).assigned_node_id == "n2"
    assert timed.get_task(taken.id).attempts == 1
    # Assigned already: a second assignment does nothing.
    assert timed.assign_tasks([(first.id, "n2")]) == []
    assert timed.get_task(first.id).assigned_node_id == "n1"


def test_assign_tasks_counts_attempts_across_requeues(
    timed: SqlStore, clock: FakeClock, alice: str
) -> None:
    _register(timed, "n1", alice)
    (task,) = _submit(timed, alice, max_attempts=3)
    assert _assign(timed, task, "n1").attempts == 1
    timed.requeue_tasks_of_nodes(["n1"])
    assert _assign(timed, task, "n1").attempts == 2


def test_assign_tasks_concurrently_assigns_each_task_once(
    store: Store, store_url: str, alice: str
) -> None:
    nodes = ["n0", "n1"]
    for node_id in nodes:
        _register(store, node_id, alice)
    schedulers = [SqlStore(create_engine_for(store_url)) for _ in nodes]
    try:
        for _round in range(5):
            task_ids = _ids(_submit(store, alice, 10))
            barrier = threading.Barrier(len(nodes))

            def assign(
                index: int,
                task_ids: list[str] = task_ids,
                barrier: threading.Barrier = barrier,
            ) -> list[str]:
                barrier.wait()
                pairs = [(task_id, nodes[index]) for task_id in task_ids]
                return _ids(schedulers[index].assign_tasks(pairs))

            with ThreadPoolExecutor(len(nodes)) as pool:
                results = list(pool.map(assign, range(len(nodes))))
            everything = [task_id for got in results for task_id in got]
            assert len(everything) == len(set(everything)), "a task was assigned twice"
            assert set(everything) <= set(task_ids)
            for index, got in enumerate(results):
                for task_id in got:
                    record = store.get_task(task_id)
                    assert (record.assigned_node_id, record.attempts) == (nodes[index], 1)
            for task_id in set(task_ids) - set(everything):
                assert store.get_task(task_id).status == "pending"
    finally:
        for s in schedulers:
            s.close()


def test_active_tasks_of_node_oldest_assignment_first(
    timed: SqlStore, clock: FakeClock, alice: str
) -> None:
    _register(timed, "n1", alice)
    _register(timed, "n2", alice)
    first, second, third, done, other = _submit(timed, alice, 5)
    _assign(timed, first, "n1")
    clock.advance(seconds=1)
    _assign(timed, second, "n1")
    clock.advance(seconds=1)
    _assign(timed, third, "n1")
    _assign(timed, done, "n1")
    _assign(timed, other, "n2")
    clock.advance(seconds=1)
    # Reports change the tasks, not when they were assigned.
    _report(timed, "n1", first.id, 1, ReportState.RUNNING, progress=0.5)
    _report(timed, "n1", done.id, 1, ReportState.COMPLETED)
    active = timed.active_tasks_of_node("n1")
    assert _ids(active) == [first.id, second.id, third.id]
    assert [t.status for t in active] == ["running", "assigned", "assigned"]
    assert timed.active_tasks_of_node("missing") == []


# -- reports -----------------------------------------------------------------------------


def test_report_tasks_running_then_completed(timed: SqlStore, clock: FakeClock, alice: str) -> None:
    _register(timed, "n1", alice)
    (task,) = _submit(timed, alice)
    _assign(timed, task, "n1")
    assert timed.report_tasks("n1", []) == []

    started = clock.advance(seconds=1)
    assert _report(timed, "n1", task.id, 1, ReportState.RUNNING, progress=0.25) is ACCEPTED
    running = timed.get_task(task.id)
    assert (running.status, running.progress, running.started_at) == ("running", 0.25, started)
    clock.advance(seconds=1)
    assert _report(timed, "n1", task.id, 1, ReportState.RUNNING, progress=0.5) is ACCEPTED
    assert timed.get_task(task.id).started_at == started  # set once
    assert timed.get_task(task.id).progress == 0.5

    finished = clock.advance(seconds=1)
    assert (
        _report(timed, "n1", task.id, 1, ReportState.COMPLETED, result=b"\x01r", exit_code=0)
        is ACCEPTED
    )
    done = timed.get_task(task.id)
    assert (done.status, done.result, done.exit_code, done.progress) == (
        "completed",
        b"\x01r",
        0,
        1.0,
    )
    assert (done.started_at, done.finished_at, done.lease_expires_at) == (started, finished, None)
    assert done.assigned_node_id == "n1"
    # The task has moved on: a late report changes nothing.
    assert _report(timed, "n1", task.id, 1, ReportState.FAILED, error="late") is STALE
    assert timed.get_task(task.id) == done


def test_report_tasks_batch_verdicts_in_order(
    timed: SqlStore, clock: FakeClock, alice: str
) -> None:
    _register(timed, "n1", alice)
    _register(timed, "n2", alice)
    quick, mine, theirs, never = _submit(timed, alice, 4)
    _assign(timed, quick, "n1")
    _assign(timed, mine, "n1")
    _assign(timed, theirs, "n2")
    verdicts = timed.report_tasks(
        "n1",
        [
            TaskReportIn(mine.id, 1, ReportState.RUNNING, progress=0.1),
            TaskReportIn("0" * 32, 1, ReportState.RUNNING),
            TaskReportIn(theirs.id, 1, ReportState.COMPLETED, result=b"forged"),
            TaskReportIn(never.id, 1, ReportState.COMPLETED),
            TaskReportIn(quick.id, 1, ReportState.RUNNING, progress=0.5),
            TaskReportIn(quick.id, 1, ReportState.COMPLETED, result=b"q", exit_code=3),
            TaskReportIn(quick.id, 1, ReportState.RUNNING, progress=0.7),  # after the end
        ],
    )
    assert verdicts == [ACCEPTED, NOT_FOUND, NOT_ASSIGNED, NOT_ASSIGNED, ACCEPTED, ACCEPTED, STALE]
    assert timed.get_task(mine.id).status == "running"
    assert timed.get_task(theirs.id).status == "assigned"
    assert timed.get_task(theirs.id).result is None
    assert timed.get_task(never.id).status == "pending"
    done = timed.get_task(quick.id)
    assert (done.status, done.result, done.exit_code, done.started_at) == (
        "completed",
        b"q",
        3,
        clock.now,
    )


def test_report_failed_retries_while_attempts_remain(
    timed: SqlStore, clock: FakeClock, alice: str
) -> None:
    _register(timed, "n1", alice)
    _register(timed, "n2", alice)
    (task,) = _submit(timed, alice, max_attempts=2)
    _assign(timed, task, "n1")
    _report(timed, "n1", task.id, 1, ReportState.RUNNING, progress=0.4)
    assert (
        _report(timed, "n1", task.id, 1, ReportState.FAILED, error="boom", exit_code=2) is ACCEPTED
    )
    retried = timed.get_task(task.id)
    assert (retried.status, retried.assigned_node_id, retried.attempts) == ("pending", None, 1)
    assert (retried.error, retried.exit_code, retried.progress) == ("boom", 2, 0.0)
    assert (retried.started_at, retried.finished_at, retried.lease_expires_at) == (
        None,
        None,
        None,
    )
    assert _report(timed, "n1", task.id, 1, ReportState.FAILED, error="again") is STALE

    assert _assign(timed, task, "n2").attempts == 2
    clock.advance(seconds=3)
    assert (
        _report(timed, "n2", task.id, 2, ReportState.FAILED, error="boom 2", exit_code=137)
        is ACCEPTED
    )
    failed = timed.get_task(task.id)
    assert (failed.status, failed.attempts, failed.error, failed.exit_code) == (
        "failed",
        2,
        "boom 2",
        137,
    )
    assert failed.finished_at == clock.now
    assert timed.queued_tasks(per_owner=10, limit=10) == []


def test_late_report_from_an_earlier_attempt_is_stale(
    timed: SqlStore, clock: FakeClock, alice: str
) -> None:
    _register(timed, "first", alice)
    _register(timed, "second", alice)
    (task,) = _submit(timed, alice, max_attempts=3)
    _assign(timed, task, "first")
    _report(timed, "first", task.id, 1, ReportState.RUNNING, progress=0.9)
    assert timed.requeue_tasks_of_nodes(["first"]) == [task.id]
    clock.advance(seconds=1)
    reassigned = _assign(timed, task, "second")
    assert (reassigned.attempts, reassigned.assigned_node_id) == (2, "second")
    before = timed.get_task(task.id)

    clock.advance(seconds=1)
    # The node that held attempt 1 reports late: stale, and nothing changes.
    assert (
        _report(timed, "first", task.id, 1, ReportState.COMPLETED, result=b"old", exit_code=0)
        is STALE
    )
    assert _report(timed, "first", task.id, 1, ReportState.FAILED, error="old") is STALE
    assert _report(timed, "first", task.id, 1, ReportState.RUNNING, progress=1.0) is STALE
    # It never held attempt 2, and the second node never held attempt 1.
    assert _report(timed, "first", task.id, 2, ReportState.COMPLETED, result=b"x") is NOT_ASSIGNED
    assert _report(timed, "second", task.id, 1, ReportState.COMPLETED) is NOT_ASSIGNED
    assert _report(timed, "second", task.id, 3, ReportState.COMPLETED) is NOT_ASSIGNED
    assert timed.get_task(task.id) == before

    assert _report(timed, "second", task.id, 2, ReportState.COMPLETED, result=b"new") is ACCEPTED
    assert timed.get_task(task.id).result == b"new"


def test_late_report_after_reassignment_to_the_same_node_is_stale(store: Store, alice: str) -> None:
    _register(store, "n1", alice)
    (task,) = _submit(store, alice)
    _assign(store, task, "n1")
    store.requeue_tasks_of_nodes(["n1"])
    _assign(store, task, "n1")
    assert _report(store, "n1", task.id, 1, ReportState.COMPLETED) is STALE
    assert store.get_task(task.id).status == "assigned"
    assert _report(store, "n1", task.id, 2, ReportState.COMPLETED) is ACCEPTED


def test_report_on_a_cancelled_task_is_stale(store: Store, alice: str) -> None:
    _register(store, "n1", alice)
    (task,) = _submit(store, alice)
    _assign(store, task, "n1")
    cancelled = store.cancel_task(task.id)
    assert _report(store, "n1", task.id, 1, ReportState.COMPLETED, result=b"late") is STALE
    assert store.get_task(task.id) == cancelled


def test_reports_fence_tasks_claimed_one_at_a_time(store: Store, alice: str) -> None:
    _register(store, "n1", alice)
    _register(store, "n2", alice)
    (task,) = _submit(store, alice)
    claimed = store.claim_next_task("n1", cpu_cores=4, memory_gb=8)
    assert claimed is not None
    assert claimed.id == task.id
    assert _report(store, "n2", task.id, 1, ReportState.COMPLETED) is NOT_ASSIGNED
    assert _report(store, "n1", task.id, 1, ReportState.COMPLETED, result=b"r") is ACCEPTED
    assert store.get_task(task.id).result == b"r"


# -- overdue and counts ------------------------------------------------------------------


def test_fail_overdue_tasks(timed: SqlStore, clock: FakeClock, alice: str) -> None:
    _register(timed, "n1", alice)
    short, running, pending = _submit(timed, alice, 3, timeout_seconds=10)
    (long,) = _submit(timed, alice, timeout_seconds=1000)
    (done,) = _submit(timed, alice, timeout_seconds=10)
    for task in (short, running, long, done):
        _assign(timed, task, "n1")
    _report(timed, "n1", running.id, 1, ReportState.RUNNING, progress=0.5)
    _report(timed, "n1", done.id, 1, ReportState.COMPLETED)

    clock.advance(seconds=10)  # the lease ends now: not yet overdue
    assert timed.fail_overdue_tasks(clock.now) == []
    now = clock.advance(seconds=1)
    overdue = timed.fail_overdue_tasks(now)
    assert sorted(_ids(overdue)) == sorted([short.id, running.id])
    # Returned as they were, with their node.
    by_id = {task.id: task for task in overdue}
    assert (by_id[short.id].status, by_id[short.id].assigned_node_id) == ("assigned", "n1")
    assert (by_id[running.id].status, by_id[running.id].progress) == ("running", 0.5)
    for task_id in (short.id, running.id):
        failed = timed.get_task(task_id)
        assert (failed.status, failed.error, failed.finished_at) == ("failed", "timed out", now)
        assert failed.lease_expires_at is None
    assert timed.get_task(long.id).status == "assigned"
    assert timed.get_task(pending.id).status == "pending"
    assert timed.get_task(done.id).status == "completed"
    assert timed.fail_overdue_tasks(now) == []
    assert _report(timed, "n1", short.id, 1, ReportState.COMPLETED) is STALE


def test_unfinished_task_count(store: Store, alice: str, bob: str) -> None:
    assert store.unfinished_task_count(alice) == 0
    assert store.unfinished_task_count("nobody") == 0
    _register(store, "n1", alice)
    _pending, assigned, running, done, failed, cancelled = _submit(store, alice, 6, max_attempts=1)
    for task in (assigned, running, done, failed):
        _assign(store, task, "n1")
    _report(store, "n1", running.id, 1, ReportState.RUNNING)
    _report(store, "n1", done.id, 1, ReportState.COMPLETED)
    _report(store, "n1", failed.id, 1, ReportState.FAILED, error="x")
    store.cancel_task(cancelled.id)
    _submit(store, bob, 2)
    assert store.get_task(failed.id).status == "failed"
    assert store.unfinished_task_count(alice) == 3
    assert store.unfinished_task_count("ALICE") == 3
    assert store.unfinished_task_count(bob) == 2


def test_report_tasks_many_results_in_one_batch(
    timed: SqlStore, clock: FakeClock, alice: str
) -> None:
    """A worker's batch: several results and starts of the same shape go in together."""
    _register(timed, "n1", alice)
    tasks = _submit(timed, alice, 6)
    for task in tasks:
        _assign(timed, task, "n1")
    finished, started = tasks[:4], tasks[4:]
    verdicts = timed.report_tasks(
        "n1",
        [
            *(
                TaskReportIn(t.id, 1, ReportState.COMPLETED, result=t.id.encode(), exit_code=0)
                for t in finished
            ),
            *(TaskReportIn(t.id, 1, ReportState.RUNNING, progress=0.5) for t in started),
        ],
    )
    assert verdicts == [ACCEPTED] * 6
    for task in finished:
        done = timed.get_task(task.id)
        assert (done.status, done.result) == ("completed", task.id.encode())
    for task in started:
        assert (timed.get_task(task.id).status, timed.get_task(task.id).progress) == (
            "running",
            0.5,
        )
