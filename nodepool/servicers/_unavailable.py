"""The answer of an RPC whose capability has not been built yet."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc


async def not_implemented(context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not implemented yet")
