"""NodeManager: node registration, heartbeats, listing, removal, over :class:`NodeRegistry`."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import grpc

from nodepool.auth.principal import current_principal
from nodepool.domain.nodes import NodeRegistration, NodeRegistry
from nodepool.errors import InvalidArgumentError
from nodepool.servicers._convert import timestamp
from nodepool.status import translate_errors
from nodepool.store import NodeEventRecord, NodeRecord
from nodepool.v1 import node_manager_pb2 as pb
from nodepool.v1 import node_manager_pb2_grpc as pb_grpc

__all__ = ["NodeManagerServicer", "node_message"]

_Context = grpc.aio.ServicerContext[Any, Any]

_STATUS_NAMES: dict[pb.NodeStatus.ValueType, str] = {
    pb.NODE_STATUS_ONLINE: "online",
    pb.NODE_STATUS_OFFLINE: "offline",
    pb.NODE_STATUS_BUSY: "busy",
    pb.NODE_STATUS_DRAINING: "draining",
}
_STATUS_VALUES = {name: value for value, name in _STATUS_NAMES.items()}


def _status_name(value: pb.NodeStatus.ValueType, *, default: str | None = None) -> str | None:
    if value == pb.NODE_STATUS_UNSPECIFIED:
        return default
    try:
        return _STATUS_NAMES[value]
    except KeyError:
        raise InvalidArgumentError("unknown node status") from None


def _peer_address(context: _Context) -> str:
    # "ipv4:127.0.0.1:5555" or "ipv6:%5B::1%5D:5555": the address the node connects from.
    host = unquote(context.peer()).partition(":")[2].rpartition(":")[0]
    return host.strip("[]")


def _metrics(metrics: pb.NodeMetrics) -> dict[str, float | int]:
    values = {
        "cpu_percent": metrics.cpu_percent,
        "memory_percent": metrics.memory_percent,
        "disk_percent": metrics.disk_percent,
        "load_average": metrics.load_average,
    }
    for name, value in values.items():
        if not (0.0 <= value <= 100_000.0):  # also refuses NaN
            raise InvalidArgumentError(f"metrics.{name} is out of range")
    return {**values, "running_tasks": metrics.running_tasks}


def node_message(node: NodeRecord) -> pb.Node:
    metrics = node.metrics
    return pb.Node(
        node_id=node.id,
        owner=node.owner,
        ip_address=node.ip_address,
        port=node.port,
        status=_STATUS_VALUES.get(node.status, pb.NODE_STATUS_UNSPECIFIED),
        cpu_cores=node.cpu_cores or 0,
        memory_gb=node.memory_gb or 0.0,
        disk_gb=node.disk_gb or 0.0,
        registered_at=timestamp(node.registered_at),
        last_heartbeat=timestamp(node.last_heartbeat),
        metrics=pb.NodeMetrics(
            cpu_percent=float(metrics.get("cpu_percent", 0.0)),
            memory_percent=float(metrics.get("memory_percent", 0.0)),
            disk_percent=float(metrics.get("disk_percent", 0.0)),
            load_average=float(metrics.get("load_average", 0.0)),
            running_tasks=int(metrics.get("running_tasks", 0)),
        ),
        labels=dict(node.labels),
        drain_requested=node.drain_requested,
        drain_deadline=timestamp(node.drain_deadline),
        task_slots=node.task_slots,
    )


def _event_message(event: NodeEventRecord) -> pb.NodeEvent:
    return pb.NodeEvent(
        node_id=event.node_id,
        at=timestamp(event.at),
        event=event.event,
        status=_STATUS_VALUES.get(event.status, pb.NODE_STATUS_UNSPECIFIED),
        detail=event.detail,
    )


class NodeManagerServicer(pb_grpc.NodeManagerServicer):
    def __init__(self, registry: NodeRegistry) -> None:
        self._registry = registry

    async def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: _Context
    ) -> pb.RegisterNodeResponse:
        async with translate_errors(context):
            node = await self._registry.register(
                current_principal(),
                NodeRegistration(
                    node_id=request.node_id,
                    ip_address=request.ip_address or _peer_address(context),
                    port=request.port,
                    cpu_cores=request.cpu_cores,
                    memory_gb=request.memory_gb,
                    disk_gb=request.disk_gb,
                    labels=dict(request.labels),
                    task_slots=request.task_slots,
                ),
            )
        return pb.RegisterNodeResponse(
            success=True,
            message="registered",
            node=node_message(node),
            heartbeat_interval_seconds=self._registry.limits.heartbeat_interval,
        )

    async def UpdateNodeStatus(
        self, request: pb.UpdateNodeStatusRequest, context: _Context
    ) -> pb.UpdateNodeStatusResponse:
        async with translate_errors(context):
            reply = await self._registry.heartbeat(
                current_principal(),
                request.node_id,
                _status_name(request.status, default="online") or "online",
                _metrics(request.metrics),
            )
        return pb.UpdateNodeStatusResponse(
            success=True,
            heartbeat_interval_seconds=reply.interval_seconds,
            drain_requested=reply.drain_requested,
        )

    async def GetNodeList(
        self, request: pb.GetNodeListRequest, context: _Context
    ) -> pb.GetNodeListResponse:
        async with translate_errors(context):
            page = await self._registry.list_page(
                current_principal(),
                status=_status_name(request.status),
                owner=request.owner,
                labels=dict(request.labels),
                page_size=request.page_size,
                cursor=request.page_token,
            )
        return pb.GetNodeListResponse(
            nodes=[node_message(node) for node in page.items],
            next_page_token=page.next_cursor or "",
        )

    async def RemoveNode(
        self, request: pb.RemoveNodeRequest, context: _Context
    ) -> pb.RemoveNodeResponse:
        async with translate_errors(context):
            node = await self._registry.remove(
                current_principal(),
                request.node_id,
                drain=request.drain,
                deadline_seconds=request.drain_deadline_seconds,
            )
        if node is None:
            return pb.RemoveNodeResponse(success=True, message="removed")
        return pb.RemoveNodeResponse(success=True, message="draining", node=node_message(node))

    async def GetNodeEvents(
        self, request: pb.GetNodeEventsRequest, context: _Context
    ) -> pb.GetNodeEventsResponse:
        async with translate_errors(context):
            page = await self._registry.events(
                current_principal(),
                request.node_id,
                page_size=request.page_size,
                cursor=request.page_token,
            )
        return pb.GetNodeEventsResponse(
            events=[_event_message(event) for event in page.items],
            next_page_token=page.next_cursor or "",
        )

    async def GetPoolStats(
        self, request: pb.GetPoolStatsRequest, context: _Context
    ) -> pb.GetPoolStatsResponse:
        async with translate_errors(context):
            stats = await self._registry.stats()
        nodes, tasks = stats.nodes_by_status, stats.tasks_by_status
        return pb.GetPoolStatsResponse(
            nodes_online=nodes.get("online", 0),
            nodes_offline=nodes.get("offline", 0),
            nodes_busy=nodes.get("busy", 0),
            nodes_draining=nodes.get("draining", 0),
            tasks_pending=tasks.get("pending", 0),
            tasks_assigned=tasks.get("assigned", 0),
            tasks_running=tasks.get("running", 0),
            task_slots_online=stats.task_slots_online,
        )

    async def ReadmitNode(
        self, request: pb.ReadmitNodeRequest, context: _Context
    ) -> pb.ReadmitNodeResponse:
        async with translate_errors(context):
            await self._registry.readmit(current_principal(), request.node_id)
        return pb.ReadmitNodeResponse(success=True, message="re-admitted")
