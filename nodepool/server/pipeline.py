"""The call pipeline: every call passes a fixed sequence of stages before a servicer.

Order (DESIGN.md §3): peer identity → revocation → credentials → authorization → audit.
The peer certificate is visible only on the ServicerContext, not on HandlerCallDetails,
so the stages run inside a wrapped handler. Methods missing from the method table are
refused: deny by default.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, cast

import grpc

from nodepool.auth.authorization import Authorizer
from nodepool.auth.certificates import PeerCertificateCache
from nodepool.auth.principal import CURRENT_PRINCIPAL, PeerIdentity, Principal
from nodepool.auth.revocation import RevocationList
from nodepool.auth.rules import Access, MethodRule
from nodepool.errors import (
    NodePoolError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from nodepool.server.inputs import check_request_strings
from nodepool.status import status_for

__all__ = [
    "Call",
    "CallAuditor",
    "CallPipeline",
    "GuardedServer",
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
    _GenericHandler = grpc.GenericRpcHandler[Any, Any]
else:
    _Handler = grpc.RpcMethodHandler
    _GenericHandler = grpc.GenericRpcHandler


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

    def finished(self, call: Call, code: grpc.StatusCode) -> None: ...


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
    def check_revocation(call: Call) -> Awaitable[None] | None:
        assert call.peer is not None
        return revocations.check(call.peer.serial)

    return check_revocation


def authorization_stage(authorizer: Authorizer) -> Stage:
    def check_authorization(call: Call) -> None:
        assert call.principal is not None
        if not authorizer.allowed(call.principal.roles, call.method):
            raise PermissionDeniedError()

    return check_authorization


class CallPipeline:
    """Wraps every method handler, once, when it is registered.

    A ``grpc.aio`` server interceptor runs per call and rebuilds the wrapped handler each
    time; wrapping at registration costs nothing per call beyond the stages themselves.
    Services are registered through :meth:`guarded` so that no handler reaches the server
    unwrapped, and a method missing from the table is refused: deny by default.
    """

    def __init__(
        self,
        method_rules: Mapping[str, MethodRule],
        stages: Sequence[Stage],
        auditor: CallAuditor,
    ) -> None:
        self._method_rules = method_rules
        self._stages = tuple(stages)
        self._auditor = auditor

    def guarded(self, server: grpc.aio.Server) -> grpc.aio.Server:
        """A registration view of ``server``: add services to it, not to the server.

        It has only the two methods the generated ``add_*_to_server`` functions call;
        it is typed as a server so that those functions accept it.
        """
        return cast(grpc.aio.Server, GuardedServer(server, self))

    def guard(self, method: str, handler: _Handler) -> _Handler:
        rule = self._method_rules.get(method)
        if rule is None:
            return self._refusing_handler(handler, method)
        return self._wrap(handler, method, rule)

    def _refusing_handler(self, handler: _Handler, method: str) -> _Handler:
        error = PermissionDeniedError("method not allowed")
        rule = MethodRule(Access.USER, audited=True)
        auditor = self._auditor

        async def refuse(request: Any, context: _Context) -> Any:
            auditor.refused(Call(method=method, rule=rule, context=context), error)
            await context.abort(status_for(error), error.public_message)

        if handler.response_streaming:

            async def refuse_stream(request: Any, context: _Context) -> AsyncIterator[Any]:
                await refuse(request, context)
                yield None  # pragma: no cover - abort raises

            return _replace_behaviour(handler, refuse_stream)
        return _replace_behaviour(handler, refuse)

    def _wrap(self, handler: _Handler, method: str, rule: MethodRule) -> _Handler:
        stages = self._stages
        auditor = self._auditor
        audited = rule.audited

        async def refuse(call: Call, error: NodePoolError) -> NoReturn:
            auditor.refused(call, error)
            await call.context.abort(status_for(error), error.public_message)

        def failed(call: Call, context: _Context) -> None:
            auditor.finished(call, context.code() or grpc.StatusCode.UNKNOWN)

        if handler.unary_unary is not None or handler.stream_unary is not None:
            behaviour: Any = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: _Context) -> Any:
                # The stages run inline: no coroutine per call unless one must wait.
                call = Call(method=method, rule=rule, context=context)
                try:
                    for stage in stages:
                        pending = stage(call)
                        if pending is not None:
                            await pending
                    check_request_strings(request)  # one input rule for every backend
                except NodePoolError as error:
                    await refuse(call, error)
                except Exception:
                    # A stage that cannot decide must not let the call through, nor leak why.
                    _log.exception("call refused: a check failed unexpectedly")
                    await refuse(call, UnavailableError())
                token = CURRENT_PRINCIPAL.set(call.principal)  # type: ignore[arg-type]
                try:
                    response = await behaviour(request, context)
                except BaseException:
                    failed(call, context)
                    raise
                finally:
                    CURRENT_PRINCIPAL.reset(token)
                # Only calls that change state are recorded when they succeed; the cheap
                # reads that dominate traffic skip even the status lookup.
                if audited:
                    auditor.finished(call, context.code() or grpc.StatusCode.OK)
                return response

            return _replace_behaviour(handler, unary_response)

        stream_behaviour: Any = handler.unary_stream or handler.stream_stream

        async def stream_response(request: Any, context: _Context) -> AsyncIterator[Any]:
            call = Call(method=method, rule=rule, context=context)
            try:
                for stage in stages:
                    pending = stage(call)
                    if pending is not None:
                        await pending
                check_request_strings(request)  # one input rule for every backend
            except NodePoolError as error:
                await refuse(call, error)
            except Exception:
                # A stage that cannot decide must not let the call through, nor leak why.
                _log.exception("call refused: a check failed unexpectedly")
                await refuse(call, UnavailableError())
            token = CURRENT_PRINCIPAL.set(call.principal)  # type: ignore[arg-type]
            try:
                result = stream_behaviour(request, context)
                if inspect.isasyncgen(result):
                    async for response in result:
                        yield response
                else:
                    # A coroutine that writes with context.write() itself.
                    await result
            except BaseException:
                failed(call, context)
                raise
            finally:
                CURRENT_PRINCIPAL.reset(token)
            if audited:
                auditor.finished(call, context.code() or grpc.StatusCode.OK)

        return _replace_behaviour(handler, stream_response)


class _GuardedGenericHandler(_GenericHandler):
    def __init__(self, inner: _GenericHandler, pipeline: CallPipeline) -> None:
        self._inner = inner
        self._pipeline = pipeline
        self._wrapped: dict[str, _Handler | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> _Handler | None:
        method = handler_call_details.method
        try:
            return self._wrapped[method]
        except KeyError:
            pass
        handler = self._inner.service(handler_call_details)
        wrapped = None if handler is None else self._pipeline.guard(method, handler)
        # Bounded by the methods the inner handler knows; unknown names are not kept.
        if handler is not None:
            self._wrapped[method] = wrapped
        return wrapped


class GuardedServer:
    """What the generated ``add_*Servicer_to_server`` functions register through."""

    def __init__(self, server: grpc.aio.Server, pipeline: CallPipeline) -> None:
        self._server = server
        self._pipeline = pipeline

    def add_generic_rpc_handlers(self, handlers: Sequence[_GenericHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_GuardedGenericHandler(handler, self._pipeline) for handler in handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, _Handler]
    ) -> None:
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service,
            {
                name: self._pipeline.guard(f"/{service}/{name}", handler)
                for name, handler in handlers.items()
            },
        )


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
