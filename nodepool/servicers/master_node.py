"""MasterNodeService: task submission and tracking (not built yet: answers UNIMPLEMENTED)."""

from __future__ import annotations

from typing import Any

import grpc

from nodepool.servicers._unavailable import not_implemented
from nodepool.v1 import master_node_pb2 as pb
from nodepool.v1 import master_node_pb2_grpc as pb_grpc

__all__ = ["MasterNodeServicer"]

_Context = grpc.aio.ServicerContext[Any, Any]


class MasterNodeServicer(pb_grpc.MasterNodeServiceServicer):
    async def SubmitTask(
        self, request: pb.SubmitTaskRequest, context: _Context
    ) -> pb.SubmitTaskResponse:
        await not_implemented(context)

    async def GetTaskStatus(
        self, request: pb.GetTaskStatusRequest, context: _Context
    ) -> pb.GetTaskStatusResponse:
        await not_implemented(context)

    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: _Context
    ) -> pb.CancelTaskResponse:
        await not_implemented(context)
