"""The server interceptor: every call passes a fixed sequence of stages before a servicer.

Order (DESIGN.md §3): peer identity → revocation → credentials → authorization → audit.
The peer certificate is visible only on the ServicerContext, not on HandlerCallDetails,
so the stages run inside a wrapped handler. Methods missing from the method table are
refused: deny by default.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from nodepool.auth.authorization import Authorizer
from nodepool.auth.certificates import PeerCertificateCache
from nodepool.auth.principal import CURRENT_PRINCIPAL, PeerIdentity, Principal
from nodepool.auth.revocation import RevocationList
from nodepool.auth.rules import MethodRule
from nodepool.errors import NodePoolError, PermissionDeniedError, UnauthenticatedError
from nodepool.server.status import status_for

__all__ = [
    "Call",
    "CallAuditor",
    "CallPipeline",
    "Stage",
    "authorization_stage",
    "identity_stage",
    "revocation_stage",
]

_log = logging.getLogger(__name__)

_Context = grpc.aio.ServicerContext[Any, Any]

# The stubs make these generic; at run time they are plain classes.
if TYPE_CHECKING:
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Handler = grpc.RpcMethodHandler
    _Interceptor = grpc.aio.ServerInterceptor


@dataclass(slots=True)
class Call:
    """What the stages know about one call; each stage may add to it."""

    method: str
    rule: MethodRule
    context: _Context
    peer: PeerIdentity | None = None
    principal: Principal | None = None


class Stage(Protocol):
    """One concern of the pipeline. Raises a domain error to refuse the call.

    Settles synchronously and returns None in the common case; returns an awaitable only
    when it must wait (a cache miss), so the hot path creates no coroutine per stage.
    """

    def __call__(self, call: Call) -> Awaitable[None] | None: ...


class CallAuditor(Protocol):
    """Stage 5: told of every refusal, and of every call that went through."""

    def refused(self, call: Call, error: NodePoolError) -> None: ...

    def finished(self, call: Call, code: grpc.StatusCode, seconds: float) -> None: ...


def identity_stage(certificates: PeerCertificateCache) -> Stage:
    def check_identity(call: Call) -> None:
        pem = next(iter(call.context.auth_context().get("x509_pem_cert", ())), None)
        if pem is None:
            raise UnauthenticatedError("client certificate required")
        peer = certificates.identify(pem)
        if peer.not_after <= time.time():
            raise UnauthenticatedError("certificate has expired")
        call.peer = peer

    return check_identity


def revocation_stage(revocations: RevocationList) -> Stage:
    def check_revocation(call: Call) -> None:
        assert call.peer is not None
        revocations.check(call.peer.serial)

    return check_revocation


def authorization_stage(authorizer: Authorizer) -> Stage:
    def check_authorization(call: Call) -> None:
        assert call.principal is not None
        if not authorizer.allowed(call.principal.roles, call.method):
            raise PermissionDeniedError()

    return check_authorization


class CallPipeline(_Interceptor):
    def __init__(
        self,
        method_rules: Mapping[str, MethodRule],
        stages: Sequence[Stage],
        auditor: CallAuditor,
    ) -> None:
        self._method_rules = method_rules
        self._stages = tuple(stages)
        self._auditor = auditor

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        method = handler_call_details.method
        rule = self._method_rules.get(method)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if rule is None:
            return _refusing_handler(handler, PermissionDeniedError("method not allowed"))
        return self._wrap(handler, method, rule)

    async def _admit(
        self, method: str, rule: MethodRule, context: _Context
    ) -> Call | NodePoolError:
        call = Call(method=method, rule=rule, context=context)
        try:
            for stage in self._stages:
                pending = stage(call)
                if pending is not None:
                    await pending
        except NodePoolError as error:
            self._auditor.refused(call, error)
            return error
        return call

    def _wrap(self, handler: _Handler, method: str, rule: MethodRule) -> _Handler:
        admit = self._admit
        auditor = self._auditor

        def finish(call: Call, context: _Context, started: float) -> None:
            code = context.code() or grpc.StatusCode.OK
            auditor.finished(call, code, time.perf_counter() - started)

        if handler.unary_unary is not None or handler.stream_unary is not None:
            behaviour: Any = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: _Context) -> Any:
                started = time.perf_counter()
                call = await admit(method, rule, context)
                if isinstance(call, NodePoolError):
                    await context.abort(status_for(call), call.public_message)
                token = CURRENT_PRINCIPAL.set(call.principal)  # type: ignore[arg-type]
                try:
                    return await behaviour(request, context)
                finally:
                    CURRENT_PRINCIPAL.reset(token)
                    finish(call, context, started)

            return _replace_behaviour(handler, unary_response)

        stream_behaviour: Any = handler.unary_stream or handler.stream_stream

        async def stream_response(request: Any, context: _Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            call = await admit(method, rule, context)
            if isinstance(call, NodePoolError):
                await context.abort(status_for(call), call.public_message)
            token = CURRENT_PRINCIPAL.set(call.principal)  # type: ignore[arg-type]
            try:
                result = stream_behaviour(request, context)
                if inspect.isasyncgen(result):
                    async for response in result:
                        yield response
                else:
                    # A coroutine that writes with context.write() itself.
                    await result
            finally:
                CURRENT_PRINCIPAL.reset(token)
                finish(call, context, started)

        return _replace_behaviour(handler, stream_response)


def _replace_behaviour(handler: _Handler, behaviour: Any) -> _Handler:
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    factory = factories[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _refusing_handler(handler: _Handler, error: NodePoolError) -> _Handler:
    async def refuse(request: Any, context: _Context) -> Any:
        await context.abort(status_for(error), error.public_message)

    if handler.response_streaming:

        async def refuse_stream(request: Any, context: _Context) -> AsyncIterator[Any]:
            await context.abort(status_for(error), error.public_message)
            yield None  # pragma: no cover - abort raises

        return _replace_behaviour(handler, refuse_stream)
    return _replace_behaviour(handler, refuse)
