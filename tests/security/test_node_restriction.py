"""A node acts only as itself (issue 8, DESIGN §4 "Node restriction").

Node A holds a valid node certificate of our CA; everything it tries as node B is
PERMISSION_DENIED and audited, and changes nothing of B's. The positive paths (A as
itself, B as itself) run in the same tests, so a refusal is never just a broken server.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodepool.v1 import master_node_pb2 as mpb
from nodepool.v1 import master_node_pb2_grpc as mgrpc
from nodepool.v1 import node_manager_pb2 as npb
from nodepool.v1 import node_manager_pb2_grpc as ngrpc
from tests.fixtures.accounts import BACKENDS, Account, Pool, now, refused, start_pool
from tests.fixtures.nodes import NodeClient, list_nodes, new_node

DENIED = grpc.StatusCode.PERMISSION_DENIED
NODES = "/nodepool.v1.NodeManager/"
TASKS = "/nodepool.v1.MasterNodeService/"


@pytest.fixture(scope="module", params=BACKENDS)
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    with start_pool(request, tmp_path_factory.mktemp("restriction"), request.param) as pool:
        yield pool


@pytest.fixture(scope="module")
def alice(pool: Pool) -> Account:
    return pool.new_user("alice")


@pytest.fixture(scope="module")
def bob(pool: Pool) -> Account:
    return pool.new_user("bob")


@pytest.fixture
def nodes(
    pool: Pool, alice: Account, bob: Account, pki_ca: Any, tmp_path: Path
) -> tuple[NodeClient, NodeClient]:
    """Node A (alice's) and node B (bob's), both registered. B carries a unique label so
    tasks can be aimed at it alone."""
    a = new_node(pool, pki_ca, tmp_path, alice.username, "node-a")
    b = new_node(pool, pki_ca, tmp_path, bob.username, "node-b")
    a.register()
    b.register(labels={"only": b.node_id.lower()})
    return a, b


def test_node_a_cannot_register_as_node_b(pool: Pool, nodes: tuple[NodeClient, NodeClient]) -> None:
    a, b = nodes
    since = now()
    refused(lambda: a.register(node_id=b.node_id, cpu_cores=64), DENIED)
    # ... not even as a node id nobody holds yet.
    refused(lambda: a.register(node_id=f"fresh-{uuid.uuid4().hex[:8]}"), DENIED)
    (listed,) = [n for n in list_nodes(pool, pool.admin) if n.node_id == b.node_id]
    assert listed.cpu_cores == 2
    pool.expect_audit(NODES + "RegisterNode", DENIED, since, count=2)


def test_node_a_cannot_heartbeat_as_node_b(
    pool: Pool, nodes: tuple[NodeClient, NodeClient]
) -> None:
    a, b = nodes
    refused(lambda: a.beat(npb.NODE_STATUS_BUSY, node_id=b.node_id, cpu_percent=99), DENIED)
    assert a.beat(node_id=a.node_id).success
    assert b.beat(node_id=b.node_id).success


def test_node_a_cannot_pull_node_b_tasks(
    pool: Pool, bob: Account, nodes: tuple[NodeClient, NodeClient]
) -> None:
    a, b = nodes
    submitted = mgrpc.MasterNodeServiceStub(pool.channel()).SubmitTask(
        mpb.SubmitTaskRequest(task_type="echo", payload=b"x", labels={"only": b.node_id.lower()}),
        metadata=bob.auth,
        timeout=10,
    )
    stream = a.tasks.PullTasks(mpb.PullTasksRequest(node_id=b.node_id), timeout=10)
    with pytest.raises(grpc.RpcError) as raised:
        next(stream)
    assert raised.value.code() == DENIED
    # B itself gets it: the task was there to be taken.
    own = b.tasks.PullTasks(mpb.PullTasksRequest(node_id=b.node_id), timeout=10)
    try:
        (assignment,) = next(own).assignments
        assert assignment.task_id == submitted.task_id
    finally:
        own.cancel()


def test_node_a_cannot_report_as_node_b(
    pool: Pool, bob: Account, nodes: tuple[NodeClient, NodeClient]
) -> None:
    a, b = nodes
    tasks = mgrpc.MasterNodeServiceStub(pool.channel())
    submitted = tasks.SubmitTask(
        mpb.SubmitTaskRequest(task_type="echo", payload=b"x", labels={"only": b.node_id.lower()}),
        metadata=bob.auth,
        timeout=10,
    )
    stream = b.tasks.PullTasks(mpb.PullTasksRequest(), timeout=10)
    try:
        (assignment,) = next(stream).assignments
        assert assignment.task_id == submitted.task_id
        # As B: denied outright.
        refused(lambda: a.report(assignment, mpb.TASK_REPORT_STATE_COMPLETED, b.node_id), DENIED)
        # As itself, about B's task: the report is refused, the task untouched.
        verdict = a.report(assignment, mpb.TASK_REPORT_STATE_COMPLETED).results[0]
        assert not verdict.accepted
        assert verdict.code == DENIED.name
        status = tasks.GetTaskStatus(
            mpb.GetTaskStatusRequest(task_id=submitted.task_id), metadata=bob.auth, timeout=10
        ).task
        assert status.status == mpb.TASK_STATUS_ASSIGNED
        assert status.assigned_node_id == b.node_id
        assert b.report(assignment, mpb.TASK_REPORT_STATE_COMPLETED).results[0].accepted
    finally:
        stream.cancel()


def test_a_node_certificate_has_no_user_powers(
    pool: Pool, nodes: tuple[NodeClient, NodeClient]
) -> None:
    a, b = nodes
    stub = ngrpc.NodeManagerStub(a.channel)
    refused(lambda: stub.GetNodeList(npb.GetNodeListRequest(), timeout=10), DENIED)
    refused(lambda: stub.RemoveNode(npb.RemoveNodeRequest(node_id=b.node_id), timeout=10), DENIED)
    refused(
        lambda: stub.GetNodeEvents(npb.GetNodeEventsRequest(node_id=b.node_id), timeout=10),
        DENIED,
    )
    refused(lambda: stub.ReadmitNode(npb.ReadmitNodeRequest(node_id=b.node_id), timeout=10), DENIED)
    refused(lambda: stub.GetPoolStats(npb.GetPoolStatsRequest(), timeout=10), DENIED)
    refused(lambda: a.tasks.SubmitTask(mpb.SubmitTaskRequest(task_type="echo"), timeout=10), DENIED)
    assert any(n.node_id == b.node_id for n in list_nodes(pool, pool.admin))


def test_users_cannot_act_as_nodes(
    pool: Pool, alice: Account, nodes: tuple[NodeClient, NodeClient]
) -> None:
    """A user's client certificate and login do not make it a node, not even its own."""
    a, _ = nodes
    tasks = mgrpc.MasterNodeServiceStub(pool.channel())
    stream = tasks.PullTasks(
        mpb.PullTasksRequest(node_id=a.node_id), metadata=alice.auth, timeout=10
    )
    with pytest.raises(grpc.RpcError) as raised:
        next(stream)
    assert raised.value.code() == DENIED
    refused(
        lambda: tasks.ReportTasks(
            mpb.ReportTasksRequest(node_id=a.node_id), metadata=alice.auth, timeout=10
        ),
        DENIED,
    )
    refused(
        lambda: ngrpc.NodeManagerStub(pool.channel()).UpdateNodeStatus(
            npb.UpdateNodeStatusRequest(node_id=a.node_id), metadata=alice.auth, timeout=10
        ),
        DENIED,
    )
