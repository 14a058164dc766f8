"""The Store contract: every backend (SQLite file, real PostgreSQL) passes these tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nodepool.store import (
    UNSET,
    AlreadyExists,
    AuditEntry,
    Conflict,
    Heartbeat,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    SqlStore,
    Store,
    StoreUnavailable,
    create_engine_for,
    current_revision,
    head_revision,
    migrate,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)


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
    store.create_user("alice", "hash-a", email="alice@example.com")
    return "alice"


@pytest.fixture
def bob(store: Store) -> str:
    store.create_user("bob", "hash-b")
    return "bob"


def _register(store: Store, node_id: str, owner: str, **kwargs: object) -> None:
    store.register_node(
        node_id, owner=owner, ip_address="10.0.0.1", port=50052, cpu_cores=4, memory_gb=8.0,
        **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


# -- migrations and operations -----------------------------------------------------------


def test_migrate_is_idempotent(store_url: str, store: Store) -> None:
    store.create_user("keeper", "h")
    migrate(store_url)
    migrate(store_url)
    assert current_revision(store_url) == head_revision()
    assert store.get_user("keeper").username == "keeper"


def test_ping(store: Store) -> None:
    store.ping()


def test_unusable_database_raises_store_unavailable(store_backend: str, tmp_path: Path) -> None:
    if store_backend == "postgresql":
        url = "postgresql://postgres@127.0.0.1:1/none"  # nothing listens on port 1
    else:
        garbage = tmp_path / "garbage.db"
        garbage.write_bytes(b"this is not an SQLite database" * 100)
        url = f"sqlite:///{garbage}"
    unusable = SqlStore(create_engine_for(url))
    try:
        with pytest.raises(StoreUnavailable) as info:
            unusable.ping()
        assert "SELECT" not in str(info.value)
        with pytest.raises(StoreUnavailable):
            unusable.get_user("alice")
    finally:
        unusable.close()


def test_backup(store: SqlStore, store_backend: str, alice: str, tmp_path: Path) -> None:
    target = tmp_path / "backups" / "nodepool-backup.db"
    if store_backend != "sqlite":
        with pytest.raises(NotImplementedError):
            store.backup(target)
        return
    store.backup(target)
    assert target.stat().st_mode & 0o777 == 0o600
    copy = SqlStore(create_engine_for(f"sqlite:///{target}"))
    try:
        assert copy.get_user("alice").email == "alice@example.com"
    finally:
        copy.close()
    store.backup(target)  # replaces an existing backup
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


# -- users ---------------------------------------------------------------------------


def test_create_and_get_user(timed: SqlStore, clock: FakeClock) -> None:
    user = timed.create_user("Carol", "h1", email="c@example.com", roles=["user", "admin"])
    assert user.username == "Carol"
    assert user.roles == {"user", "admin"}
    assert user.is_active
    assert user.failed_logins == 0
    assert user.created_at == clock.now
    assert user.created_at.tzinfo is not None
    assert timed.get_user("carol") == user
    assert timed.get_user("CAROL") == user
    assert timed.get_user_by_id(user.id) == user


def test_usernames_are_unique_ignoring_case(store: Store, alice: str) -> None:
    with pytest.raises(AlreadyExists):
        store.create_user("ALICE", "h")
    with pytest.raises(AlreadyExists):
        store.create_user("alice", "h")


def test_unknown_user(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get_user("nobody")
    with pytest.raises(NotFound):
        store.get_user_by_id(12345)
    with pytest.raises(NotFound):
        store.update_user_fields("nobody", email="x")
    with pytest.raises(NotFound):
        store.add_role("nobody", "admin")
    with pytest.raises(NotFound):
        store.record_login_success("nobody")


def test_invalid_role_is_refused(store: Store, alice: str) -> None:
    with pytest.raises(InvalidArgument):
        store.create_user("dave", "h", roles=["root"])
    with pytest.raises(InvalidArgument):
        store.add_role(alice, "superuser")


def test_update_user_fields(timed: SqlStore, clock: FakeClock) -> None:
    timed.create_user("erin", "old", email="e@example.com")
    clock.advance(minutes=5)
    user = timed.update_user_fields("ERIN", email=None)
    assert user.email is None
    assert user.password_hash == "old"
    assert user.updated_at == clock.now
    clock.advance(minutes=5)
    user = timed.update_user_fields("erin", password_hash="new", is_active=False)
    assert (user.password_hash, user.is_active) == ("new", False)
    assert user.password_changed_at == clock.now
    assert user.email is None
    assert timed.update_user_fields("erin", email=UNSET).email is None


def test_roles(store: Store, alice: str) -> None:
    assert store.add_role(alice, "admin").roles == {"user", "admin"}
    assert store.add_role(alice, "admin").roles == {"user", "admin"}
    assert store.remove_role(alice, "user").roles == {"admin"}
    assert store.remove_role(alice, "user").roles == {"admin"}
    assert store.set_roles(alice, ["node", "user"]).roles == {"node", "user"}
    assert store.set_roles(alice, []).roles == frozenset()
    assert store.get_user(alice).roles == frozenset()


def test_login_bookkeeping(timed: SqlStore, clock: FakeClock) -> None:
    timed.create_user("frank", "h")
    for expected in (1, 2):
        user = timed.record_login_failure("frank", lock_after=3, lock_for=timedelta(minutes=15))
        assert (user.failed_logins, user.locked_until) == (expected, None)
    user = timed.record_login_failure("frank", lock_after=3, lock_for=timedelta(minutes=15))
    assert user.failed_logins == 3
    assert user.locked_until == clock.now + timedelta(minutes=15)
    clock.advance(hours=1)
    user = timed.record_login_success("frank")
    assert (user.failed_logins, user.locked_until, user.last_login) == (0, None, clock.now)


def test_concurrent_login_failures_are_all_counted(store: Store, store_url: str) -> None:
    store.create_user("grace", "h")
    stores = [SqlStore(create_engine_for(store_url)) for _ in range(4)]
    try:

        def fail(s: SqlStore) -> None:
            for _ in range(5):
                s.record_login_failure("grace", lock_after=100, lock_for=timedelta(seconds=1))

        with ThreadPoolExecutor(len(stores)) as pool:
            list(pool.map(fail, stores))
    finally:
        for s in stores:
            s.close()
    assert store.get_user("grace").failed_logins == 20


def test_the_last_active_admin_is_kept(store: Store) -> None:
    store.create_user("ada", "h", roles=["user", "admin"])
    store.create_user("ben", "h", roles=["user", "admin"])
    store.remove_role("ben", "admin", keep_an_admin=True)
    with pytest.raises(Conflict):
        store.remove_role("ada", "admin", keep_an_admin=True)
    with pytest.raises(Conflict):
        store.update_user_fields("ada", is_active=False, keep_an_admin=True)
    # Nothing changed by the refused transactions.
    ada = store.get_user("ada")
    assert ("admin" in ada.roles, ada.is_active) == (True, True)
    # Without the flag the store does as told (the domain always passes it).
    store.update_user_fields("ada", is_active=False)
    assert not store.get_user("ada").is_active


def test_two_admins_demoting_each_other_at_once_keep_one(store: Store, store_url: str) -> None:
    """The count is taken under a lock: two concurrent demotions cannot both pass it."""
    stores = [SqlStore(create_engine_for(store_url)) for _ in range(2)]
    try:
        for round_ in range(4):
            names = [f"adm{round_}a", f"adm{round_}b"]
            for name in names:
                store.create_user(name, "h", roles=["admin"])
            # Only these two are administrators now.
            for other in {u.username for u in store.list_users(limit=500).items} - set(names):
                store.remove_role(other, "admin")
            barrier = threading.Barrier(2)

            def demote(pair: tuple[SqlStore, str], barrier: threading.Barrier = barrier) -> bool:
                own, name = pair
                barrier.wait()
                try:
                    own.remove_role(name, "admin", keep_an_admin=True)
                except Conflict:
                    return False
                return True

            with ThreadPoolExecutor(2) as pool:
                outcomes = list(pool.map(demote, zip(stores, names, strict=True)))
            assert sorted(outcomes) == [False, True]
            assert sum("admin" in store.get_user(n).roles for n in names) == 1
    finally:
        for s in stores:
            s.close()


def test_list_users_pages(store: Store) -> None:
    names = [f"user{i:02d}" for i in range(7)]
    for name in names:
        store.create_user(name, "h", roles=["user"])
    seen: list[str] = []
    cursor = None
    while True:
        page = store.list_users(limit=3, cursor=cursor)
        assert len(page.items) <= 3
        seen += [u.username for u in page.items]
        assert all(u.roles == {"user"} for u in page.items)
        items, cursor = page  # unpacks as (records, next_cursor)
        assert items is page.items
        if cursor is None:
            break
    assert seen == names
    with pytest.raises(InvalidArgument):
        store.list_users(cursor="not-a-cursor!")
    with pytest.raises(InvalidArgument):
        store.list_users(limit=0)


# -- nodes ---------------------------------------------------------------------------


def test_register_node_then_update_by_same_owner(
    timed: SqlStore, clock: FakeClock, alice: str
) -> None:
    node, created = timed.register_node(
        "node-1",
        owner="ALICE",
        ip_address="10.0.0.1",
        port=50052,
        cpu_cores=4,
        memory_gb=8.0,
        disk_gb=100.0,
        labels={"zone": "a"},
    )
    assert created
    assert (node.id, node.owner, node.status) == ("node-1", "alice", "online")
    assert (node.cpu_cores, node.memory_gb, node.disk_gb) == (4, 8.0, 100.0)
    assert node.labels == {"zone": "a"}
    assert node.metrics == {}
    assert not node.drain_requested
    assert node.registered_at == node.last_heartbeat == clock.now
    first_seen = clock.now
    clock.advance(minutes=1)
    node, created = timed.register_node(
        "node-1", owner=alice, ip_address="10.0.0.2", port=1, cpu_cores=8
    )
    assert not created
    assert (node.ip_address, node.port, node.cpu_cores, node.labels) == ("10.0.0.2", 1, 8, {})
    assert node.registered_at == first_seen
    assert node.last_heartbeat == clock.now
    assert timed.get_node("node-1") == node
    assert timed.count_nodes() == 1


def test_register_node_held_by_another_owner_conflicts(store: Store, alice: str, bob: str) -> None:
    _register(store, "node-1", alice)
    with pytest.raises(Conflict):
        _register(store, "node-1", bob)
    assert store.get_node("node-1").owner == alice


def test_register_node_unknown_owner(store: Store) -> None:
    with pytest.raises(NotFound):
        _register(store, "node-1", "nobody")


def test_register_node_quota(store: Store, alice: str, bob: str) -> None:
    _register(store, "a1", alice, max_nodes_per_owner=2)
    _register(store, "a2", alice, max_nodes_per_owner=2)
    with pytest.raises(LimitExceeded):
        _register(store, "a3", alice, max_nodes_per_owner=2)
    _register(store, "a2", alice, max_nodes_per_owner=2)  # re-registration is not refused
    _register(store, "b1", bob, max_nodes_per_owner=2)
    assert store.count_nodes(owner=alice) == 2


def test_register_node_quota_holds_under_concurrency(
    store: Store, store_url: str, alice: str
) -> None:
    stores = [SqlStore(create_engine_for(store_url)) for _ in range(4)]
    barrier = threading.Barrier(len(stores))

    def register(index: int) -> bool:
        barrier.wait()
        try:
            _register(stores[index], f"n{index}", alice, max_nodes_per_owner=2)
        except LimitExceeded:
            return False
        return True

    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            outcomes = list(pool.map(register, range(len(stores))))
    finally:
        for s in stores:
            s.close()
    assert outcomes.count(True) == 2
    assert store.count_nodes(owner=alice) == 2


def test_list_and_count_nodes(store: Store, alice: str, bob: str) -> None:
    for i in range(5):
        _register(store, f"a{i}", alice)
    for i in range(3):
        _register(store, f"b{i}", bob)
    store.apply_heartbeats([Heartbeat("a1", "busy", {}, datetime.now(UTC))])
    assert store.count_nodes() == 8
    assert store.count_nodes(owner="BOB") == 3
    assert store.count_nodes(owner="nobody") == 0
    assert store.count_nodes(status="busy") == 1
    assert store.count_nodes(owner=bob, status="busy") == 0

    page = store.list_nodes(owner=alice, limit=2)
    assert [n.id for n in page.items] == ["a0", "a1"]
    ids = [n.id for n in page.items]
    while page.next_cursor:
        page = store.list_nodes(owner=alice, limit=2, cursor=page.next_cursor)
        ids += [n.id for n in page.items]
    assert ids == [f"a{i}" for i in range(5)]
    assert [n.id for n in store.list_nodes(status="busy").items] == ["a1"]
    assert store.list_nodes(owner="nobody").items == []
    everything = store.list_nodes(limit=100)
    assert len(everything.items) == 8
    assert everything.next_cursor is None


def test_remove_node(store: Store, alice: str, bob: str) -> None:
    _register(store, "node-1", alice)
    with pytest.raises(NotFound):
        store.remove_node("node-1", owner=bob)
    store.remove_node("node-1", owner="Alice")
    with pytest.raises(NotFound):
        store.get_node("node-1")
    with pytest.raises(NotFound):
        store.remove_node("node-1")


def test_remove_node_requeues_its_active_tasks(store: Store, alice: str) -> None:
    _register(store, "node-1", alice)
    task, _ = store.create_task(owner=alice, task_type="echo")
    assert store.claim_next_task("node-1", cpu_cores=4, memory_gb=8) is not None
    store.remove_node("node-1")
    requeued = store.get_task(task.id)
    assert (requeued.status, requeued.assigned_node_id) == ("pending", None)


def test_set_node_drain(store: Store, alice: str) -> None:
    _register(store, "node-1", alice)
    assert store.set_node_drain("node-1", True).drain_requested
    _register(store, "node-1", alice)
    assert store.get_node("node-1").drain_requested  # kept across re-registration
    assert not store.set_node_drain("node-1", False).drain_requested
    with pytest.raises(NotFound):
        store.set_node_drain("missing", True)


def test_apply_heartbeats_batch(store: Store, alice: str) -> None:
    for i in range(3):
        _register(store, f"n{i}", alice)
    at = datetime.now(UTC) + timedelta(seconds=1)
    store.apply_heartbeats(
        [
            Heartbeat("n0", "busy", {"cpu_percent": 91.5, "running_tasks": 2}, at),
            Heartbeat("n1", "online", {"cpu_percent": 3.0}, at),
            Heartbeat("n1", "busy", {"cpu_percent": 2.0}, at - timedelta(seconds=1)),
            Heartbeat("gone", "online", {}, at),  # removed node: ignored
        ]
    )
    n0, n1, n2 = (store.get_node(f"n{i}") for i in range(3))
    assert (n0.status, n0.metrics, n0.last_heartbeat) == (
        "busy",
        {"cpu_percent": 91.5, "running_tasks": 2},
        at,
    )
    assert (n1.status, n1.metrics) == ("online", {"cpu_percent": 3.0})
    assert n2.metrics == {}
    # An older beat delivered late never rewinds the node.
    store.apply_heartbeats([Heartbeat("n0", "online", {}, at - timedelta(minutes=1))])
    assert store.get_node("n0").status == "busy"
    store.apply_heartbeats([])


def test_mark_stale_nodes_offline(timed: SqlStore, clock: FakeClock, alice: str) -> None:
    _register(timed, "old", alice)
    _register(timed, "quiet", alice)
    clock.advance(minutes=10)
    _register(timed, "fresh", alice)
    timed.apply_heartbeats([Heartbeat("quiet", "online", {}, clock.now)])
    assert timed.mark_stale_nodes_offline(clock.now - timedelta(minutes=2)) == ["old"]
    assert timed.get_node("old").status == "offline"
    assert timed.mark_stale_nodes_offline(clock.now - timedelta(minutes=2)) == []
    clock.advance(minutes=10)
    assert timed.mark_stale_nodes_offline(clock.now) == ["fresh", "quiet"]


def test_delete_offline_nodes_before(timed: SqlStore, clock: FakeClock, alice: str) -> None:
    _register(timed, "ancient", alice)
    _register(timed, "live", alice)
    clock.advance(days=31)
    _register(timed, "recent", alice)
    timed.mark_stale_nodes_offline(clock.now)
    _register(timed, "live", alice)  # back online
    task, _ = timed.create_task(owner=alice, task_type="echo")
    timed.claim_next_task("ancient", cpu_cores=4, memory_gb=8)
    timed.complete_task(task.id, "ancient", b"done")
    assert timed.delete_offline_nodes_before(clock.now - timedelta(days=30)) == 1
    assert sorted(n.id for n in timed.list_nodes().items) == ["live", "recent"]
    # Finished tasks keep their history; the node reference is cleared.
    assert timed.get_task(task.id).assigned_node_id is None


# -- tasks ---------------------------------------------------------------------------


def test_create_and_get_task(timed: SqlStore, clock: FakeClock, alice: str) -> None:
    task, created = timed.create_task(
        owner="ALICE",
        task_type="sha256",
        payload=b"\x00\xffdata",
        required_cpu_cores=2,
        required_memory_gb=1.5,
        max_attempts=5,
        timeout_seconds=60,
    )
    assert created
    assert len(task.id) == 32
    assert int(task.id, 16) >= 0
    assert (task.owner, task.task_type, task.status) == ("alice", "sha256", "pending")
    assert task.payload == b"\x00\xffdata"
    assert isinstance(task.payload, bytes)
    assert (task.required_cpu_cores, task.required_memory_gb) == (2, 1.5)
    assert (task.attempts, task.max_attempts, task.timeout_seconds) == (0, 5, 60)
    assert (task.progress, task.result, task.error, task.assigned_node_id) == (
        0.0,
        None,
        None,
        None,
    )
    assert task.created_at == task.updated_at == clock.now
    assert timed.get_task(task.id) == task
    with pytest.raises(NotFound):
        timed.get_task("0" * 32)
    with pytest.raises(NotFound):
        timed.create_task(owner="nobody", task_type="echo")
    with pytest.raises(InvalidArgument):
        timed.create_task(owner=alice, task_type="echo", max_attempts=0)


def test_create_task_idempotency_key(store: Store, alice: str, bob: str) -> None:
    first, created = store.create_task(owner=alice, task_type="echo", idempotency_key="k1")
    again, created_again = store.create_task(
        owner=alice, task_type="other", payload=b"ignored", idempotency_key="k1"
    )
    assert created
    assert not created_again
    assert again == first
    bobs, bob_created = store.create_task(owner=bob, task_type="echo", idempotency_key="k1")
    assert bob_created
    assert bobs.id != first.id


def test_create_task_idempotency_under_concurrency(
    store: Store, store_url: str, alice: str
) -> None:
    stores = [SqlStore(create_engine_for(store_url)) for _ in range(4)]
    barrier = threading.Barrier(len(stores))

    def submit(s: SqlStore) -> str:
        barrier.wait()
        return s.create_task(owner=alice, task_type="echo", idempotency_key="same")[0].id

    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            ids = set(pool.map(submit, stores))
    finally:
        for s in stores:
            s.close()
    assert len(ids) == 1
    assert len(store.list_tasks(owner=alice).items) == 1


def test_list_tasks(timed: SqlStore, clock: FakeClock, alice: str, bob: str) -> None:
    created = []
    for i in range(5):
        clock.advance(seconds=1)
        created.append(timed.create_task(owner=alice, task_type=f"t{i}")[0].id)
    timed.create_task(owner=bob, task_type="b")
    timed.cancel_task(created[0])
    newest_first = list(reversed(created))
    page = timed.list_tasks(owner="alice", limit=2)
    ids = [t.id for t in page.items]
    while page.next_cursor:
        page = timed.list_tasks(owner=alice, limit=2, cursor=page.next_cursor)
        ids += [t.id for t in page.items]
    assert ids == newest_first
    assert [t.id for t in timed.list_tasks(owner=alice, status="cancelled").items] == [created[0]]
    assert len(timed.list_tasks().items) == 6
    _register(timed, "node-1", alice)
    claimed = timed.claim_next_task("node-1", cpu_cores=1, memory_gb=1)
    assert claimed is not None
    assert [t.id for t in timed.list_tasks(assigned_node_id="node-1").items] == [claimed.id]
    with pytest.raises(InvalidArgument):
        timed.list_tasks(cursor="bogus")


def test_tasks_with_same_creation_time_page_without_loss(timed: SqlStore, alice: str) -> None:
    ids = {timed.create_task(owner=alice, task_type="same")[0].id for _ in range(5)}
    seen: list[str] = []
    cursor = None
    while True:
        items, cursor = timed.list_tasks(limit=2, cursor=cursor)
        seen += [t.id for t in items]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids)


def test_cancel_task(store: Store, alice: str, bob: str) -> None:
    task, _ = store.create_task(owner=alice, task_type="echo")
    with pytest.raises(NotFound):
        store.cancel_task(task.id, owner=bob)
    cancelled = store.cancel_task(task.id, owner="Alice")
    assert cancelled.status == "cancelled"
    assert cancelled.finished_at is not None
    with pytest.raises(Conflict):
        store.cancel_task(task.id)
    with pytest.raises(NotFound):
        store.cancel_task("f" * 32)


def test_cancel_running_task(store: Store, alice: str) -> None:
    _register(store, "node-1", alice)
    task, _ = store.create_task(owner=alice, task_type="echo")
    store.claim_next_task("node-1", cpu_cores=4, memory_gb=8)
    store.update_task_progress(task.id, "node-1", 0.5)
    assert store.cancel_task(task.id).status == "cancelled"
    with pytest.raises(Conflict):
        store.complete_task(task.id, "node-1", b"late")


def test_claim_picks_oldest_fitting_task(timed: SqlStore, clock: FakeClock, alice: str) -> None:
    _register(timed, "small", alice)
    big, _ = timed.create_task(owner=alice, task_type="big", required_cpu_cores=16)
    clock.advance(seconds=1)
    first, _ = timed.create_task(owner=alice, task_type="a", timeout_seconds=30)
    clock.advance(seconds=1)
    second, _ = timed.create_task(owner=alice, task_type="b", required_memory_gb=4)
    clock.advance(seconds=1)
    heavy, _ = timed.create_task(owner=alice, task_type="c", required_memory_gb=64)

    claimed = timed.claim_next_task("small", cpu_cores=4, memory_gb=8)
    assert claimed is not None
    assert claimed.id == first.id
    assert (claimed.status, claimed.assigned_node_id, claimed.attempts) == ("assigned", "small", 1)
    assert claimed.lease_expires_at == clock.now + timedelta(seconds=30)
    claimed = timed.claim_next_task("small", cpu_cores=4, memory_gb=8)
    assert claimed is not None
    assert claimed.id == second.id
    assert timed.claim_next_task("small", cpu_cores=4, memory_gb=8) is None
    assert timed.get_task(big.id).status == "pending"
    assert timed.get_task(heavy.id).status == "pending"


def test_claim_is_exclusive_under_concurrency(store: Store, store_url: str, alice: str) -> None:
    for i in range(6):
        _register(store, f"n{i}", alice)
    task_ids = {store.create_task(owner=alice, task_type="echo")[0].id for _ in range(40)}
    workers = [SqlStore(create_engine_for(store_url)) for _ in range(6)]
    barrier = threading.Barrier(len(workers))

    def drain(index: int) -> list[str]:
        barrier.wait()
        claimed = []
        while task := workers[index].claim_next_task(f"n{index}", cpu_cores=4, memory_gb=8):
            claimed.append(task.id)
        return claimed

    try:
        with ThreadPoolExecutor(len(workers)) as pool:
            results = list(pool.map(drain, range(len(workers))))
    finally:
        for worker in workers:
            worker.close()
    everything = [task_id for claimed in results for task_id in claimed]
    assert len(everything) == len(set(everything)), "a task was claimed twice"
    assert set(everything) == task_ids
    for index, claimed in enumerate(results):
        for task_id in claimed:
            assert store.get_task(task_id).assigned_node_id == f"n{index}"


def test_task_lifecycle_by_assigned_node(timed: SqlStore, clock: FakeClock, alice: str) -> None:
    _register(timed, "node-1", alice)
    _register(timed, "node-2", alice)
    task, _ = timed.create_task(owner=alice, task_type="echo", payload=b"hi")
    timed.claim_next_task("node-1", cpu_cores=4, memory_gb=8)
    clock.advance(seconds=5)
    with pytest.raises(Conflict):
        timed.update_task_progress(task.id, "node-2", 0.1)
    with pytest.raises(NotFound):
        timed.update_task_progress("0" * 32, "node-1", 0.1)
    with pytest.raises(InvalidArgument):
        timed.update_task_progress(task.id, "node-1", 1.5)
    running = timed.update_task_progress(task.id, "node-1", 0.25)
    assert (running.status, running.progress, running.started_at) == ("running", 0.25, clock.now)
    started = clock.now
    clock.advance(seconds=5)
    assert timed.update_task_progress(task.id, "node-1", 0.5).started_at == started
    with pytest.raises(Conflict):
        timed.complete_task(task.id, "node-2", b"forged")
    done = timed.complete_task(task.id, "node-1", b"\x01result")
    assert (done.status, done.result, done.progress) == ("completed", b"\x01result", 1.0)
    assert done.finished_at == clock.now
    assert done.lease_expires_at is None
    with pytest.raises(Conflict):
        timed.complete_task(task.id, "node-1", b"again")
    with pytest.raises(Conflict):
        timed.fail_task(task.id, "node-1", "late")


def test_fail_task_retries_then_fails(store: Store, alice: str) -> None:
    _register(store, "node-1", alice)
    task, _ = store.create_task(owner=alice, task_type="echo", max_attempts=2)
    store.claim_next_task("node-1", cpu_cores=4, memory_gb=8)
    retried = store.fail_task(task.id, "node-1", "boom")
    assert (retried.status, retried.assigned_node_id, retried.error) == ("pending", None, "boom")
    assert retried.finished_at is None
    store.claim_next_task("node-1", cpu_cores=4, memory_gb=8)
    failed = store.fail_task(task.id, "node-1", "boom again")
    assert (failed.status, failed.attempts, failed.error) == ("failed", 2, "boom again")
    assert failed.finished_at is not None


def test_fail_task_without_retry(store: Store, alice: str) -> None:
    _register(store, "node-1", alice)
    task, _ = store.create_task(owner=alice, task_type="echo", max_attempts=5)
    store.claim_next_task("node-1", cpu_cores=4, memory_gb=8)
    assert store.fail_task(task.id, "node-1", "bad payload", retry=False).status == "failed"


def test_requeue_tasks_of_nodes(store: Store, alice: str) -> None:
    for name in ("lost", "fine"):
        _register(store, name, alice)
    retry, _ = store.create_task(owner=alice, task_type="a", max_attempts=3)
    last_try, _ = store.create_task(owner=alice, task_type="b", max_attempts=1)
    other, _ = store.create_task(owner=alice, task_type="c")
    store.claim_next_task("lost", cpu_cores=4, memory_gb=8)
    store.claim_next_task("lost", cpu_cores=4, memory_gb=8)
    store.claim_next_task("fine", cpu_cores=4, memory_gb=8)
    touched = store.requeue_tasks_of_nodes(["lost", "unknown"])
    assert touched == sorted([retry.id, last_try.id])
    assert store.get_task(retry.id).status == "pending"
    assert store.get_task(retry.id).assigned_node_id is None
    assert store.get_task(last_try.id).status == "failed"
    assert store.get_task(other.id).status == "assigned"
    assert store.requeue_tasks_of_nodes([]) == []


def test_requeue_expired_tasks(timed: SqlStore, clock: FakeClock, alice: str) -> None:
    _register(timed, "node-1", alice)
    short, _ = timed.create_task(owner=alice, task_type="s", timeout_seconds=10)
    long, _ = timed.create_task(owner=alice, task_type="l", timeout_seconds=1000)
    timed.claim_next_task("node-1", cpu_cores=4, memory_gb=8)
    timed.claim_next_task("node-1", cpu_cores=4, memory_gb=8)
    clock.advance(seconds=11)
    assert timed.requeue_expired_tasks() == [short.id]
    assert timed.get_task(short.id).status == "pending"
    assert timed.get_task(long.id).status == "assigned"


def test_delete_finished_tasks_before(timed: SqlStore, clock: FakeClock, alice: str) -> None:
    _register(timed, "node-1", alice)
    old_done, _ = timed.create_task(owner=alice, task_type="x")
    timed.claim_next_task("node-1", cpu_cores=4, memory_gb=8)
    timed.complete_task(old_done.id, "node-1", b"")
    old_cancelled, _ = timed.create_task(owner=alice, task_type="x")
    timed.cancel_task(old_cancelled.id)
    old_pending, _ = timed.create_task(owner=alice, task_type="x")
    clock.advance(days=8)
    recent, _ = timed.create_task(owner=alice, task_type="x")
    timed.cancel_task(recent.id)
    cutoff = clock.now - timedelta(days=7)
    assert timed.delete_finished_tasks_before(cutoff, statuses=["completed"]) == 1
    assert timed.delete_finished_tasks_before(cutoff) == 1
    remaining = {t.id for t in timed.list_tasks().items}
    assert remaining == {old_pending.id, recent.id}
    with pytest.raises(InvalidArgument):
        timed.delete_finished_tasks_before(cutoff, statuses=["pending"])


# -- api keys ------------------------------------------------------------------------


def test_api_keys(timed: SqlStore, clock: FakeClock, alice: str, bob: str) -> None:
    key = timed.create_api_key(
        owner="ALICE",
        lookup_id="np_abc123",
        secret_hash="argon2-hash",
        name="ci",
        scopes=["user"],
        expires_at=clock.now + timedelta(days=30),
    )
    assert (key.owner, key.lookup_id, key.secret_hash, key.name) == (
        "alice",
        "np_abc123",
        "argon2-hash",
        "ci",
    )
    assert key.scopes == {"user"}
    assert key.created_at == clock.now
    assert (key.last_used_at, key.revoked_at) == (None, None)
    assert timed.get_api_key_by_lookup_id("np_abc123") == key
    with pytest.raises(AlreadyExists):
        timed.create_api_key(
            owner=bob, lookup_id="np_abc123", secret_hash="x", name="dup", scopes=[]
        )
    with pytest.raises(InvalidArgument):
        timed.create_api_key(owner=bob, lookup_id="np_x", secret_hash="x", name="n", scopes=["god"])
    with pytest.raises(NotFound):
        timed.create_api_key(owner="nobody", lookup_id="np_y", secret_hash="x", name="n", scopes=[])
    timed.create_api_key(owner=alice, lookup_id="np_second", secret_hash="h", name="b", scopes=[])
    assert [k.lookup_id for k in timed.list_api_keys(alice)] == ["np_abc123", "np_second"]
    assert timed.list_api_keys(bob) == []

    used_at = clock.advance(minutes=1)
    timed.touch_api_key_last_used("np_abc123")
    timed.touch_api_key_last_used("np_abc123", at=used_at - timedelta(minutes=5))  # never back
    timed.touch_api_key_last_used("np_unknown")
    assert timed.get_api_key_by_lookup_id("np_abc123").last_used_at == used_at

    with pytest.raises(NotFound):
        timed.revoke_api_key("np_abc123", owner=bob)
    revoked = timed.revoke_api_key("np_abc123", owner=alice)
    assert revoked.revoked_at == clock.now
    clock.advance(minutes=1)
    assert timed.revoke_api_key("np_abc123").revoked_at == revoked.revoked_at
    with pytest.raises(NotFound):
        timed.get_api_key_by_lookup_id("np_missing")
    with pytest.raises(NotFound):
        timed.revoke_api_key("np_missing")


def test_api_keys_bound_to_a_device(store: Store, alice: str) -> None:
    device = "spiffe://nodepool.test/client/alice-laptop"
    bound = store.create_api_key(
        owner=alice, lookup_id="np_bound", secret_hash="h", name="b", scopes=[], bound_device=device
    )
    free = store.create_api_key(
        owner=alice, lookup_id="np_free", secret_hash="h", name="f", scopes=[]
    )
    assert (bound.bound_device, free.bound_device) == (device, None)
    assert store.get_api_key_by_lookup_id("np_bound").bound_device == device
    assert {k.lookup_id: k.bound_device for k in store.list_api_keys(alice)} == {
        "np_bound": device,
        "np_free": None,
    }


def test_revoke_api_keys_of_user(store: Store, alice: str, bob: str) -> None:
    for owner, lookup in ((alice, "np_a1"), (alice, "np_a2"), (bob, "np_b1")):
        store.create_api_key(owner=owner, lookup_id=lookup, secret_hash="h", name="n", scopes=[])
    store.revoke_api_key("np_a2")
    assert store.revoke_api_keys_of_user("ALICE") == ["np_a1"]
    assert all(k.revoked_at is not None for k in store.list_api_keys(alice))
    assert store.get_api_key_by_lookup_id("np_b1").revoked_at is None
    assert store.revoke_api_keys_of_user(alice) == []


# -- refresh sessions ----------------------------------------------------------------


def test_sessions_rotate_with_compare_and_set(
    timed: SqlStore, clock: FakeClock, alice: str
) -> None:
    expires = clock.now + timedelta(days=14)
    session = timed.create_session(
        session_id="fam-1", owner="Alice", token_hash="h0", expires_at=expires
    )
    assert (session.id, session.owner, session.current_token_hash) == ("fam-1", "alice", "h0")
    assert (session.generation, session.rotated_at, session.revoked_at) == (0, None, None)
    assert timed.get_session_by_token_hash("h0") == session
    assert timed.get_session("fam-1") == session
    with pytest.raises(AlreadyExists):
        timed.create_session(session_id="fam-1", owner=alice, token_hash="hx", expires_at=expires)
    with pytest.raises(AlreadyExists):
        timed.create_session(session_id="fam-2", owner=alice, token_hash="h0", expires_at=expires)

    clock.advance(minutes=5)
    rotated = timed.rotate_session("fam-1", old_token_hash="h0", new_token_hash="h1")
    assert (rotated.current_token_hash, rotated.generation, rotated.rotated_at) == (
        "h1",
        1,
        clock.now,
    )
    with pytest.raises(NotFound):
        timed.get_session_by_token_hash("h0")
    # A stale (already rotated) token is reuse: the CAS fails.
    with pytest.raises(Conflict):
        timed.rotate_session("fam-1", old_token_hash="h0", new_token_hash="h2")
    new_expiry = clock.now + timedelta(days=14)
    rotated = timed.rotate_session(
        "fam-1", old_token_hash="h1", new_token_hash="h2", expires_at=new_expiry
    )
    assert (rotated.generation, rotated.expires_at) == (2, new_expiry)
    with pytest.raises(NotFound):
        timed.rotate_session("nope", old_token_hash="h2", new_token_hash="h3")


def test_rotate_refuses_revoked_and_expired_sessions(
    timed: SqlStore, clock: FakeClock, alice: str
) -> None:
    timed.create_session(
        session_id="s1", owner=alice, token_hash="a", expires_at=clock.now + timedelta(hours=1)
    )
    timed.create_session(
        session_id="s2", owner=alice, token_hash="b", expires_at=clock.now + timedelta(hours=1)
    )
    revoked = timed.revoke_session("s1", reason="logout")
    assert (revoked.revoked_at, revoked.revoked_reason) == (clock.now, "logout")
    clock.advance(minutes=1)
    again = timed.revoke_session("s1", reason="other")
    assert (again.revoked_at, again.revoked_reason) == (revoked.revoked_at, "logout")
    with pytest.raises(Conflict):
        timed.rotate_session("s1", old_token_hash="a", new_token_hash="a2")
    clock.advance(hours=2)
    with pytest.raises(Conflict):
        timed.rotate_session("s2", old_token_hash="b", new_token_hash="b2")
    with pytest.raises(NotFound):
        timed.revoke_session("missing", reason="x")


def test_revoke_sessions_of_user(store: Store, alice: str, bob: str) -> None:
    expires = datetime.now(UTC) + timedelta(days=1)
    for i in range(3):
        store.create_session(
            session_id=f"a{i}", owner=alice, token_hash=f"ha{i}", expires_at=expires
        )
    store.create_session(session_id="b0", owner=bob, token_hash="hb0", expires_at=expires)
    store.revoke_session("a2", reason="logout")
    assert store.revoke_sessions_of_user("ALICE", reason="password", except_session_id="a0") == [
        "a1"
    ]
    assert store.get_session("a0").revoked_at is None
    assert store.get_session("a1").revoked_reason == "password"
    assert store.get_session("a2").revoked_reason == "logout"
    assert store.revoke_sessions_of_user(alice, reason="all") == ["a0"]
    assert store.get_session("b0").revoked_at is None


def test_list_sessions_revoked_since(timed: SqlStore, clock: FakeClock, alice: str) -> None:
    expires = clock.now + timedelta(days=1)
    for name in ("early", "late", "live"):
        timed.create_session(session_id=name, owner=alice, token_hash=name, expires_at=expires)
    timed.revoke_session("early", reason="logout")
    since = clock.advance(minutes=20)
    timed.revoke_session("late", reason="logout")
    assert timed.list_sessions_revoked_since(since) == ["late"]
    assert timed.list_sessions_revoked_since(since - timedelta(hours=1)) == ["early", "late"]


def test_naive_datetimes_are_refused(store: Store, alice: str) -> None:
    with pytest.raises(InvalidArgument):
        store.create_session(
            session_id="s", owner=alice, token_hash="t", expires_at=datetime(2030, 1, 1)
        )
    with pytest.raises(InvalidArgument):
        store.append_audit([_audit(datetime.now(UTC), detail={"bad": object()})])


def test_delete_sessions_expired_before(timed: SqlStore, clock: FakeClock, alice: str) -> None:
    timed.create_session(session_id="old", owner=alice, token_hash="o", expires_at=clock.now)
    timed.create_session(
        session_id="new", owner=alice, token_hash="n", expires_at=clock.now + timedelta(days=9)
    )
    assert timed.delete_sessions_expired_before(clock.now + timedelta(days=1)) == 1
    with pytest.raises(NotFound):
        timed.get_session("old")


# -- audit ---------------------------------------------------------------------------


def _audit(at: datetime, **kwargs: object) -> AuditEntry:
    fields: dict[str, object] = {
        "principal": "spiffe://nodepool.local/client/alice",
        "method": "/nodepool.v1.NodeManager/GetNodeList",
        "outcome": "allowed:OK",
    }
    fields.update(kwargs)
    return AuditEntry(at=at, **fields)  # type: ignore[arg-type]


def test_audit_append_and_list(store: Store) -> None:
    base = datetime(2030, 5, 1, tzinfo=UTC)
    store.append_audit(
        [
            _audit(base, username="alice", peer="ipv4:10.0.0.1:5555", detail={"n": 1}),
            _audit(base + timedelta(seconds=1), outcome="denied:PERMISSION_DENIED"),
            _audit(
                base + timedelta(seconds=2),
                principal="spiffe://nodepool.local/node/n1",
                method="/nodepool.v1.NodeManager/UpdateNodeStatus",
            ),
        ]
    )
    store.append_audit([])
    entries = store.list_audit().items
    assert [e.at for e in entries] == [base + timedelta(seconds=s) for s in (2, 1, 0)]
    oldest = entries[-1]
    assert oldest.id is not None
    assert (oldest.username, oldest.peer, oldest.detail) == (
        "alice",
        "ipv4:10.0.0.1:5555",
        {"n": 1},
    )
    assert [e.outcome for e in store.list_audit(outcome="denied:PERMISSION_DENIED").items] == [
        "denied:PERMISSION_DENIED"
    ]
    assert len(store.list_audit(principal="spiffe://nodepool.local/node/n1").items) == 1
    assert len(store.list_audit(username="alice").items) == 1
    assert len(store.list_audit(method="/nodepool.v1.NodeManager/GetNodeList").items) == 2
    window = store.list_audit(since=base + timedelta(seconds=1), until=base + timedelta(seconds=2))
    assert [e.at for e in window.items] == [base + timedelta(seconds=1)]

    first = store.list_audit(limit=2)
    assert len(first.items) == 2
    assert first.next_cursor is not None
    rest = store.list_audit(limit=2, cursor=first.next_cursor)
    assert [e.at for e in rest.items] == [base]
    assert rest.next_cursor is None


def test_delete_audit_before(store: Store) -> None:
    base = datetime(2030, 5, 1, tzinfo=UTC)
    store.append_audit([_audit(base), _audit(base + timedelta(days=100))])
    assert store.delete_audit_before(base + timedelta(days=1)) == 1
    assert len(store.list_audit().items) == 1


# -- translation of database errors --------------------------------------------------


def test_errors_never_carry_sql(store: Store, alice: str) -> None:
    caught: list[Exception] = []
    attempts: list[Callable[[], object]] = [
        lambda: store.create_user("alice", "h"),
        lambda: store.create_session(
            session_id="s", owner=alice, token_hash="t", expires_at=datetime.now(UTC)
        ),
        lambda: store.create_session(
            session_id="s", owner=alice, token_hash="t", expires_at=datetime.now(UTC)
        ),
    ]
    for attempt in attempts:
        try:
            attempt()
        except AlreadyExists as exc:
            caught.append(exc)
    assert len(caught) == 2
    for error in caught:
        text = str(error).upper()
        for leak in ("INSERT", "SELECT", "CONSTRAINT", "REFRESH_SESSIONS", "USERNAME_CANONICAL"):
            assert leak not in text
