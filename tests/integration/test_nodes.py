"""Node lifecycle over real mTLS (issue 8): registration, heartbeats, listing, removal,
drain, re-admission and pool statistics, on SQLite + the embedded cache and on
PostgreSQL + Redis.

Every node has its own certificate from our CA; users call with a client certificate and
a login. The module's server keeps the default heartbeat interval and timeout (nothing
goes offline by itself here; test_node_failures.py covers that) and allows two nodes per
user, so the quota is reachable.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodepool.v1 import master_node_pb2 as mpb
from nodepool.v1 import master_node_pb2_grpc as mgrpc
from nodepool.v1 import node_manager_pb2 as npb
from nodepool.v1 import node_manager_pb2_grpc as ngrpc
from tests.fixtures.accounts import BACKENDS, Account, Pool, refused, start_pool
from tests.fixtures.nodes import (
    NodeClient,
    hold_task,
    list_nodes,
    new_node,
    node_status,
    wait_for,
)

MAX_NODES = 2
# Beats are written behind every second (min(1, interval / 4)); two seconds is the promise.
WRITE_BEHIND_SECONDS = 2.0
# The drain loop runs every second (min(1, timeout / 4)).
DRAIN_CHECK_SECONDS = 1.0

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module", params=BACKENDS)
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    with start_pool(
        request, tmp_path_factory.mktemp("nodes"), request.param, max_nodes_per_user=MAX_NODES
    ) as pool:
        yield pool


@pytest.fixture(scope="module")
def alice(pool: Pool) -> Account:
    return pool.new_user("alice")


@pytest.fixture(scope="module")
def bob(pool: Pool) -> Account:
    return pool.new_user("bob")


@pytest.fixture
def owner(pool: Pool) -> Account:
    """A fresh user, logged in, with no nodes yet (the quota is per user)."""
    return pool.new_user("owner")


@pytest.fixture
def make_node(pool: Pool, pki_ca: Any, tmp_path: Path) -> Any:
    """``make(owner)``: a node certificate for a fresh node id; without an owner, for a
    fresh account that never logs in (node owners need an account, not a session)."""

    def make(owner: Account | str | None = None, prefix: str = "node") -> NodeClient:
        if owner is None:
            owner = pool.unique("holder")
            pool.register(owner)
        name = owner if isinstance(owner, str) else owner.username
        return new_node(pool, pki_ca, tmp_path, name, prefix)

    return make


def _nodes(pool: Pool) -> ngrpc.NodeManagerStub:
    return ngrpc.NodeManagerStub(pool.channel())


def _tasks(pool: Pool) -> mgrpc.MasterNodeServiceStub:
    return mgrpc.MasterNodeServiceStub(pool.channel())


def _events(pool: Pool, account: Account, node_id: str) -> list[str]:
    reply = _nodes(pool).GetNodeEvents(
        npb.GetNodeEventsRequest(node_id=node_id), metadata=account.auth, timeout=10
    )
    return [event.event for event in reversed(reply.events)]  # oldest first


# -- RegisterNode --------------------------------------------------------------------------


def test_register_takes_the_id_and_owner_from_the_certificate(
    pool: Pool, owner: Account, make_node: Any
) -> None:
    node = make_node(owner)
    reply = node.register(labels={"zone": "eu-1"}, port=7000)
    assert reply.success
    assert reply.node.node_id == node.node_id
    assert reply.node.owner == owner.username
    assert reply.node.status == npb.NODE_STATUS_ONLINE
    assert reply.heartbeat_interval_seconds == pool.settings.node_heartbeat_interval
    assert reply.node.task_slots == 2  # 0 asked: as many as cpu_cores
    # Naming its own id explicitly is the same thing.
    assert node.register(node_id=node.node_id).node.node_id == node.node_id
    # ... and the second registration replaced the first one's fields.
    assert list_nodes(pool, owner, labels={"zone": "eu-1"}) == []
    (listed,) = [n for n in list_nodes(pool, owner) if n.node_id == node.node_id]
    assert listed.owner == owner.username
    assert (listed.ip_address, listed.port, dict(listed.labels)) == ("127.0.0.1", 0, {})


def test_register_without_an_address_uses_the_peer_address(
    pool: Pool, owner: Account, make_node: Any
) -> None:
    node = make_node(owner)
    reply = node.register(ip_address="")
    assert reply.node.ip_address in ("127.0.0.1", "::1")


def test_re_registering_is_idempotent_and_updates(
    pool: Pool, owner: Account, make_node: Any
) -> None:
    node = make_node(owner)
    first = node.register(cpu_cores=2, memory_gb=4, labels={"gen": "one"})
    again = node.register(cpu_cores=2, memory_gb=4, labels={"gen": "one"})
    updated = node.register(
        ip_address="10.1.2.3",
        port=9000,
        cpu_cores=8,
        memory_gb=32,
        disk_gb=500,
        labels={"gen": "two"},
        task_slots=3,
    )
    assert again.node.registered_at == first.node.registered_at
    assert updated.node.registered_at == first.node.registered_at
    mine = [n for n in list_nodes(pool, owner) if n.node_id == node.node_id]
    assert len(mine) == 1, "re-registering must not make a second record"
    (listed,) = mine
    assert (listed.ip_address, listed.port, listed.cpu_cores) == ("10.1.2.3", 9000, 8)
    assert (listed.memory_gb, listed.disk_gb, listed.task_slots) == (32, 500, 3)
    assert dict(listed.labels) == {"gen": "two"}
    assert _events(pool, owner, node.node_id) == ["registered"] * 3


def test_a_request_naming_another_node_id_is_denied(
    pool: Pool, owner: Account, make_node: Any
) -> None:
    node, other = make_node(owner), make_node(owner)
    refused(lambda: node.register(node_id=other.node_id), DENIED)
    assert all(n.node_id != other.node_id for n in list_nodes(pool, owner))


def test_a_node_id_held_by_another_owner_is_denied(
    pool: Pool, make_node: Any, tmp_path: Path, pki_ca: Any
) -> None:
    """Another owner's certificate for the same id cannot take the node over."""
    mine = make_node()
    mine.register()
    intruder = pool.unique("intruder")
    pool.register(intruder)
    theirs = pki_ca.issue("node", mine.node_id, tmp_path / "b", owner=intruder, allow_reissue=True)
    stub = ngrpc.NodeManagerStub(pool.channel(theirs))
    refused(
        lambda: stub.RegisterNode(
            npb.RegisterNodeRequest(ip_address="127.0.0.1", cpu_cores=1, memory_gb=1), timeout=10
        ),
        DENIED,
    )
    (listed,) = [n for n in list_nodes(pool, pool.admin) if n.node_id == mine.node_id]
    assert listed.owner == mine.owner


def test_a_client_certificate_cannot_register_a_node(pool: Pool, alice: Account) -> None:
    refused(
        lambda: _nodes(pool).RegisterNode(
            npb.RegisterNodeRequest(
                node_id="alice-laptop", ip_address="127.0.0.1", cpu_cores=1, memory_gb=1
            ),
            metadata=alice.auth,
            timeout=10,
        ),
        DENIED,
    )
    refused(
        lambda: _nodes(pool).UpdateNodeStatus(
            npb.UpdateNodeStatusRequest(node_id="alice-laptop"), metadata=alice.auth, timeout=10
        ),
        DENIED,
    )


def test_max_nodes_per_user_is_enforced(pool: Pool, make_node: Any) -> None:
    owner = pool.new_user("quota")
    first, second, third = (make_node(owner) for _ in range(3))
    first.register()
    second.register()
    error = refused(third.register, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert str(MAX_NODES) in (error.details() or "")
    # Re-registering a node already counted is not a new node.
    first.register(cpu_cores=4)
    # Removing one frees a place.
    _nodes(pool).RemoveNode(
        npb.RemoveNodeRequest(node_id=second.node_id), metadata=owner.auth, timeout=10
    )
    third.register()
    assert len(list_nodes(pool, owner)) == MAX_NODES


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"cpu_cores": 0}, id="cpu-zero"),
        pytest.param({"cpu_cores": 100_000}, id="cpu-huge"),
        pytest.param({"memory_gb": math.nan}, id="memory-nan"),
        pytest.param({"memory_gb": math.inf}, id="memory-inf"),
        pytest.param({"memory_gb": -1.0}, id="memory-negative"),
        pytest.param({"memory_gb": 0.0}, id="memory-zero"),
        pytest.param({"memory_gb": 1e12}, id="memory-huge"),
        pytest.param({"disk_gb": -5.0}, id="disk-negative"),
        pytest.param({"disk_gb": math.nan}, id="disk-nan"),
        pytest.param({"ip_address": "999.1.1.1"}, id="ip-out-of-range"),
        pytest.param({"ip_address": "1.2.3"}, id="ip-short"),
        pytest.param({"ip_address": "a b"}, id="ip-space"),
        pytest.param({"ip_address": "-bad-.example"}, id="host-dash"),
        pytest.param({"ip_address": "x" * 300}, id="host-long"),
        pytest.param({"port": 70000}, id="port-too-big"),
        pytest.param({"task_slots": 5000}, id="slots-huge"),
        pytest.param({"labels": {f"k{i}": "v" for i in range(33)}}, id="labels-too-many"),
        pytest.param({"labels": {"Bad Key": "v"}}, id="label-key"),
        pytest.param({"labels": {"key": "no spaces allowed"}}, id="label-value"),
        pytest.param({"labels": {"key": "v" * 64}}, id="label-value-long"),
    ],
)
def test_bad_registration_values_are_invalid(
    pool: Pool, make_node: Any, changes: dict[str, Any]
) -> None:
    node = make_node()
    with pytest.raises(grpc.RpcError) as raised:
        node.register(**changes)
    assert raised.value.code() == INVALID, raised.value.details()
    assert "Traceback" not in (raised.value.details() or "")
    assert node_status(pool, pool.admin, node.node_id) is None


def test_registration_accepts_sensible_edges(pool: Pool, make_node: Any) -> None:
    owner = pool.new_user("edges")
    v6 = make_node(owner)
    assert v6.register(ip_address="2001:db8::1", port=65535, disk_gb=0).node.ip_address == (
        "2001:db8::1"
    )
    named = make_node(owner)
    assert named.register(ip_address="Worker-7.example.org").node.ip_address == (
        "worker-7.example.org"
    )


# -- UpdateNodeStatus ----------------------------------------------------------------------


def test_heartbeat_of_an_unregistered_node_is_a_failed_precondition(
    make_node: Any,
) -> None:
    node = make_node()
    refused(node.beat, grpc.StatusCode.FAILED_PRECONDITION)


def test_heartbeat_reply_carries_the_interval_and_drain_flag(pool: Pool, make_node: Any) -> None:
    node = make_node()
    node.register()
    reply = node.beat()
    assert reply.success
    assert reply.heartbeat_interval_seconds == pool.settings.node_heartbeat_interval
    assert reply.drain_requested is False


@pytest.mark.parametrize(
    "metrics",
    [
        {"cpu_percent": -1.0},
        {"cpu_percent": math.nan},
        {"memory_percent": math.inf},
        {"disk_percent": 1e9},
        {"load_average": -0.5},
    ],
    ids=["cpu-negative", "cpu-nan", "memory-inf", "disk-huge", "load-negative"],
)
def test_heartbeat_metrics_out_of_range_are_invalid(
    make_node: Any, metrics: dict[str, float]
) -> None:
    node = make_node()
    node.register()
    refused(lambda: node.beat(**metrics), INVALID)


def test_a_node_cannot_report_itself_offline(make_node: Any) -> None:
    node = make_node()
    node.register()
    refused(lambda: node.beat(npb.NODE_STATUS_OFFLINE), INVALID)


def test_heartbeats_reach_the_database_with_their_metrics(
    pool: Pool, owner: Account, make_node: Any
) -> None:
    node = make_node(owner)
    node.register()
    registered = node_status(pool, owner, node.node_id)
    assert registered is not None
    before = datetime.now(UTC)
    time.sleep(0.05)
    node.beat(
        npb.NODE_STATUS_BUSY,
        cpu_percent=42.5,
        memory_percent=61.0,
        disk_percent=12.25,
        load_average=1.5,
        running_tasks=3,
    )

    def written() -> bool:
        listed = node_status(pool, owner, node.node_id)
        return (
            listed is not None
            and listed.last_heartbeat.ToDatetime(tzinfo=UTC) >= before
            and listed.metrics.cpu_percent == 42.5
        )

    wait_for(written, WRITE_BEHIND_SECONDS, "heartbeat in the database")
    listed = node_status(pool, owner, node.node_id)
    assert listed is not None
    assert listed.status == npb.NODE_STATUS_BUSY
    assert (listed.metrics.memory_percent, listed.metrics.disk_percent) == (61.0, 12.25)
    assert (listed.metrics.load_average, listed.metrics.running_tasks) == (1.5, 3)


# -- GetNodeList ---------------------------------------------------------------------------


def test_users_see_their_own_nodes_and_admins_see_all(
    pool: Pool, owner: Account, bob: Account, make_node: Any
) -> None:
    batch = uuid.uuid4().hex[:12]
    a_node, b_node = make_node(owner), make_node(bob)
    a_node.register(labels={"batch": batch})
    b_node.register(labels={"batch": batch})
    assert {n.owner for n in list_nodes(pool, owner)} == {owner.username}
    assert [n.node_id for n in list_nodes(pool, owner, labels={"batch": batch})] == [a_node.node_id]
    assert [n.node_id for n in list_nodes(pool, bob, labels={"batch": batch})] == [b_node.node_id]
    everyone = list_nodes(pool, pool.admin, labels={"batch": batch})
    assert sorted(n.node_id for n in everyone) == sorted([a_node.node_id, b_node.node_id])
    only_bob = list_nodes(pool, pool.admin, labels={"batch": batch}, owner=bob.username)
    assert [n.node_id for n in only_bob] == [b_node.node_id]
    # Naming yourself is fine; naming someone else is not.
    assert list_nodes(pool, owner, owner=owner.username, labels={"batch": batch})
    refused(lambda: list_nodes(pool, owner, owner=bob.username), DENIED)


def test_list_filters_by_status_and_labels(pool: Pool, owner: Account, make_node: Any) -> None:
    batch = uuid.uuid4().hex[:12]
    idle, busy = make_node(owner), make_node(owner)
    idle.register(labels={"batch": batch, "gpu": "none"})
    busy.register(labels={"batch": batch, "gpu": "a100"})
    busy.beat(npb.NODE_STATUS_BUSY)

    def busy_listed() -> bool:
        found = list_nodes(pool, pool.admin, status=npb.NODE_STATUS_BUSY, labels={"batch": batch})
        return [n.node_id for n in found] == [busy.node_id]

    wait_for(busy_listed, WRITE_BEHIND_SECONDS, "busy status listed")
    online = list_nodes(pool, owner, status=npb.NODE_STATUS_ONLINE, labels={"batch": batch})
    assert [n.node_id for n in online] == [idle.node_id]
    gpu = list_nodes(pool, owner, labels={"batch": batch, "gpu": "a100"})
    assert [n.node_id for n in gpu] == [busy.node_id]
    assert list_nodes(pool, owner, labels={"batch": batch, "gpu": "h100"}) == []
    assert list_nodes(pool, owner, status=npb.NODE_STATUS_OFFLINE, labels={"batch": batch}) == []
    with pytest.raises(grpc.RpcError) as raised:
        list_nodes(pool, owner, labels={"Bad Key": "x"})
    assert raised.value.code() == INVALID
    refused(
        lambda: _nodes(pool).GetNodeList(
            npb.GetNodeListRequest(page_token="not-a-token"), metadata=owner.auth, timeout=10
        ),
        INVALID,
    )


def test_pagination_is_stable_across_pages(pool: Pool, make_node: Any) -> None:
    batch = uuid.uuid4().hex[:12]
    owners = [pool.new_user("pager") for _ in range(3)]
    made = [make_node(owners[i // MAX_NODES], prefix=f"page{i}") for i in range(5)]
    for node in made:
        node.register(labels={"batch": batch})
    expected = sorted(node.node_id for node in made)
    stub = _nodes(pool)

    def page(token: str) -> npb.GetNodeListResponse:
        return stub.GetNodeList(
            npb.GetNodeListRequest(page_size=2, page_token=token, labels={"batch": batch}),
            metadata=pool.admin.auth,
            timeout=10,
        )

    first = page("")
    assert [n.node_id for n in first.nodes] == expected[:2]
    assert first.next_page_token
    # A node joining in front of the cursor between two pages shifts nothing.
    late = make_node(owners[2], prefix="page0")
    late.register(labels={"batch": batch})
    second = page(first.next_page_token)
    third = page(second.next_page_token)
    assert [n.node_id for n in second.nodes] == expected[2:4]
    assert [n.node_id for n in third.nodes] == expected[4:]
    assert third.next_page_token == ""
    # The same token read twice gives the same page.
    assert [n.node_id for n in page(first.next_page_token).nodes] == expected[2:4]
    everything = list_nodes(pool, pool.admin, page_size=2, labels={"batch": batch})
    assert [n.node_id for n in everything] == sorted([*expected, late.node_id])


# -- RemoveNode, drain and re-admission ----------------------------------------------------


def test_the_owner_or_an_admin_may_remove_a_node_and_nobody_else(
    pool: Pool, owner: Account, bob: Account, make_node: Any
) -> None:
    by_owner, by_admin = make_node(owner), make_node(owner)
    by_owner.register()
    by_admin.register()
    stub = _nodes(pool)
    # Another user learns nothing, not even that the node exists.
    refused(
        lambda: stub.RemoveNode(
            npb.RemoveNodeRequest(node_id=by_owner.node_id), metadata=bob.auth, timeout=10
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    refused(
        lambda: stub.GetNodeEvents(
            npb.GetNodeEventsRequest(node_id=by_owner.node_id), metadata=bob.auth, timeout=10
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    refused(
        lambda: stub.RemoveNode(
            npb.RemoveNodeRequest(node_id=by_owner.node_id, drain=True),
            metadata=bob.auth,
            timeout=10,
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert node_status(pool, owner, by_owner.node_id) is not None
    removed = stub.RemoveNode(
        npb.RemoveNodeRequest(node_id=by_owner.node_id), metadata=owner.auth, timeout=10
    )
    assert removed.success
    assert not removed.HasField("node")
    stub.RemoveNode(
        npb.RemoveNodeRequest(node_id=by_admin.node_id), metadata=pool.admin.auth, timeout=10
    )
    assert node_status(pool, pool.admin, by_owner.node_id) is None
    assert node_status(pool, pool.admin, by_admin.node_id) is None
    # The history outlives the node (an admin reads it; the row that named the owner is gone).
    assert _events(pool, pool.admin, by_owner.node_id)[-1] == "removed"
    refused(
        lambda: stub.RemoveNode(
            npb.RemoveNodeRequest(node_id=by_owner.node_id), metadata=owner.auth, timeout=10
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    refused(
        lambda: stub.RemoveNode(
            npb.RemoveNodeRequest(node_id="not a node id"), metadata=owner.auth, timeout=10
        ),
        INVALID,
    )


def test_a_removed_node_cannot_register_until_an_admin_readmits_it(
    pool: Pool, owner: Account, make_node: Any
) -> None:
    node = make_node(owner)
    node.register()
    _nodes(pool).RemoveNode(
        npb.RemoveNodeRequest(node_id=node.node_id), metadata=owner.auth, timeout=10
    )
    refused(node.register, DENIED)
    refused(node.beat, grpc.StatusCode.FAILED_PRECONDITION)
    readmit = npb.ReadmitNodeRequest(node_id=node.node_id)
    # Only an admin re-admits, and only what was removed.
    refused(lambda: _nodes(pool).ReadmitNode(readmit, metadata=owner.auth, timeout=10), DENIED)
    refused(node.register, DENIED)
    assert _nodes(pool).ReadmitNode(readmit, metadata=pool.admin.auth, timeout=10).success
    refused(
        lambda: _nodes(pool).ReadmitNode(readmit, metadata=pool.admin.auth, timeout=10),
        grpc.StatusCode.NOT_FOUND,
    )
    assert node.register().node.status == npb.NODE_STATUS_ONLINE
    assert node.beat().success
    events = _events(pool, pool.admin, node.node_id)
    assert events == ["registered", "removed", "readmitted", "registered"]


def _submit(pool: Pool, account: Account, label: str) -> str:
    reply = _tasks(pool).SubmitTask(
        mpb.SubmitTaskRequest(task_type="sleep", payload=b"60", labels={"only": label}),
        metadata=account.auth,
        timeout=10,
    )
    return reply.task_id


def _task(pool: Pool, account: Account, task_id: str) -> mpb.Task:
    return (
        _tasks(pool)
        .GetTaskStatus(mpb.GetTaskStatusRequest(task_id=task_id), metadata=account.auth, timeout=10)
        .task
    )


def _hold_first_task(node: NodeClient) -> tuple[Any, mpb.TaskAssignment]:
    """Pulls on a raw stream and reports the first assignment RUNNING, never finishing it."""
    stream = node.tasks.PullTasks(mpb.PullTasksRequest(), timeout=60)
    message = next(stream)
    (assignment,) = message.assignments
    result = node.report(assignment, mpb.TASK_REPORT_STATE_RUNNING)
    assert result.results[0].accepted, result
    return stream, assignment


def test_drain_stops_new_work_and_removes_the_node_once_idle(
    pool: Pool, owner: Account, make_node: Any
) -> None:
    label = uuid.uuid4().hex[:12]
    node = make_node(owner)
    node.register(labels={"only": label})
    first = _submit(pool, owner, label)  # the node takes work before the drain
    stream, held = _hold_first_task(node)
    try:
        assert held.task_id == first
        reply = _nodes(pool).RemoveNode(
            npb.RemoveNodeRequest(node_id=node.node_id, drain=True, drain_deadline_seconds=600),
            metadata=owner.auth,
            timeout=10,
        )
        assert reply.success
        assert reply.node.status == npb.NODE_STATUS_DRAINING
        assert reply.node.drain_requested
        assert reply.node.HasField("drain_deadline")
        beat = node.beat(npb.NODE_STATUS_BUSY, running_tasks=1)
        assert beat.drain_requested is True
        listed = node_status(pool, owner, node.node_id)
        assert listed is not None
        assert listed.status == npb.NODE_STATUS_DRAINING
        # No new assignment: it is the only node carrying the label, and it is draining.
        second = _submit(pool, owner, label)
        time.sleep(2 * DRAIN_CHECK_SECONDS)
        waiting = _task(pool, owner, second)
        assert waiting.status == mpb.TASK_STATUS_PENDING
        assert waiting.assigned_node_id == ""
        # While a task runs the node stays.
        assert node_status(pool, owner, node.node_id) is not None
        done = node.report(held, mpb.TASK_REPORT_STATE_COMPLETED)
        assert done.results[0].accepted, done
        wait_for(
            lambda: node_status(pool, owner, node.node_id) is None,
            3 * DRAIN_CHECK_SECONDS,
            "drained node removed",
        )
    finally:
        stream.cancel()
    assert _task(pool, owner, first).status == mpb.TASK_STATUS_COMPLETED
    assert _task(pool, owner, second).status == mpb.TASK_STATUS_PENDING
    assert _events(pool, pool.admin, node.node_id)[-2:] == ["drain_requested", "removed"]
    refused(node.register, DENIED)


def test_drain_deadline_removes_the_node_and_requeues_its_running_task(
    pool: Pool, owner: Account, make_node: Any
) -> None:
    label = uuid.uuid4().hex[:12]
    node = make_node(owner)
    node.register(labels={"only": label})
    task_id = _submit(pool, owner, label)
    stream, held = _hold_first_task(node)
    try:
        running = _task(pool, owner, task_id)
        assert running.status == mpb.TASK_STATUS_RUNNING
        assert running.attempts == 1
        started = time.monotonic()
        _nodes(pool).RemoveNode(
            npb.RemoveNodeRequest(node_id=node.node_id, drain=True, drain_deadline_seconds=2),
            metadata=owner.auth,
            timeout=10,
        )
        took = wait_for(
            lambda: node_status(pool, owner, node.node_id) is None,
            2 + 3 * DRAIN_CHECK_SECONDS,
            "node removed at its drain deadline",
        )
        assert time.monotonic() - started >= 2 - 0.5, "removed before the deadline"
        assert took <= 2 + 3 * DRAIN_CHECK_SECONDS
    finally:
        stream.cancel()
    back = _task(pool, owner, task_id)
    assert back.status == mpb.TASK_STATUS_PENDING
    assert back.assigned_node_id == ""
    assert back.attempts == running.attempts  # the next assignment makes it attempt 2
    # The node no longer holds it: a late report is refused.
    late = node.report(held, mpb.TASK_REPORT_STATE_COMPLETED)
    assert not late.results[0].accepted
    events = _events(pool, pool.admin, node.node_id)
    assert events[-2:] == ["drain_requested", "removed"]


def test_drain_deadline_bounds(pool: Pool, owner: Account, make_node: Any) -> None:
    node = make_node(owner)
    node.register()
    refused(
        lambda: _nodes(pool).RemoveNode(
            npb.RemoveNodeRequest(
                node_id=node.node_id, drain=True, drain_deadline_seconds=30 * 86400
            ),
            metadata=owner.auth,
            timeout=10,
        ),
        INVALID,
    )
    # A running task keeps the node draining (an idle one would be removed at once).
    label = uuid.uuid4().hex[:12]
    node.register(labels={"only": label})
    stream = hold_task(pool, owner, node, label)
    try:
        # 0 means the default (ten minutes).
        reply = _nodes(pool).RemoveNode(
            npb.RemoveNodeRequest(node_id=node.node_id, drain=True),
            metadata=owner.auth,
            timeout=10,
        )
        remaining = reply.node.drain_deadline.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
        assert 540 < remaining.total_seconds() <= 600
        # A draining node that re-registers stays draining.
        assert node.register(labels={"only": label}).node.status == npb.NODE_STATUS_DRAINING
    finally:
        stream.cancel()


# -- pool statistics -----------------------------------------------------------------------


def test_pool_stats_are_for_admins_and_match_the_lists(
    pool: Pool, alice: Account, make_node: Any
) -> None:
    refused(
        lambda: _nodes(pool).GetPoolStats(
            npb.GetPoolStatsRequest(), metadata=alice.auth, timeout=10
        ),
        DENIED,
    )
    online = make_node()
    online.register(labels={"only": uuid.uuid4().hex[:12]})
    _submit(pool, alice, "nobody-has-this")  # pending: no node carries the label
    time.sleep(WRITE_BEHIND_SECONDS)  # let every buffered beat land
    stats = _nodes(pool).GetPoolStats(
        npb.GetPoolStatsRequest(), metadata=pool.admin.auth, timeout=10
    )
    nodes = list_nodes(pool, pool.admin, page_size=1000)
    by_status = {
        status: sum(1 for n in nodes if n.status == status)
        for status in (
            npb.NODE_STATUS_ONLINE,
            npb.NODE_STATUS_OFFLINE,
            npb.NODE_STATUS_BUSY,
            npb.NODE_STATUS_DRAINING,
        )
    }
    assert stats.nodes_online == by_status[npb.NODE_STATUS_ONLINE] >= 1
    assert stats.nodes_offline == by_status[npb.NODE_STATUS_OFFLINE]
    assert stats.nodes_busy == by_status[npb.NODE_STATUS_BUSY]
    assert stats.nodes_draining == by_status[npb.NODE_STATUS_DRAINING]
    assert stats.task_slots_online == sum(
        n.task_slots for n in nodes if n.status in (npb.NODE_STATUS_ONLINE, npb.NODE_STATUS_BUSY)
    )
    tasks = (
        _tasks(pool)
        .ListTasks(mpb.ListTasksRequest(page_size=1000), metadata=pool.admin.auth, timeout=10)
        .tasks
    )
    assert stats.tasks_pending == sum(1 for t in tasks if t.status == mpb.TASK_STATUS_PENDING)
    assert stats.tasks_pending >= 1
    assert stats.tasks_assigned == sum(1 for t in tasks if t.status == mpb.TASK_STATUS_ASSIGNED)
    assert stats.tasks_running == sum(1 for t in tasks if t.status == mpb.TASK_STATUS_RUNNING)
