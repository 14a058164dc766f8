"""The real ``nodepool worker`` running tasks (issue 9): cancel stops a running task, a
killed worker's task re-runs elsewhere, ``python`` only when the owner allows it, and a
``kill -9`` of the server mid-run loses nothing and completes nothing twice.

Workers (and, for the crash test, the server) are real subprocesses with certificates from
our CA, talking mTLS; the test only submits, watches and reads the database.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from nodepool.client import secure_channel
from nodepool.v1 import master_node_pb2 as mpb
from nodepool.v1 import master_node_pb2_grpc as mgrpc
from nodepool.v1 import node_manager_pb2 as npb
from nodepool.v1 import node_manager_pb2_grpc as ngrpc
from nodepool.v1 import user_manager_pb2 as upb
from nodepool.v1 import user_manager_pb2_grpc as ugrpc
from tests.fixtures.accounts import Account, Pool, start_pool
from tests.fixtures.server import PASSWORD, bearer
from tests.fixtures.tasks import eventually, status_of, submit, workers

BIN = Path(sys.executable).parent


def _wait_status(
    pool: Pool, account: Account, task_id: str, status: int, seconds: float
) -> mpb.Task:
    def check() -> mpb.Task | None:
        task = status_of(pool, account, task_id, wait=1)
        return task if task.status == status else None

    return eventually(check, seconds, f"task {task_id} reaching {mpb.TaskStatus.Name(status)}")


def test_cancelling_a_running_task_stops_it_on_the_worker(
    request: pytest.FixtureRequest, tmp_path: Path, pki_ca: Any
) -> None:
    with start_pool(request, tmp_path, "memory") as pool:
        alice = pool.new_user("alice")
        with workers(pool.server.target, pki_ca, tmp_path, alice.username) as (worker,):
            task = submit(pool, alice, "sleep", payload=b"120")
            running = _wait_status(pool, alice, task.task_id, mpb.TASK_STATUS_RUNNING, 30)
            assert running.assigned_node_id == worker.node_id
            reply = mgrpc.MasterNodeServiceStub(pool.channel()).CancelTask(
                mpb.CancelTaskRequest(task_id=task.task_id), metadata=alice.auth, timeout=10
            )
            assert reply.task.status == mpb.TASK_STATUS_CANCELLED
            # The worker's stream carried stop_task_ids, and the worker stopped the sleep.
            eventually(
                lambda: f"stopping task {task.task_id}" in worker.log(), 10, "the worker stops it"
            )
            eventually(lambda: f"task {task.task_id} stopped" in worker.log(), 10)
            time.sleep(1.0)  # anything the worker might still say about it
            final = status_of(pool, alice, task.task_id)
            assert final.status == mpb.TASK_STATUS_CANCELLED
            # The slot is free again: the worker runs the next task at once.
            after = submit(pool, alice, payload=b"next")
            done = status_of(pool, alice, after.task_id, wait=30)
            assert (done.status, done.result) == (mpb.TASK_STATUS_COMPLETED, b"next")


def test_a_killed_workers_task_runs_again_on_another_worker(
    request: pytest.FixtureRequest, tmp_path: Path, pki_ca: Any
) -> None:
    with start_pool(request, tmp_path, "memory", node_heartbeat_interval=1, node_timeout=3) as pool:
        alice = pool.new_user("alice")
        with workers(
            pool.server.target, pki_ca, tmp_path, alice.username, 2, NODEPOOL_WORKER_TASK_SLOTS="1"
        ) as crew:
            task = submit(pool, alice, "sleep", payload=b"4", max_attempts=3)
            running = _wait_status(pool, alice, task.task_id, mpb.TASK_STATUS_RUNNING, 30)
            (victim,) = [w for w in crew if w.node_id == running.assigned_node_id]
            (survivor,) = [w for w in crew if w is not victim]
            victim.kill()
            # Node timeout 3 s: the task goes back to the queue and to the survivor.
            done = _wait_status(pool, alice, task.task_id, mpb.TASK_STATUS_COMPLETED, 45)
            assert done.assigned_node_id == survivor.node_id
            assert done.attempts == 2
            assert done.error == ""
            attempts = [
                (row.attempt, row.node_id)
                for row in pool.store.engine.connect().execute(
                    text(
                        "SELECT attempt, node_id FROM task_attempts WHERE task_id = :t"
                        " ORDER BY attempt"
                    ),
                    {"t": task.task_id},
                )
            ]
            assert attempts == [(1, victim.node_id), (2, survivor.node_id)]


def test_python_runs_only_where_the_owner_enabled_it(
    request: pytest.FixtureRequest, tmp_path: Path, pki_ca: Any
) -> None:
    script = b"import sys\nprint('hello from', sys.version_info[0])\n"
    with start_pool(request, tmp_path, "memory") as pool:
        alice = pool.new_user("alice")
        with workers(pool.server.target, pki_ca, tmp_path, alice.username) as (plain,):
            task = submit(pool, alice, "python", payload=script, max_attempts=1)
            refused = status_of(pool, alice, task.task_id, wait=30)
            assert refused.status == mpb.TASK_STATUS_FAILED
            assert refused.error == "task type python is not enabled on this worker"
            assert refused.result == b""
        # The stopped worker would count as online until the node timeout: remove it.
        ngrpc.NodeManagerStub(pool.channel()).RemoveNode(
            npb.RemoveNodeRequest(node_id=plain.node_id), metadata=pool.admin.auth, timeout=10
        )
        with workers(
            pool.server.target, pki_ca, tmp_path, alice.username, NODEPOOL_WORKER_ALLOW_PYTHON="1"
        ):
            task = submit(pool, alice, "python", payload=script, max_attempts=1)
            ran = status_of(pool, alice, task.task_id, wait=30)
            assert ran.status == mpb.TASK_STATUS_COMPLETED, ran.error
            assert ran.result == b"hello from 3\n"
            assert ran.exit_code == 0


# -- crash safety: kill -9 of the server mid-run -----------------------------------------------

TOTAL = 2000
BATCH = 200


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_serving(target: str, client_cert: Any, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited with {process.returncode}"
        channel = secure_channel(
            target, cert=client_cert.cert_path, key=client_cert.key_path, ca=client_cert.ca_path
        )
        try:
            grpc.channel_ready_future(channel).result(timeout=1)
            return
        except grpc.FutureTimeoutError:
            time.sleep(0.2)
        finally:
            channel.close()
    raise AssertionError("the server did not start")


def test_a_server_killed_mid_run_loses_nothing_and_completes_each_task_once(
    pki_ca: Any, server_cert: Any, client_cert: Any, tmp_path: Path
) -> None:
    port = _free_port()
    target = f"localhost:{port}"
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODEPOOL_")}
    env.update(
        NODEPOOL_GRPC_PORT=str(port),
        NODEPOOL_GRPC_HOST="localhost",
        NODEPOOL_DATA_DIR=str(data),
        NODEPOOL_TRUST_DOMAIN="nodepool.test",
        NODEPOOL_PKI_DIR=str(pki_ca.directory),
        NODEPOOL_TLS_CERT=str(server_cert.cert_path),
        NODEPOOL_TLS_KEY=str(server_cert.key_path),
        NODEPOOL_TLS_CA=str(server_cert.ca_path),
        NODEPOOL_PASSWORD_HASH_TIME_COST="1",
        NODEPOOL_PASSWORD_HASH_MEMORY_KIB="1024",
        NODEPOOL_NODE_HEARTBEAT_INTERVAL="2",
        NODEPOOL_NODE_TIMEOUT="6",
        NODEPOOL_LOG_LEVEL="WARNING",
    )
    username = f"crash-{uuid.uuid4().hex[:6]}"
    with ExitStack() as stack:
        logs = stack.enter_context((tmp_path / "server.log").open("ab"))

        def serve() -> subprocess.Popen[bytes]:
            process = subprocess.Popen([BIN / "nodepool", "serve"], env=env, stderr=logs)
            _wait_serving(target, client_cert, process)
            return process

        server = serve()

        def stop_server() -> None:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait(timeout=10)

        stack.callback(stop_server)
        channel = secure_channel(
            target, cert=client_cert.cert_path, key=client_cert.key_path, ca=client_cert.ca_path
        )
        stack.callback(channel.close)
        users = ugrpc.UserManagerStub(channel)
        users.RegisterUser(
            upb.RegisterUserRequest(username=username, password=PASSWORD), timeout=10
        )

        def login() -> tuple[tuple[str, str]]:
            reply = users.LoginUser(
                upb.LoginUserRequest(username=username, password=PASSWORD), timeout=10
            )
            return bearer(reply.access_token)

        auth = login()
        stub = mgrpc.MasterNodeServiceStub(channel)
        crew = stack.enter_context(
            workers(target, pki_ca, tmp_path, username, 3, NODEPOOL_WORKER_TASK_SLOTS="8")
        )
        for worker in crew:
            eventually(
                lambda w=worker: f"worker {w.node_id} connected" in w.log(),
                60,
                f"{worker.node_id} connected",
            )
        acknowledged: dict[str, str] = {}  # task id -> payload
        killed = False
        for start in range(0, TOTAL, BATCH):
            batch = [
                mpb.SubmitTaskRequest(
                    task_type="echo", payload=f"t{i}".encode(), idempotency_key=f"crash-{i}"
                )
                for i in range(start, start + BATCH)
            ]
            while True:
                try:
                    reply = stub.SubmitTasks(
                        mpb.SubmitTasksRequest(tasks=batch), metadata=auth, timeout=10
                    )
                    break
                except grpc.RpcError as exc:
                    # The server is down (we killed it): a client retries with the same keys.
                    assert exc.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ), exc
                    time.sleep(0.2)
            for item, task in zip(batch, reply.tasks, strict=True):
                acknowledged[task.task_id] = item.payload.decode()
            if not killed and start >= TOTAL // 2:
                # Mid-run: half submitted, workers busy reporting. kill -9, then restart.
                server.send_signal(signal.SIGKILL)
                server.wait(timeout=10)
                killed = True
                server = serve()
                auth = login()
        assert killed
        assert len(acknowledged) == TOTAL

        database = data / "nodepool.db"
        assert database.exists(), sorted(p.name for p in data.iterdir())

        def counts() -> dict[str, int]:
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as db:
                return dict(
                    db.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall()
                )

        eventually(
            lambda: counts().get("completed", 0) >= TOTAL, 90, f"{TOTAL} completed: {counts()}"
        )
        time.sleep(1.0)  # any late duplicate report would land now
        for worker in crew:
            assert worker.process.poll() is None, worker.log()

    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT id, status, result, attempts, assigned_node_id FROM tasks"
        ).fetchall()
        attempts: dict[str, list[tuple[int, str]]] = {}
        for task_id, attempt, node_id in db.execute(
            "SELECT task_id, attempt, node_id FROM task_attempts ORDER BY task_id, attempt"
        ):
            attempts.setdefault(task_id, []).append((attempt, node_id))
    # Every acknowledged task is there, exactly once, completed once with its own result.
    assert len(rows) == TOTAL
    by_id = {row[0]: row for row in rows}
    assert set(by_id) == set(acknowledged)
    for task_id, payload in acknowledged.items():
        _, status, result, tried, node_id = by_id[task_id]
        assert status == "completed", by_id[task_id]
        assert bytes(result) == payload.encode()
        # Several attempts are allowed (the kill may cut one short) but one completion: the
        # one row's result came from the node holding the last attempt, numbered 1, 2, ...
        history = attempts[task_id]
        assert [number for number, _ in history] == list(range(1, tried + 1))
        assert history[-1][1] == node_id
    retried = sum(1 for history in attempts.values() if len(history) > 1)
    print(f"{retried} of {TOTAL} tasks took more than one attempt")
    assert "Traceback" not in (tmp_path / "server.log").read_text(errors="replace")
