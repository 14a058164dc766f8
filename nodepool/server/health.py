"""The gRPC health service, with ``List`` answered rather than left to raise.

grpcio-health-checking's asyncio servicer serves ``Check`` and ``Watch`` but inherits
``List`` from the generated base class, which raises ``NotImplementedError``: an
advertised method that answered every caller with a traceback in the log.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

__all__ = ["HealthService"]


class HealthService(health.aio.HealthServicer):  # type: ignore[misc,name-defined]
    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        # The same statuses Check answers from; a service set to nothing is not listed.
        return health_pb2.HealthListResponse(
            statuses={
                service: health_pb2.HealthCheckResponse(status=status)
                for service, status in self._server_status.items()
            }
        )
