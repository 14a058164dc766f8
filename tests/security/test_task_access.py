"""Who may touch which task (issue 9, negative tests), over mTLS on both backends.

- a user sees, waits on and cancels only their own tasks; someone else's answers NOT_FOUND,
  exactly like a task that does not exist (no probing); an admin sees and cancels all;
- a node pulls only as itself, and reports only on tasks assigned to it: a report on
  another node's task is refused with PERMISSION_DENIED and changes nothing;
- a late report after the task was given to another node is FAILED_PRECONDITION and does
  not overwrite the new attempt;
- a device with only a client certificate (no login) and a node certificate calling the
  user methods are refused.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodepool.v1 import master_node_pb2 as mpb
from nodepool.v1 import node_manager_pb2 as npb
from nodepool.v1 import node_manager_pb2_grpc as ngrpc
from tests.fixtures.accounts import BACKENDS, Pool, start_pool
from tests.fixtures.tasks import RawNode, refused, report, status_of, submit, tasks_stub

NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module", params=BACKENDS)
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    with start_pool(request, tmp_path_factory.mktemp("task-access"), request.param) as pool:
        yield pool


@pytest.fixture
def made(pool: Pool) -> Iterator[list[RawNode]]:
    nodes: list[RawNode] = []
    yield nodes
    remove = ngrpc.NodeManagerStub(pool.channel()).RemoveNode
    for node in nodes:
        node.close()
        # The module shares one server: no node outlives its test to take others' tasks.
        try:
            remove(
                npb.RemoveNodeRequest(node_id=node.node_id), metadata=pool.admin.auth, timeout=10
            )
        except grpc.RpcError as exc:
            assert exc.code() == NOT_FOUND


def _node(
    pool: Pool, pki_ca: Any, tmp_path: Path, made: list[RawNode], owner: str, **kw: Any
) -> RawNode:
    node = RawNode.issue(pool, pki_ca, tmp_path, owner)
    made.append(node)
    # Every task in this module asks for the label of its own test, so nodes of one test
    # never take another's tasks.
    node.register(**kw)
    return node


def test_another_users_task_is_not_found_for_status_wait_and_cancel(pool: Pool) -> None:
    alice, mallory = pool.new_user("alice"), pool.new_user("mallory")
    label = {"test": uuid.uuid4().hex[:12]}
    task = submit(pool, alice, labels=label)
    stub = tasks_stub(pool)
    missing = uuid.uuid4().hex
    answers = []
    for task_id in (task.task_id, missing, "not-a-task-id"):
        answers.append(refused(lambda t=task_id: status_of(pool, mallory, t), NOT_FOUND).details())
        answers.append(
            refused(lambda t=task_id: status_of(pool, mallory, t, wait=2), NOT_FOUND).details()
        )
        answers.append(
            refused(
                lambda t=task_id: stub.CancelTask(
                    mpb.CancelTaskRequest(task_id=t), metadata=mallory.auth, timeout=10
                ),
                NOT_FOUND,
            ).details()
        )
    # Someone else's task and no task at all read the same: nothing to probe.
    assert len(set(answers)) == 1, answers
    # Mallory's listing does not show it, and she may not ask for alice's.
    listed = stub.ListTasks(mpb.ListTasksRequest(), metadata=mallory.auth, timeout=10)
    assert task.task_id not in {t.task_id for t in listed.tasks}
    refused(
        lambda: stub.ListTasks(
            mpb.ListTasksRequest(owner=alice.username), metadata=mallory.auth, timeout=10
        ),
        DENIED,
    )
    # The task is untouched; its owner sees it, an admin sees and may cancel it.
    assert status_of(pool, alice, task.task_id).status == mpb.TASK_STATUS_PENDING
    assert status_of(pool, pool.admin, task.task_id).owner == alice.username
    cancelled = stub.CancelTask(
        mpb.CancelTaskRequest(task_id=task.task_id), metadata=pool.admin.auth, timeout=10
    )
    assert cancelled.task.status == mpb.TASK_STATUS_CANCELLED


def test_user_methods_need_a_login_and_a_user(
    pool: Pool, pki_ca: Any, tmp_path: Path, made: list[RawNode]
) -> None:
    alice = pool.new_user("alice")
    task = submit(pool, alice, labels={"test": uuid.uuid4().hex[:12]})
    stub = tasks_stub(pool)
    # The client certificate alone (no token) may not submit or read.
    refused(
        lambda: stub.SubmitTask(mpb.SubmitTaskRequest(task_type="echo"), timeout=10),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    refused(
        lambda: stub.GetTaskStatus(mpb.GetTaskStatusRequest(task_id=task.task_id), timeout=10),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    # A node certificate is not a user: it may not submit, read or cancel.
    node = _node(pool, pki_ca, tmp_path, made, alice.username)
    for call in (
        lambda: node.tasks.SubmitTask(mpb.SubmitTaskRequest(task_type="echo"), timeout=10),
        lambda: node.tasks.GetTaskStatus(
            mpb.GetTaskStatusRequest(task_id=task.task_id), timeout=10
        ),
        lambda: node.tasks.CancelTask(mpb.CancelTaskRequest(task_id=task.task_id), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call()
        assert raised.value.code() in (DENIED, grpc.StatusCode.UNAUTHENTICATED)
    # ... and a user may not pull or report as a node.
    refused(
        lambda: next(
            iter(
                stub.PullTasks(
                    mpb.PullTasksRequest(node_id=node.node_id), metadata=alice.auth, timeout=5
                )
            )
        ),
        DENIED,
    )
    refused(
        lambda: stub.ReportTasks(
            mpb.ReportTasksRequest(node_id=node.node_id, reports=[report(task.task_id, 1)]),
            metadata=alice.auth,
            timeout=10,
        ),
        DENIED,
    )
    assert status_of(pool, alice, task.task_id).status == mpb.TASK_STATUS_PENDING


def test_a_node_pulls_and_reports_only_as_itself_and_only_its_tasks(
    pool: Pool, pki_ca: Any, tmp_path: Path, made: list[RawNode]
) -> None:
    alice = pool.new_user("alice")
    label = {"test": uuid.uuid4().hex[:12]}
    holder = _node(pool, pki_ca, tmp_path, made, alice.username, labels=label)
    # The intruder has the same owner and fits the task, but it is not its task.
    intruder = _node(pool, pki_ca, tmp_path, made, alice.username)
    stream = holder.pull()
    task = submit(pool, alice, labels=label)
    (a,) = stream.assignments(1)
    # Pulling or reporting in another node's name: refused outright.
    refused(
        lambda: next(
            iter(intruder.tasks.PullTasks(mpb.PullTasksRequest(node_id=holder.node_id), timeout=5))
        ),
        DENIED,
    )
    refused(
        lambda: intruder.tasks.ReportTasks(
            mpb.ReportTasksRequest(node_id=holder.node_id, reports=[report(a.task_id, a.attempt)]),
            timeout=10,
        ),
        DENIED,
    )
    # Reporting in its own name on a task it was never given: a per-item refusal.
    for state in (
        mpb.TASK_REPORT_STATE_COMPLETED,
        mpb.TASK_REPORT_STATE_RUNNING,
        mpb.TASK_REPORT_STATE_FAILED,
    ):
        (verdict,) = intruder.report(report(a.task_id, a.attempt, state, result=b"forged"))
        assert not verdict.accepted
        assert verdict.code == "PERMISSION_DENIED"
    (unknown,) = intruder.report(report(uuid.uuid4().hex, 1))
    assert unknown.code == "NOT_FOUND"
    seen = status_of(pool, alice, task.task_id)
    assert seen.status == mpb.TASK_STATUS_ASSIGNED
    assert seen.assigned_node_id == holder.node_id
    assert seen.result == b""
    # A batch mixing its own and another's: each item judged on its own.
    own = submit(pool, alice, labels=label)
    (b,) = stream.assignments(1)
    assert b.task_id == own.task_id
    verdicts = holder.report(
        report(b.task_id, b.attempt, result=b"mine"),
        report(b.task_id, b.attempt + 1, result=b"a future attempt"),
    )
    assert [v.accepted for v in verdicts] == [True, False]
    assert verdicts[1].code == "PERMISSION_DENIED"
    assert status_of(pool, alice, own.task_id).result == b"mine"
    holder.complete([a])


def test_a_late_report_after_reassignment_is_refused_and_changes_nothing(
    pool: Pool, pki_ca: Any, tmp_path: Path, made: list[RawNode]
) -> None:
    alice = pool.new_user("alice")
    label = {"test": uuid.uuid4().hex[:12]}
    first = _node(pool, pki_ca, tmp_path, made, alice.username, labels=label)
    first_stream = first.pull()
    task = submit(pool, alice, labels=label, max_attempts=3, payload=b"p")
    (old,) = first_stream.assignments(1)
    first.report(report(old.task_id, old.attempt, mpb.TASK_REPORT_STATE_RUNNING, progress=0.3))
    # The admin removes the first node: its task goes back to the queue and to the second.
    ngrpc.NodeManagerStub(pool.channel()).RemoveNode(
        npb.RemoveNodeRequest(node_id=first.node_id), metadata=pool.admin.auth, timeout=10
    )
    second = _node(pool, pki_ca, tmp_path, made, alice.username, labels=label)
    (new,) = second.pull().assignments(1)
    assert (new.task_id, new.attempt) == (task.task_id, old.attempt + 1)
    second.report(report(new.task_id, new.attempt, mpb.TASK_REPORT_STATE_RUNNING, progress=0.1))
    # The first node's late word, in every form, is refused: it held attempt 1, not 2.
    for state in (
        mpb.TASK_REPORT_STATE_COMPLETED,
        mpb.TASK_REPORT_STATE_FAILED,
        mpb.TASK_REPORT_STATE_RUNNING,
    ):
        try:
            (verdict,) = first.report(
                report(old.task_id, old.attempt, state, result=b"stale", error="x")
            )
        except grpc.RpcError as exc:
            # A removed node may be refused at the door instead; either way nothing lands.
            assert exc.code() in (DENIED, grpc.StatusCode.FAILED_PRECONDITION), exc
            continue
        assert not verdict.accepted
        assert verdict.code == "FAILED_PRECONDITION"
    seen = status_of(pool, alice, task.task_id)
    assert seen.status == mpb.TASK_STATUS_RUNNING
    assert seen.assigned_node_id == second.node_id
    assert seen.attempts == 2
    assert seen.progress == pytest.approx(0.1)
    assert seen.result == b""
    second.complete([new])
    done = status_of(pool, alice, task.task_id)
    assert (done.status, done.result) == (mpb.TASK_STATUS_COMPLETED, b"p")


def test_a_late_report_from_a_node_that_is_still_registered(
    pool: Pool, pki_ca: Any, tmp_path: Path, made: list[RawNode]
) -> None:
    """Attempt 1 failed on A (draining, so it takes nothing new), attempt 2 runs on B; A's
    late result for attempt 1, and a forged one for attempt 2, do not overwrite B's."""
    alice = pool.new_user("alice")
    label = {"test": uuid.uuid4().hex[:12]}
    a = _node(pool, pki_ca, tmp_path, made, alice.username, labels=label)
    a_stream = a.pull()
    task = submit(pool, alice, labels=label, max_attempts=3)
    (first,) = a_stream.assignments(1)
    ngrpc.NodeManagerStub(pool.channel()).RemoveNode(
        npb.RemoveNodeRequest(node_id=a.node_id, drain=True, drain_deadline_seconds=3600),
        metadata=pool.admin.auth,
        timeout=10,
    )
    b = _node(pool, pki_ca, tmp_path, made, alice.username, labels=label)
    b_stream = b.pull()
    (failed,) = a.report(report(first.task_id, 1, mpb.TASK_REPORT_STATE_FAILED, error="flaky"))
    assert failed.accepted
    (second,) = b_stream.assignments(1)
    assert (second.task_id, second.attempt) == (task.task_id, 2)
    (late,) = a.report(report(first.task_id, 1, result=b"late"))
    assert late.code == "FAILED_PRECONDITION"
    (forged,) = a.report(report(first.task_id, 2, result=b"forged"))
    assert forged.code == "PERMISSION_DENIED"
    seen = status_of(pool, alice, task.task_id)
    assert seen.assigned_node_id == b.node_id
    assert seen.result == b""
    (ok,) = b.report(report(second.task_id, 2, result=b"from b"))
    assert ok.accepted
    done = status_of(pool, alice, task.task_id)
    assert (done.status, done.result, done.attempts) == (mpb.TASK_STATUS_COMPLETED, b"from b", 2)
