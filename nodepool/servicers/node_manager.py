"""NodeManager: node registration and heartbeats (not built yet: answers UNIMPLEMENTED)."""

from __future__ import annotations

from typing import Any

import grpc

from nodepool.servicers._unavailable import not_implemented
from nodepool.v1 import node_manager_pb2 as pb
from nodepool.v1 import node_manager_pb2_grpc as pb_grpc

__all__ = ["NodeManagerServicer"]

_Context = grpc.aio.ServicerContext[Any, Any]


class NodeManagerServicer(pb_grpc.NodeManagerServicer):
    async def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: _Context
    ) -> pb.RegisterNodeResponse:
        await not_implemented(context)

    async def UpdateNodeStatus(
        self, request: pb.UpdateNodeStatusRequest, context: _Context
    ) -> pb.UpdateNodeStatusResponse:
        await not_implemented(context)

    async def GetNodeList(
        self, request: pb.GetNodeListRequest, context: _Context
    ) -> pb.GetNodeListResponse:
        await not_implemented(context)

    async def RemoveNode(
        self, request: pb.RemoveNodeRequest, context: _Context
    ) -> pb.RemoveNodeResponse:
        await not_implemented(context)
