"""The reference worker: a contributed machine's side of Node Pool.

It acts only over its own outbound mTLS connection with its node certificate: it
registers with its real CPU, memory and disk figures, heartbeats with jitter at the
interval the server asks for, pulls its assignments over one server stream, runs them
concurrently (up to its task slots) and reports start, progress and results in batches.
When the server goes away it reconnects with backoff and resumes: the stream's first
message lists every task the node still holds. Its certificate is renewed (a new key made
here) once two thirds of its lifetime have passed, and the connection is remade with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psutil
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nodepool.client import aio_secure_channel
from nodepool.renewal import CertificateFiles, keep_renewed, renewal_due_at
from nodepool.v1 import master_node_pb2 as task_pb
from nodepool.v1 import master_node_pb2_grpc as task_grpc
from nodepool.v1 import node_manager_pb2 as node_pb
from nodepool.v1 import node_manager_pb2_grpc as node_grpc
from nodepool.worker.runners import Runners, TaskOutcome, TaskSpec

__all__ = ["WorkerError", "WorkerOptions", "run_worker"]

_log = logging.getLogger(__name__)

_RPC_TIMEOUT = 10.0
_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0
_REMEMBERED_ATTEMPTS = 10_000
# Progress is reported at most this often per task; the result is reported at once.
_PROGRESS_EVERY = 2.0
# Codes after which reconnecting cannot help: the node must be fixed by a person.
_FINAL_CODES = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})


class WorkerError(RuntimeError):
    """The worker cannot run; the message is one line."""


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    allow_python: bool = False
    # 0 = one per CPU core.
    task_slots: int = 0
    labels: dict[str, str] = field(default_factory=dict)


def _node_id(certificate: x509.Certificate) -> str:
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        kind, _, name = uri.rpartition("/")
        if kind.endswith("/node"):
            return name
    raise WorkerError("cert: not a node certificate (issue one with nodepool-pki issue node)")


async def _check_server(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=_RPC_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        raise WorkerError(f"server: {exc.code().name}: {exc.details()}") from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise WorkerError("server: not serving")


def _on_renewed(certificate: x509.Certificate) -> None:
    _log.info(
        "certificate renewed; valid until %s, next renewal at %s",
        certificate.not_valid_after_utc.isoformat(),
        renewal_due_at(certificate).isoformat(),
    )


def _machine() -> tuple[int, float, float]:
    """CPU cores, memory GB and disk GB of this machine."""
    cores = os.cpu_count() or 1
    memory = psutil.virtual_memory().total / 2**30
    disk = shutil.disk_usage(Path.home()).total / 2**30
    return cores, memory, disk


def _metrics(running: int) -> node_pb.NodeMetrics:
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return node_pb.NodeMetrics(
        # Since the previous call: the machine's real use between two heartbeats.
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_percent=psutil.virtual_memory().percent,
        disk_percent=psutil.disk_usage(str(Path.home())).percent,
        load_average=load,
        running_tasks=running,
    )


class _Reports:
    """Reports waiting to be sent; the latest word on each task wins."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, int], task_pb.TaskReport] = {}
        self.ready = asyncio.Event()

    def add(self, report: task_pb.TaskReport) -> None:
        key = (report.task_id, report.attempt)
        earlier = self._pending.get(key)
        # A result never gives way to a later progress note.
        if (
            earlier is not None
            and earlier.state != task_pb.TASK_REPORT_STATE_RUNNING
            and report.state == task_pb.TASK_REPORT_STATE_RUNNING
        ):
            return
        self._pending[key] = report
        self.ready.set()

    def take(self) -> list[task_pb.TaskReport]:
        reports = list(self._pending.values())
        self._pending.clear()
        self.ready.clear()
        return reports

    def put_back(self, reports: list[task_pb.TaskReport]) -> None:
        for report in reports:
            self._pending.setdefault((report.task_id, report.attempt), report)
        if self._pending:
            self.ready.set()


class _Agent:
    """One connection's worth of work; :func:`run_worker` remakes it after a failure."""

    def __init__(
        self, node_id: str, runners: Runners, options: WorkerOptions, reports: _Reports
    ) -> None:
        self.node_id = node_id
        self._runners = runners
        self._options = options
        self._reports = reports
        # (task id, attempt) -> the asyncio task running it; kept across reconnections.
        self.running: dict[tuple[str, int], asyncio.Task[None]] = {}
        # Attempts this worker already ran. After a reconnection the server lists every
        # task the node still holds, which includes ones whose result has not reached it
        # yet: those are reported again, never run again.
        self.finished: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.drain_requested = False

    async def register(self, channel: grpc.aio.Channel) -> int:
        cores, memory, disk = _machine()
        reply = await node_grpc.NodeManagerStub(channel).RegisterNode(
            node_pb.RegisterNodeRequest(
                node_id=self.node_id,
                cpu_cores=cores,
                memory_gb=round(memory, 3),
                disk_gb=round(disk, 3),
                labels=self._options.labels,
                task_slots=self._options.task_slots,
            ),
            timeout=_RPC_TIMEOUT,
        )
        _log.info(
            "registered as %s (%d cores, %.1f GB memory, %d task slots)",
            self.node_id,
            cores,
            memory,
            reply.node.task_slots,
        )
        return reply.heartbeat_interval_seconds or 30

    async def heartbeats(self, channel: grpc.aio.Channel, interval: int) -> None:
        stub = node_grpc.NodeManagerStub(channel)
        while True:
            # Jitter spreads a fleet that restarted together over the interval.
            await asyncio.sleep(interval * random.uniform(0.8, 1.0))  # noqa: S311
            status = node_pb.NODE_STATUS_BUSY if self.running else node_pb.NODE_STATUS_ONLINE
            reply = await stub.UpdateNodeStatus(
                node_pb.UpdateNodeStatusRequest(
                    node_id=self.node_id, status=status, metrics=_metrics(len(self.running))
                ),
                timeout=_RPC_TIMEOUT,
            )
            interval = reply.heartbeat_interval_seconds or interval
            if reply.drain_requested and not self.drain_requested:
                _log.info("drain requested: finishing running tasks, taking no new ones")
            self.drain_requested = reply.drain_requested

    async def pull(self, channel: grpc.aio.Channel) -> None:
        stream = task_grpc.MasterNodeServiceStub(channel).PullTasks(
            task_pb.PullTasksRequest(node_id=self.node_id)
        )
        async for message in stream:
            for task_id in message.stop_task_ids:
                for key, running in list(self.running.items()):
                    if key[0] == task_id:
                        _log.info("stopping task %s (attempt %d)", task_id, key[1])
                        running.cancel()
            for assignment in message.assignments:
                key = (assignment.task_id, assignment.attempt)
                if key not in self.running and key not in self.finished:
                    self.running[key] = asyncio.create_task(self._run(assignment))

    async def _run(self, assignment: task_pb.TaskAssignment) -> None:
        key = (assignment.task_id, assignment.attempt)
        last_progress = 0.0
        loop = asyncio.get_running_loop()

        def report(
            state: task_pb.TaskReportState.ValueType,
            *,
            progress: float = 0.0,
            outcome: TaskOutcome | None = None,
        ) -> None:
            message = task_pb.TaskReport(
                task_id=assignment.task_id,
                attempt=assignment.attempt,
                state=state,
                progress=progress,
            )
            if outcome is not None:
                message.result = outcome.output
                message.error = outcome.error
                message.exit_code = outcome.exit_code
            self._reports.add(message)

        def on_progress(progress: float) -> None:
            nonlocal last_progress
            now = loop.time()
            if now - last_progress >= _PROGRESS_EVERY:
                last_progress = now
                report(task_pb.TASK_REPORT_STATE_RUNNING, progress=min(progress, 1.0))

        spec = TaskSpec(
            task_id=assignment.task_id,
            task_type=assignment.task_type,
            payload=assignment.payload,
            timeout_seconds=float(assignment.timeout_seconds or 3600),
        )
        report(task_pb.TASK_REPORT_STATE_RUNNING)
        try:
            outcome = await self._runners.run(spec, on_progress)
        except asyncio.CancelledError:
            _log.info("task %s stopped", assignment.task_id)
            raise
        finally:
            self.running.pop(key, None)
        self.finished[key] = None
        while len(self.finished) > _REMEMBERED_ATTEMPTS:
            self.finished.popitem(last=False)
        if outcome.succeeded:
            report(task_pb.TASK_REPORT_STATE_COMPLETED, progress=1.0, outcome=outcome)
        else:
            report(task_pb.TASK_REPORT_STATE_FAILED, outcome=outcome)

    async def send_reports(self, channel: grpc.aio.Channel) -> None:
        stub = task_grpc.MasterNodeServiceStub(channel)
        while True:
            await self._reports.ready.wait()
            # Whatever piled up while the previous call was in flight goes in one call.
            reports = self._reports.take()
            try:
                reply = await stub.ReportTasks(
                    task_pb.ReportTasksRequest(node_id=self.node_id, reports=reports),
                    timeout=_RPC_TIMEOUT,
                )
            except BaseException:
                self._reports.put_back(reports)
                raise
            for result in reply.results:
                if not result.accepted:
                    _log.info("report on task %s refused: %s", result.task_id, result.message)


async def run_worker(
    files: CertificateFiles,
    target: str | None,
    stop: asyncio.Event,
    options: WorkerOptions | None = None,
    *,
    on_connected: Callable[[], None] | None = None,
) -> None:
    """Runs until ``stop`` is set. Raises :class:`WorkerError` when it cannot start."""
    options = options or WorkerOptions()
    files.recover()
    certificate = files.load()
    node_id = _node_id(certificate)
    if certificate.not_valid_after_utc <= datetime.now(UTC):
        raise WorkerError("cert: the node certificate has expired; ask an admin for a new one")
    runners = Runners(allow_python=options.allow_python)
    agent = _Agent(node_id, runners, options, _Reports())
    renewed = asyncio.Event()

    def on_renewed(certificate: x509.Certificate) -> None:
        _on_renewed(certificate)
        renewed.set()

    renewing = asyncio.create_task(keep_renewed(files, target, on_renewed=on_renewed))
    backoff = _BACKOFF_FIRST
    first = True
    try:
        while not stop.is_set():
            renewed.clear()
            try:
                async with aio_secure_channel(
                    target, cert=files.cert, key=files.key, ca=files.ca
                ) as channel:
                    if first:
                        await _check_server(channel)
                    interval = await agent.register(channel)
                    if first:
                        _log.info(
                            "worker %s connected; certificate valid until %s, renewal at %s",
                            node_id,
                            certificate.not_valid_after_utc.isoformat(),
                            renewal_due_at(certificate).isoformat(),
                        )
                        first = False
                    if on_connected is not None:
                        on_connected()
                    backoff = _BACKOFF_FIRST
                    ended = await _serve_until(
                        [
                            agent.heartbeats(channel, interval),
                            agent.pull(channel),
                            agent.send_reports(channel),
                        ],
                        stop,
                        renewed,
                    )
                if not ended:
                    continue
                reason = "the server closed the task stream"
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _FINAL_CODES and first:
                    # Refused before ever working: a person must fix the credential.
                    raise WorkerError(f"server: {exc.code().name}: {exc.details()}") from None
                # Once it has worked, keep trying: a renewal or an admin may fix it.
                reason = f"lost the server ({exc.code().name}: {exc.details()})"
            if stop.is_set():
                break
            delay = backoff * random.uniform(0.5, 1.0)  # noqa: S311
            _log.warning("%s; reconnecting in %.1f s", reason, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            backoff = min(backoff * 2, _BACKOFF_MAX)
    finally:
        renewing.cancel()
        for running in list(agent.running.values()):
            running.cancel()
        await asyncio.gather(renewing, *agent.running.values(), return_exceptions=True)
    _log.info("worker %s stopped", node_id)


async def _serve_until(
    loops: list[Coroutine[Any, Any, None]], stop: asyncio.Event, renewed: asyncio.Event
) -> bool:
    """Runs the connection's loops until one ends, ``stop`` is set, or the certificate was
    renewed (then the connection is remade with the new one). ``True`` when a loop ended
    by itself (the server closed the stream): the caller backs off before reconnecting."""
    tasks = [asyncio.ensure_future(loop) for loop in loops]
    stopping = asyncio.ensure_future(stop.wait())
    renewing = asyncio.ensure_future(renewed.wait())
    try:
        done, _ = await asyncio.wait(
            [*tasks, stopping, renewing], return_when=asyncio.FIRST_COMPLETED
        )
        ended = False
        for task in done:
            if task in tasks:
                task.result()  # raises what ended the connection
                ended = True
        return ended
    finally:
        for task in [*tasks, stopping, renewing]:
            task.cancel()
        await asyncio.gather(*tasks, stopping, renewing, return_exceptions=True)
