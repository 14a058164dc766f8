"""Tasks end to end over mTLS (issue 9): submission, scheduling, delivery, status, cancel,
node loss, retries, timeouts and retention, on both backends where storage matters.

Worker nodes are driven by the test itself (``RawNode``: its own node certificate, its own
connection, its own PullTasks stream), so every assertion is about what the server sends
and stores. ``tests/integration/test_worker_tasks.py`` runs the real ``nodepool worker``.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import update

from nodepool.domain.tasks import retention_cutoff
from nodepool.store.schema import Task
from nodepool.v1 import master_node_pb2 as mpb
from nodepool.v1 import node_manager_pb2 as npb
from nodepool.v1 import node_manager_pb2_grpc as ngrpc
from tests.fixtures.accounts import BACKENDS, Account, Pool, start_pool
from tests.fixtures.tasks import (
    RawNode,
    eventually,
    refused,
    report,
    status_of,
    submit,
    tasks_stub,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(params=BACKENDS)
def pool(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pool]:
    with start_pool(request, tmp_path, request.param) as pool:
        yield pool


@pytest.fixture
def nodes() -> Iterator[list[RawNode]]:
    """Raw nodes made by the test (``new_node``); all closed at the end."""
    made: list[RawNode] = []
    yield made
    for node in made:
        node.close()


def new_node(
    pool: Pool, pki_ca: Any, tmp_path: Path, made: list[RawNode], owner: Account, **register: Any
) -> RawNode:
    node = RawNode.issue(pool, pki_ca, tmp_path, owner.username)
    node.register(**register)
    made.append(node)
    return node


def list_all(pool: Pool, account: Account, **filters: Any) -> list[mpb.Task]:
    found: list[mpb.Task] = []
    token = ""
    while True:
        reply = tasks_stub(pool).ListTasks(
            mpb.ListTasksRequest(page_token=token, **filters), metadata=account.auth, timeout=10
        )
        found.extend(reply.tasks)
        token = reply.next_page_token
        if not token:
            return found


# -- submission ------------------------------------------------------------------------


def test_submission_is_persisted_before_the_reply(pool: Pool) -> None:
    alice = pool.new_user("alice")
    task = submit(
        pool,
        alice,
        "sha256",
        payload=b"\x00bytes\xff",
        requirements=mpb.ResourceRequirements(cpu_cores=2, memory_gb=1.5),
        priority=7,
        labels={"zone": "eu-1"},
        timeout_seconds=120,
        max_attempts=4,
    )
    # Read straight from the server's database: it is there the moment the reply is.
    stored = pool.store.get_task(task.task_id)
    assert stored.owner == alice.username
    assert stored.task_type == "sha256"
    assert stored.status == "pending"
    assert stored.payload == b"\x00bytes\xff"
    assert stored.required_cpu_cores == 2
    assert stored.required_memory_gb == pytest.approx(1.5)
    assert stored.priority == 7
    assert dict(stored.required_labels) == {"zone": "eu-1"}
    assert stored.timeout_seconds == 120
    assert stored.max_attempts == 4
    assert stored.attempts == 0
    assert task.status == mpb.TASK_STATUS_PENDING
    assert task.owner == alice.username
    assert not task.payload  # payloads are not echoed back
    # Defaults come from the server when left at 0.
    plain = pool.store.get_task(submit(pool, alice).task_id)
    assert plain.max_attempts == 3
    assert plain.timeout_seconds == 3600


def test_an_idempotency_key_returns_the_same_task(pool: Pool) -> None:
    alice, bob = pool.new_user("alice"), pool.new_user("bob")
    first = submit(pool, alice, payload=b"one", idempotency_key="job-42")
    again = submit(pool, alice, payload=b"two", idempotency_key="job-42")
    assert again.task_id == first.task_id
    assert pool.store.get_task(first.task_id).payload == b"one"
    # Keys belong to their owner: bob's job-42 is bob's own task.
    other = submit(pool, bob, payload=b"bob", idempotency_key="job-42")
    assert other.task_id != first.task_id
    # In a batch: a known key returns the earlier task, a key repeated inside the batch once.
    batch = (
        tasks_stub(pool)
        .SubmitTasks(
            mpb.SubmitTasksRequest(
                tasks=[
                    mpb.SubmitTaskRequest(task_type="echo", idempotency_key="job-42"),
                    mpb.SubmitTaskRequest(task_type="echo", idempotency_key="job-43"),
                    mpb.SubmitTaskRequest(task_type="echo", idempotency_key="job-43"),
                ]
            ),
            metadata=alice.auth,
            timeout=10,
        )
        .tasks
    )
    assert batch[0].task_id == first.task_id
    assert batch[1].task_id == batch[2].task_id != first.task_id
    assert len(list_all(pool, alice)) == 2


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"task_type": "rm-rf"}, INVALID),
        ({"task_type": ""}, INVALID),
        ({"priority": 101}, INVALID),
        ({"priority": -101}, INVALID),
        ({"max_attempts": 11}, INVALID),
        ({"timeout_seconds": 7 * 86400 + 1}, INVALID),
        ({"labels": {"Bad Key": "x"}}, INVALID),
        ({"labels": {"zone": "not ok!"}}, INVALID),
        ({"idempotency_key": "has spaces"}, INVALID),
        ({"idempotency_key": "k" * 129}, INVALID),
        ({"requirements": mpb.ResourceRequirements(cpu_cores=5000)}, INVALID),
        ({"requirements": mpb.ResourceRequirements(memory_gb=float("nan"))}, INVALID),
        ({"requirements": mpb.ResourceRequirements(memory_gb=-1)}, INVALID),
        ({"payload": b"x" * 1025}, EXHAUSTED),
    ],
    ids=lambda value: str(value)[:40],
)
@pytest.mark.parametrize("backend", ["memory"])
def test_bad_submissions_are_refused_and_store_nothing(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    backend: str,
    fields: dict[str, Any],
    code: grpc.StatusCode,
) -> None:
    with start_pool(request, tmp_path, backend, max_task_payload_bytes=1024) as pool:
        alice = pool.new_user("alice")
        request_fields = {"task_type": "echo", **fields}
        refused(
            lambda: tasks_stub(pool).SubmitTask(
                mpb.SubmitTaskRequest(**request_fields), metadata=alice.auth, timeout=10
            ),
            code,
        )
        # The same bad item in a batch refuses the whole batch: nothing is stored.
        refused(
            lambda: tasks_stub(pool).SubmitTasks(
                mpb.SubmitTasksRequest(
                    tasks=[
                        mpb.SubmitTaskRequest(task_type="echo", payload=b"fine"),
                        mpb.SubmitTaskRequest(**request_fields),
                    ]
                ),
                metadata=alice.auth,
                timeout=10,
            ),
            code,
        )
        assert list_all(pool, alice) == []
        # A payload exactly at the limit is accepted.
        submit(pool, alice, payload=b"x" * 1024)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pending_limit_per_user_and_all_or_none_batches(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    with start_pool(request, tmp_path, backend, max_pending_tasks_per_user=5) as pool:
        alice, bob = pool.new_user("alice"), pool.new_user("bob")
        stub = tasks_stub(pool)
        batch = [mpb.SubmitTaskRequest(task_type="echo") for _ in range(3)]
        stub.SubmitTasks(mpb.SubmitTasksRequest(tasks=batch), metadata=alice.auth, timeout=10)
        # 3 pending + 3 more would be 6 > 5: the whole batch is refused, none stored.
        error = refused(
            lambda: stub.SubmitTasks(
                mpb.SubmitTasksRequest(tasks=batch), metadata=alice.auth, timeout=10
            ),
            EXHAUSTED,
        )
        assert "5 pending tasks" in (error.details() or "")
        assert len(list_all(pool, alice)) == 3
        submit(pool, alice)
        submit(pool, alice)
        refused(lambda: submit(pool, alice), EXHAUSTED)
        # The limit is per user: bob is not affected by alice's queue.
        submit(pool, bob)
        # A finished (here: cancelled) task no longer counts.
        victim = list_all(pool, alice)[0]
        stub.CancelTask(
            mpb.CancelTaskRequest(task_id=victim.task_id), metadata=alice.auth, timeout=10
        )
        submit(pool, alice)
        assert len(list_all(pool, alice, status=mpb.TASK_STATUS_PENDING)) == 5


# -- the scheduler ---------------------------------------------------------------------


def test_only_nodes_that_fit_get_tasks(
    pool: Pool, pki_ca: Any, tmp_path: Path, nodes: list[RawNode]
) -> None:
    alice = pool.new_user("alice")
    small = new_node(pool, pki_ca, tmp_path, nodes, alice, cpu_cores=2, memory_gb=2, task_slots=4)
    big = new_node(
        pool,
        pki_ca,
        tmp_path,
        nodes,
        alice,
        cpu_cores=8,
        memory_gb=32,
        task_slots=4,
        labels={"gpu": "a100"},
    )
    # A node asked to drain takes nothing new, however well it would fit.
    draining = new_node(
        pool, pki_ca, tmp_path, nodes, alice, cpu_cores=64, memory_gb=512, task_slots=8
    )
    ngrpc.NodeManagerStub(pool.channel()).RemoveNode(
        npb.RemoveNodeRequest(node_id=draining.node_id, drain=True, drain_deadline_seconds=3600),
        metadata=pool.admin.auth,
        timeout=10,
    )
    small_stream, big_stream, draining_stream = small.pull(), big.pull(), draining.pull()

    needs_cpu = submit(pool, alice, requirements=mpb.ResourceRequirements(cpu_cores=4))
    needs_memory = submit(pool, alice, requirements=mpb.ResourceRequirements(memory_gb=16))
    needs_label = submit(pool, alice, labels={"gpu": "a100"})
    wrong_label = submit(pool, alice, labels={"gpu": "h100"})
    too_big = submit(pool, alice, requirements=mpb.ResourceRequirements(cpu_cores=32))
    got = {a.task_id for a in big_stream.assignments(3)}
    assert got == {needs_cpu.task_id, needs_memory.task_id, needs_label.task_id}
    # Only the draining node could run too_big, and nothing could run wrong_label.
    time.sleep(1.5)
    assert small_stream.drain() == []
    assert draining_stream.drain() == []
    assert status_of(pool, alice, too_big.task_id).status == mpb.TASK_STATUS_PENDING
    assert status_of(pool, alice, wrong_label.task_id).status == mpb.TASK_STATUS_PENDING
    assert status_of(pool, alice, needs_cpu.task_id).assigned_node_id == big.node_id

    # Free resources count: big has 8 cores, 4 are taken, so a 5-core task waits for them.
    five = submit(pool, alice, requirements=mpb.ResourceRequirements(cpu_cores=5))
    time.sleep(1.5)
    assert big_stream.drain() == []
    big.report(report(needs_cpu.task_id, 1))
    (assignment,) = big_stream.assignments(1)
    assert assignment.task_id == five.task_id


def test_free_slots_bound_what_a_node_gets(
    pool: Pool, pki_ca: Any, tmp_path: Path, nodes: list[RawNode]
) -> None:
    alice = pool.new_user("alice")
    node = new_node(pool, pki_ca, tmp_path, nodes, alice, task_slots=2)
    stream = node.pull()
    tasks_stub(pool).SubmitTasks(
        mpb.SubmitTasksRequest(tasks=[mpb.SubmitTaskRequest(task_type="echo")] * 5),
        metadata=alice.auth,
        timeout=10,
    )
    first = stream.assignments(2)
    time.sleep(1.5)
    assert stream.drain() == [], "more tasks than slots"
    done = 0
    pending = first
    while pending:
        node.complete(pending[:1])
        done += 1
        pending = pending[1:]
        if done <= 3:
            pending.extend(stream.assignments(1))
    assert done == 5
    assert all(t.status == mpb.TASK_STATUS_COMPLETED for t in list_all(pool, alice))


def test_the_least_loaded_node_goes_first(
    pool: Pool, pki_ca: Any, tmp_path: Path, nodes: list[RawNode]
) -> None:
    alice = pool.new_user("alice")
    a = new_node(pool, pki_ca, tmp_path, nodes, alice, task_slots=4)
    b = new_node(pool, pki_ca, tmp_path, nodes, alice, task_slots=4)
    a_stream, b_stream = a.pull(), b.pull()
    stub = tasks_stub(pool)
    stub.SubmitTasks(
        mpb.SubmitTasksRequest(tasks=[mpb.SubmitTaskRequest(task_type="echo")] * 4),
        metadata=alice.auth,
        timeout=10,
    )
    on_a = a_stream.assignments(2)
    on_b = b_stream.assignments(2)
    time.sleep(1.0)
    assert a_stream.drain() == [], "4 tasks did not split 2 and 2"
    assert b_stream.drain() == [], "4 tasks did not split 2 and 2"
    # a finishes both: a is now empty, b holds 2, so the next two both go to a.
    a.complete(on_a)
    stub.SubmitTasks(
        mpb.SubmitTasksRequest(tasks=[mpb.SubmitTaskRequest(task_type="echo")] * 2),
        metadata=alice.auth,
        timeout=10,
    )
    assert len(a_stream.assignments(2)) == 2
    time.sleep(1.0)
    assert b_stream.drain() == []
    b.complete(on_b)


def _run_one_at_a_time(node: RawNode, stream: Any, count: int) -> list[str]:
    """Completes tasks one by one on a one-slot node; returns the order they came in."""
    order = []
    for _ in range(count):
        (assignment,) = stream.assignments(1)
        order.append(assignment.task_id)
        node.complete([assignment])
    return order


def test_priority_first_then_first_in_first_out(
    pool: Pool, pki_ca: Any, tmp_path: Path, nodes: list[RawNode]
) -> None:
    alice = pool.new_user("alice")
    node = new_node(pool, pki_ca, tmp_path, nodes, alice, task_slots=1)
    stream = node.pull()
    blocker = submit(pool, alice)
    (first,) = stream.assignments(1)
    assert first.task_id == blocker.task_id
    low1 = submit(pool, alice, priority=0)
    low2 = submit(pool, alice, priority=0)
    high = submit(pool, alice, priority=50)
    lowest = submit(pool, alice, priority=-5)
    low3 = submit(pool, alice, priority=0)
    node.complete([first])
    order = _run_one_at_a_time(node, stream, 5)
    assert order == [high.task_id, low1.task_id, low2.task_id, low3.task_id, lowest.task_id]


def test_one_owners_flood_does_not_starve_another(
    pool: Pool, pki_ca: Any, tmp_path: Path, nodes: list[RawNode]
) -> None:
    flooder, other = pool.new_user("flood"), pool.new_user("other")
    node = new_node(pool, pki_ca, tmp_path, nodes, flooder, task_slots=1)
    stream = node.pull()
    flood = (
        tasks_stub(pool)
        .SubmitTasks(
            mpb.SubmitTasksRequest(tasks=[mpb.SubmitTaskRequest(task_type="echo")] * 50),
            metadata=flooder.auth,
            timeout=10,
        )
        .tasks
    )
    (first,) = stream.assignments(1)
    assert first.task_id == flood[0].task_id
    single = submit(pool, other)
    node.complete([first])
    order = _run_one_at_a_time(node, stream, 3)
    # FIFO alone would run it 50th; taking turns, it runs right after the flood's next one.
    assert single.task_id in order[:2], order
    # Within the flooder's own tasks, order is first in, first out.
    flooders = [task_id for task_id in order if task_id != single.task_id]
    assert flooders == [t.task_id for t in flood[1 : 1 + len(flooders)]]


def _hammer(
    pool: Pool,
    submitters: list[Account],
    nodes: list[RawNode],
    per_submitter: int,
    batch: int,
) -> None:
    """Submits from several threads while every node completes what it gets at once;
    asserts each (task, attempt) went to exactly one node and every task completed once."""
    delivered: dict[tuple[str, int], list[str]] = defaultdict(list)
    lock = threading.Lock()
    submitted: list[str] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def work(node: RawNode) -> None:
        stream = node.pull()
        try:
            while not done.is_set():
                for message in stream.drain(0.2):
                    with lock:
                        for a in message.assignments:
                            delivered[(a.task_id, a.attempt)].append(node.node_id)
                    if message.assignments:
                        results = node.complete(message.assignments)
                        assert all(r.accepted for r in results), results
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def send(account: Account) -> None:
        try:
            for start in range(0, per_submitter, batch):
                reply = tasks_stub(pool).SubmitTasks(
                    mpb.SubmitTasksRequest(
                        tasks=[
                            mpb.SubmitTaskRequest(task_type="echo", payload=f"{i}".encode())
                            for i in range(start, min(start + batch, per_submitter))
                        ]
                    ),
                    metadata=account.auth,
                    timeout=30,
                )
                with lock:
                    submitted.extend(t.task_id for t in reply.tasks)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(node,)) for node in nodes]
    senders = [threading.Thread(target=send, args=(account,)) for account in submitters]
    for thread in [*workers, *senders]:
        thread.start()
    for thread in senders:
        thread.join()
    total = per_submitter * len(submitters)

    def all_completed() -> bool:
        return all(
            len(list_all(pool, pool.admin, status=mpb.TASK_STATUS_COMPLETED, owner=a.username))
            == per_submitter
            for a in submitters
        )

    try:
        eventually(all_completed, 60, "every task completed")
    finally:
        done.set()
        for thread in workers:
            thread.join()
    assert not errors, errors
    assert len(set(submitted)) == total
    doubles = {key: where for key, where in delivered.items() if len(where) != 1}
    assert not doubles, f"delivered to more than one node: {doubles}"
    assert {task_id for task_id, _ in delivered} == set(submitted)
    for task in list_all(pool, pool.admin):
        assert task.attempts == 1, task
    assert len({where[0] for where in delivered.values()}) > 1, "one node took everything"


def test_a_task_is_never_given_to_two_nodes_at_once(
    pool: Pool, pki_ca: Any, tmp_path: Path, nodes: list[RawNode]
) -> None:
    submitters = [pool.new_user(f"sub{i}") for i in range(3)]
    for i in range(5):
        new_node(pool, pki_ca, tmp_path, nodes, submitters[i % 3], task_slots=8)
    _hammer(pool, submitters, nodes, per_submitter=100, batch=20)


# -- delivery, results and status ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_oversized_result_fails_the_task_with_a_reason(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    backend: str,
    pki_ca: Any,
    nodes: list[RawNode],
) -> None:
    with start_pool(request, tmp_path, backend, max_task_result_bytes=64) as pool:
        alice = pool.new_user("alice")
        node = new_node(pool, pki_ca, tmp_path, nodes, alice)
        stream = node.pull()
        task = submit(pool, alice, max_attempts=1)
        (a,) = stream.assignments(1)
        (verdict,) = node.report(report(a.task_id, a.attempt, result=b"r" * 65, exit_code=0))
        assert verdict.accepted
        final = status_of(pool, alice, task.task_id)
        assert final.status == mpb.TASK_STATUS_FAILED
        assert final.error == "result exceeds 64 bytes"
        assert final.result == b""
        # Exactly at the limit is fine.
        ok = submit(pool, alice)
        (b,) = stream.assignments(1)
        node.report(report(b.task_id, b.attempt, result=b"r" * 64))
        assert status_of(pool, alice, ok.task_id).result == b"r" * 64


def test_status_shows_progress_timestamps_node_attempts_and_result(
    pool: Pool, pki_ca: Any, tmp_path: Path, nodes: list[RawNode]
) -> None:
    alice = pool.new_user("alice")
    node = new_node(pool, pki_ca, tmp_path, nodes, alice)
    stream = node.pull()
    task = submit(pool, alice, "sha256", payload=b"abc")
    (a,) = stream.assignments(1)
    assert (a.task_type, a.payload, a.attempt) == ("sha256", b"abc", 1)
    assigned = status_of(pool, alice, task.task_id)
    assert assigned.status == mpb.TASK_STATUS_ASSIGNED
    assert assigned.assigned_node_id == node.node_id
    assert assigned.attempts == 1
    node.report(report(a.task_id, 1, mpb.TASK_REPORT_STATE_RUNNING, progress=0.5))
    running = status_of(pool, alice, task.task_id)
    assert running.status == mpb.TASK_STATUS_RUNNING
    assert running.progress == pytest.approx(0.5)
    assert running.HasField("started_at")

    # A long poll answers as soon as the task finishes, not at the end of the wait.
    def finish() -> None:
        time.sleep(0.5)
        node.report(report(a.task_id, 1, result=b"digest", exit_code=0))

    finisher = threading.Thread(target=finish)
    finisher.start()
    began = time.monotonic()
    done = status_of(pool, alice, task.task_id, wait=30)
    waited = time.monotonic() - began
    finisher.join()
    assert waited < 20, waited
    assert done.status == mpb.TASK_STATUS_COMPLETED
    assert done.result == b"digest"
    assert done.exit_code == 0
    assert done.progress == pytest.approx(1.0)
    assert done.HasField("finished_at")
    assert done.HasField("created_at")
    assert done.finished_at.ToDatetime() >= done.started_at.ToDatetime()
    assert done.payload == b"abc"
    # wait_seconds above 60 is refused.
    refused(lambda: status_of(pool, alice, task.task_id, wait=61), INVALID)


def test_listing_filters_by_status_and_pages_stably(
    pool: Pool, pki_ca: Any, tmp_path: Path, nodes: list[RawNode]
) -> None:
    alice, bob = pool.new_user("alice"), pool.new_user("bob")
    node = new_node(pool, pki_ca, tmp_path, nodes, alice, task_slots=5)
    ids = [submit(pool, alice, payload=f"{i}".encode()).task_id for i in range(23)]
    stream = node.pull()
    node.complete(stream.assignments(5))
    bob_task = submit(pool, bob)
    stub = tasks_stub(pool)

    def page(token: str, **filters: Any) -> mpb.ListTasksResponse:
        return stub.ListTasks(
            mpb.ListTasksRequest(page_size=4, page_token=token, **filters),
            metadata=alice.auth,
            timeout=10,
        )

    # Page by page while new tasks keep arriving: nothing repeats and nothing is skipped.
    seen: list[str] = []
    token = ""
    while True:
        reply = page(token)
        seen.extend(t.task_id for t in reply.tasks)
        assert all(not t.payload and not t.result for t in reply.tasks)
        submit(pool, alice)  # newer than the cursor: never shows up behind it
        token = reply.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids)), "newest first, each task once"
    completed = {t.task_id for t in list_all(pool, alice, status=mpb.TASK_STATUS_COMPLETED)}
    assert len(completed) == 5
    assert completed <= set(ids)
    pending = list_all(pool, alice, status=mpb.TASK_STATUS_PENDING)
    assert all(t.status == mpb.TASK_STATUS_PENDING for t in pending)
    assert bob_task.task_id not in {t.task_id for t in list_all(pool, alice)}
    # The admin sees everyone's, and may narrow to one owner.
    everyone = {t.task_id for t in list_all(pool, pool.admin)}
    assert bob_task.task_id in everyone
    assert set(ids) <= everyone
    bobs = list_all(pool, pool.admin, owner=bob.username)
    assert [t.task_id for t in bobs] == [bob_task.task_id]
    refused(lambda: page("not-a-token"), INVALID)


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_pending_at_once_and_running_on_its_node(
    pool: Pool, pki_ca: Any, tmp_path: Path, nodes: list[RawNode]
) -> None:
    alice = pool.new_user("alice")
    stub = tasks_stub(pool)
    waiting = submit(pool, alice)
    reply = stub.CancelTask(
        mpb.CancelTaskRequest(task_id=waiting.task_id), metadata=alice.auth, timeout=10
    )
    assert reply.task.status == mpb.TASK_STATUS_CANCELLED
    assert pool.store.get_task(waiting.task_id).status == "cancelled"
    # Cancelling again: it has already finished.
    refused(
        lambda: stub.CancelTask(
            mpb.CancelTaskRequest(task_id=waiting.task_id), metadata=alice.auth, timeout=10
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )

    node = new_node(pool, pki_ca, tmp_path, nodes, alice)
    stream = node.pull()
    running = submit(pool, alice, "sleep", payload=b"60")
    (a,) = stream.assignments(1)
    node.report(report(a.task_id, a.attempt, mpb.TASK_REPORT_STATE_RUNNING))
    reply = stub.CancelTask(
        mpb.CancelTaskRequest(task_id=running.task_id), metadata=pool.admin.auth, timeout=10
    )
    assert reply.task.status == mpb.TASK_STATUS_CANCELLED
    assert stream.stop_ids() == [running.task_id]
    # What the node says afterwards does not bring the task back.
    (late,) = node.report(report(a.task_id, a.attempt, result=b"late"))
    assert not late.accepted
    assert late.code == "FAILED_PRECONDITION"
    final = status_of(pool, alice, running.task_id)
    assert final.status == mpb.TASK_STATUS_CANCELLED
    assert final.result == b""


# -- node loss, retries, timeouts ------------------------------------------------------------


def _keep_beating(stop: threading.Event, *nodes: RawNode) -> threading.Thread:
    def beat() -> None:
        while not stop.wait(0.3):
            for node in nodes:
                node.heartbeat()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_lost_nodes_task_runs_again_elsewhere_then_fails_out_of_attempts(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    backend: str,
    pki_ca: Any,
    nodes: list[RawNode],
) -> None:
    with start_pool(request, tmp_path, backend, node_heartbeat_interval=1, node_timeout=3) as pool:
        alice = pool.new_user("alice")
        doomed = new_node(pool, pki_ca, tmp_path, nodes, alice, task_slots=1)
        doomed_stream = doomed.pull()
        task = submit(pool, alice, max_attempts=2, payload=b"again")
        (first,) = doomed_stream.assignments(1)
        doomed.report(report(first.task_id, 1, mpb.TASK_REPORT_STATE_RUNNING))
        # doomed never beats again; survivor joins and keeps beating.
        survivor = new_node(pool, pki_ca, tmp_path, nodes, alice, task_slots=1)
        stop = threading.Event()
        beating = _keep_beating(stop, survivor)
        try:
            survivor_stream = survivor.pull()
            (second,) = survivor_stream.assignments(1, seconds=15)
            assert (second.task_id, second.attempt) == (task.task_id, 2)
            seen = status_of(pool, alice, task.task_id)
            assert seen.assigned_node_id == survivor.node_id
            assert seen.attempts == 2
            # The lost node's word on its old attempt is refused and changes nothing.
            (late,) = doomed.report(report(first.task_id, 1, result=b"stale"))
            assert late.code == "FAILED_PRECONDITION"
            (ok,) = survivor.complete([second])
            assert ok.accepted
            done = status_of(pool, alice, task.task_id)
            assert (done.status, done.result, done.attempts) == (
                mpb.TASK_STATUS_COMPLETED,
                b"again",
                2,
            )

            # max_attempts=1 and its node is lost: the task fails, and says why.
            once = submit(pool, alice, max_attempts=1)
            (only,) = survivor_stream.assignments(1)
            stop.set()
            beating.join()
            failed = eventually(
                lambda: (
                    (t := status_of(pool, alice, once.task_id)).status == mpb.TASK_STATUS_FAILED
                    and t
                ),
                15,
                "the task failed after its node was lost",
            )
            assert failed.error == "node lost"
            assert failed.attempts == 1
            assert only.task_id == once.task_id
        finally:
            stop.set()


def test_a_failed_attempt_is_retried_until_max_attempts(
    pool: Pool, pki_ca: Any, tmp_path: Path, nodes: list[RawNode]
) -> None:
    alice = pool.new_user("alice")
    node = new_node(pool, pki_ca, tmp_path, nodes, alice)
    stream = node.pull()
    task = submit(pool, alice, max_attempts=3)
    for attempt in (1, 2, 3):
        (a,) = stream.assignments(1)
        assert a.attempt == attempt
        (verdict,) = node.report(
            report(a.task_id, a.attempt, mpb.TASK_REPORT_STATE_FAILED, error="boom", exit_code=2)
        )
        assert verdict.accepted
    final = status_of(pool, alice, task.task_id)
    assert final.status == mpb.TASK_STATUS_FAILED
    assert final.attempts == 3
    assert final.error == "boom"
    assert final.exit_code == 2
    time.sleep(1.5)
    assert not [m for m in stream.drain() if m.assignments], "a fourth attempt"


def test_a_task_past_its_timeout_is_stopped_and_failed(
    pool: Pool, pki_ca: Any, tmp_path: Path, nodes: list[RawNode]
) -> None:
    alice = pool.new_user("alice")
    node = new_node(pool, pki_ca, tmp_path, nodes, alice)
    stream = node.pull()
    task = submit(pool, alice, "sleep", payload=b"60", timeout_seconds=1, max_attempts=3)
    (a,) = stream.assignments(1)
    node.report(report(a.task_id, a.attempt, mpb.TASK_REPORT_STATE_RUNNING))
    assert stream.stop_ids(seconds=10) == [task.task_id]
    final = status_of(pool, alice, task.task_id)
    assert final.status == mpb.TASK_STATUS_FAILED
    assert final.error == "timed out"
    (late,) = node.report(report(a.task_id, a.attempt, result=b"too late"))
    assert late.code == "FAILED_PRECONDITION"
    assert status_of(pool, alice, task.task_id).status == mpb.TASK_STATUS_FAILED


# -- retention -------------------------------------------------------------------------------


def test_finished_tasks_older_than_the_retention_are_removed(
    pool: Pool, pki_ca: Any, tmp_path: Path, nodes: list[RawNode]
) -> None:
    alice = pool.new_user("alice")
    node = new_node(pool, pki_ca, tmp_path, nodes, alice, task_slots=3)
    stream = node.pull()
    old_done, new_done, old_running = (submit(pool, alice) for _ in range(3))
    got = {a.task_id: a for a in stream.assignments(3)}
    node.complete([got[old_done.task_id], got[new_done.task_id]])
    node.report(report(old_running.task_id, 1, mpb.TASK_REPORT_STATE_RUNNING))
    still_pending = submit(pool, alice, labels={"nowhere": "at-all"})
    days = pool.settings.completed_task_retention_days
    assert days == 7
    # Backdate: "old" rows finished (or were made) eight days ago.
    eight_days_ago = retention_cutoff(days) - timedelta(days=1)
    with pool.store.engine.begin() as conn:
        conn.execute(
            update(Task)
            .where(Task.id == old_done.task_id)
            .values(finished_at=eight_days_ago, created_at=eight_days_ago)
        )
        conn.execute(
            update(Task)
            .where(Task.id.in_([old_running.task_id, still_pending.task_id]))
            .values(created_at=eight_days_ago, updated_at=eight_days_ago)
        )
    # What the server's hourly retention job runs.
    removed = pool.store.delete_finished_tasks_before(retention_cutoff(days))
    assert removed == 1
    remaining = {t.task_id: t.status for t in list_all(pool, pool.admin)}
    assert old_done.task_id not in remaining
    assert remaining[new_done.task_id] == mpb.TASK_STATUS_COMPLETED
    assert remaining[old_running.task_id] == mpb.TASK_STATUS_RUNNING
    assert remaining[still_pending.task_id] == mpb.TASK_STATUS_PENDING
    refused(lambda: status_of(pool, alice, old_done.task_id), grpc.StatusCode.NOT_FOUND)
