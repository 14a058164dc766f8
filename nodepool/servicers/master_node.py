"""MasterNodeService: tasks for users, and their delivery to workers, over :class:`TaskService`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from nodepool.auth.principal import current_principal
from nodepool.domain.tasks import TaskService, TaskSubmission
from nodepool.errors import InvalidArgumentError
from nodepool.servicers._convert import timestamp
from nodepool.status import translate_errors
from nodepool.store import ReportState, ReportVerdict, TaskRecord, TaskReportIn
from nodepool.v1 import master_node_pb2 as pb
from nodepool.v1 import master_node_pb2_grpc as pb_grpc

__all__ = ["MasterNodeServicer", "task_message"]

_Context = grpc.aio.ServicerContext[Any, Any]

_STATUS_NAMES: dict[pb.TaskStatus.ValueType, str] = {
    pb.TASK_STATUS_PENDING: "pending",
    pb.TASK_STATUS_ASSIGNED: "assigned",
    pb.TASK_STATUS_RUNNING: "running",
    pb.TASK_STATUS_COMPLETED: "completed",
    pb.TASK_STATUS_FAILED: "failed",
    pb.TASK_STATUS_CANCELLED: "cancelled",
}
_STATUS_VALUES = {name: value for value, name in _STATUS_NAMES.items()}
_REPORT_STATES = {
    pb.TASK_REPORT_STATE_RUNNING: ReportState.RUNNING,
    pb.TASK_REPORT_STATE_COMPLETED: ReportState.COMPLETED,
    pb.TASK_REPORT_STATE_FAILED: ReportState.FAILED,
}
_VERDICT_CODES = {
    ReportVerdict.ACCEPTED: "",
    ReportVerdict.NOT_FOUND: grpc.StatusCode.NOT_FOUND.name,
    ReportVerdict.NOT_ASSIGNED: grpc.StatusCode.PERMISSION_DENIED.name,
    ReportVerdict.STALE: grpc.StatusCode.FAILED_PRECONDITION.name,
}
_VERDICT_MESSAGES = {
    ReportVerdict.ACCEPTED: "",
    ReportVerdict.NOT_FOUND: "no such task",
    ReportVerdict.NOT_ASSIGNED: "the task was never assigned to this node",
    ReportVerdict.STALE: "the task is no longer assigned to this node at this attempt",
}


def task_message(task: TaskRecord, *, full: bool = True) -> pb.Task:
    message = pb.Task(
        task_id=task.id,
        owner=task.owner,
        task_type=task.task_type,
        status=_STATUS_VALUES.get(task.status, pb.TASK_STATUS_UNSPECIFIED),
        requirements=pb.ResourceRequirements(
            cpu_cores=task.required_cpu_cores, memory_gb=task.required_memory_gb
        ),
        assigned_node_id=task.assigned_node_id or "",
        error=task.error or "",
        attempts=task.attempts,
        max_attempts=task.max_attempts,
        progress=task.progress,
        created_at=timestamp(task.created_at),
        updated_at=timestamp(task.updated_at),
        started_at=timestamp(task.started_at),
        finished_at=timestamp(task.finished_at),
        priority=task.priority,
        labels=dict(task.required_labels),
        timeout_seconds=task.timeout_seconds,
    )
    if task.exit_code is not None:
        message.exit_code = task.exit_code
    if full:
        message.payload = task.payload
        message.result = task.result or b""
    return message


def _submission(request: pb.SubmitTaskRequest) -> TaskSubmission:
    return TaskSubmission(
        task_type=request.task_type,
        payload=request.payload,
        cpu_cores=request.requirements.cpu_cores,
        memory_gb=request.requirements.memory_gb,
        max_attempts=request.max_attempts,
        timeout_seconds=request.timeout_seconds,
        idempotency_key=request.idempotency_key,
        priority=request.priority,
        labels=dict(request.labels),
    )


def _status_name(value: pb.TaskStatus.ValueType) -> str | None:
    if value == pb.TASK_STATUS_UNSPECIFIED:
        return None
    try:
        return _STATUS_NAMES[value]
    except KeyError:
        raise InvalidArgumentError("unknown task status") from None


def _report(report: pb.TaskReport) -> TaskReportIn:
    try:
        state = _REPORT_STATES[report.state]
    except KeyError:
        raise InvalidArgumentError("each report needs a state") from None
    return TaskReportIn(
        task_id=report.task_id,
        attempt=report.attempt,
        state=state,
        progress=report.progress,
        result=report.result,
        error=report.error,
        exit_code=report.exit_code if report.HasField("exit_code") else None,
    )


class MasterNodeServicer(pb_grpc.MasterNodeServiceServicer):
    def __init__(self, tasks: TaskService) -> None:
        self._tasks = tasks

    async def SubmitTask(
        self, request: pb.SubmitTaskRequest, context: _Context
    ) -> pb.SubmitTaskResponse:
        async with translate_errors(context):
            (task,) = await self._tasks.submit(current_principal(), [_submission(request)])
        return pb.SubmitTaskResponse(
            success=True,
            message="submitted",
            task_id=task.id,
            task=task_message(task, full=False),
        )

    async def SubmitTasks(
        self, request: pb.SubmitTasksRequest, context: _Context
    ) -> pb.SubmitTasksResponse:
        async with translate_errors(context):
            tasks = await self._tasks.submit(
                current_principal(), [_submission(item) for item in request.tasks]
            )
        return pb.SubmitTasksResponse(tasks=[task_message(task, full=False) for task in tasks])

    async def GetTaskStatus(
        self, request: pb.GetTaskStatusRequest, context: _Context
    ) -> pb.GetTaskStatusResponse:
        async with translate_errors(context):
            task = await self._tasks.status(
                current_principal(), request.task_id, request.wait_seconds
            )
        return pb.GetTaskStatusResponse(task=task_message(task))

    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: _Context
    ) -> pb.CancelTaskResponse:
        async with translate_errors(context):
            task = await self._tasks.cancel(current_principal(), request.task_id)
        return pb.CancelTaskResponse(
            success=True, message="cancelled", task=task_message(task, full=False)
        )

    async def ListTasks(
        self, request: pb.ListTasksRequest, context: _Context
    ) -> pb.ListTasksResponse:
        async with translate_errors(context):
            page = await self._tasks.list_page(
                current_principal(),
                status=_status_name(request.status),
                owner=request.owner,
                page_size=request.page_size,
                cursor=request.page_token,
            )
        return pb.ListTasksResponse(
            tasks=[task_message(task, full=False) for task in page.items],
            next_page_token=page.next_cursor or "",
        )

    async def PullTasks(
        self, request: pb.PullTasksRequest, context: _Context
    ) -> AsyncIterator[pb.PullTasksResponse]:
        async with translate_errors(context):
            async for delivery in self._tasks.deliveries(current_principal(), request.node_id):
                yield pb.PullTasksResponse(
                    assignments=[
                        pb.TaskAssignment(
                            task_id=task.id,
                            attempt=task.attempts,
                            task_type=task.task_type,
                            payload=task.payload,
                            timeout_seconds=task.timeout_seconds,
                        )
                        for task in delivery.assignments
                    ],
                    stop_task_ids=delivery.stop_task_ids,
                )

    async def ReportTasks(
        self, request: pb.ReportTasksRequest, context: _Context
    ) -> pb.ReportTasksResponse:
        async with translate_errors(context):
            reports = [_report(report) for report in request.reports]
            verdicts = await self._tasks.report(current_principal(), request.node_id, reports)
        return pb.ReportTasksResponse(
            results=[
                pb.TaskReportResult(
                    task_id=report.task_id,
                    accepted=verdict is ReportVerdict.ACCEPTED,
                    code=_VERDICT_CODES[verdict],
                    message=_VERDICT_MESSAGES[verdict],
                )
                for report, verdict in zip(reports, verdicts, strict=True)
            ]
        )
