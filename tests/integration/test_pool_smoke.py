"""Smoke: a node registers, heartbeats, pulls a task, reports it; the user reads the result."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from nodepool.client import secure_channel
from nodepool.v1 import master_node_pb2 as mpb
from nodepool.v1 import master_node_pb2_grpc as mgrpc
from nodepool.v1 import node_manager_pb2 as npb
from nodepool.v1 import node_manager_pb2_grpc as ngrpc
from tests.fixtures.accounts import BACKENDS, start_pool


@pytest.mark.parametrize("backend", BACKENDS)
def test_task_round_trip(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, pki_ca: Any
) -> None:
    with start_pool(request, tmp_path, backend) as pool:
        alice = pool.new_user("alice")
        node_name = f"node-{uuid.uuid4().hex[:6]}"
        issued = pki_ca.issue("node", node_name, tmp_path / "node", owner=alice.username)
        node_channel = secure_channel(
            pool.server.target, cert=issued.cert_path, key=issued.key_path, ca=issued.ca_path
        )
        nodes = ngrpc.NodeManagerStub(node_channel)
        reply = nodes.RegisterNode(
            npb.RegisterNodeRequest(ip_address="127.0.0.1", cpu_cores=2, memory_gb=4, disk_gb=10),
            timeout=10,
        )
        assert reply.node.node_id == node_name
        nodes.UpdateNodeStatus(
            npb.UpdateNodeStatusRequest(status=npb.NODE_STATUS_ONLINE), timeout=10
        )
        tasks = mgrpc.MasterNodeServiceStub(pool.channel())
        submitted = tasks.SubmitTask(
            mpb.SubmitTaskRequest(task_type="echo", payload=b"hi"), metadata=alice.auth, timeout=10
        )
        worker = mgrpc.MasterNodeServiceStub(node_channel)
        stream = worker.PullTasks(mpb.PullTasksRequest(), timeout=10)
        message = next(stream)
        (assignment,) = message.assignments
        assert assignment.task_id == submitted.task_id
        result = worker.ReportTasks(
            mpb.ReportTasksRequest(
                reports=[
                    mpb.TaskReport(
                        task_id=assignment.task_id,
                        attempt=assignment.attempt,
                        state=mpb.TASK_REPORT_STATE_COMPLETED,
                        result=assignment.payload,
                    )
                ]
            ),
            timeout=10,
        )
        assert result.results[0].accepted, result
        stream.cancel()
        status = tasks.GetTaskStatus(
            mpb.GetTaskStatusRequest(task_id=submitted.task_id, wait_seconds=5),
            metadata=alice.auth,
            timeout=10,
        )
        assert status.task.status == mpb.TASK_STATUS_COMPLETED
        assert status.task.result == b"hi"
        listed = ngrpc.NodeManagerStub(pool.channel()).GetNodeList(
            npb.GetNodeListRequest(), metadata=alice.auth, timeout=10
        )
        assert [n.node_id for n in listed.nodes] == [node_name]
        node_channel.close()
