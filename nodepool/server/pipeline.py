"""The call pipeline: every call passes a fixed sequence of stages before a servicer.

Order (DESIGN.md §3): peer identity → revocation → credentials → authorization → audit.
The pipeline is the server's one ``grpc.aio`` interceptor, so every handler the server
has (health and reflection included) passes it. The peer certificate is visible only on
the ServicerContext, not on HandlerCallDetails, so the stages run inside a wrapped
handler, built once per method and then looked up. Methods missing from the method table
are refused: deny by default.

Two more rules hold for every method:

- nothing is decoded before the stages: handlers take the raw request bytes and the
  request is parsed only once the caller is identified, unrevoked and admitted; a body
  that does not parse is refused ``INVALID_ARGUMENT`` (audited, no traceback);
- an open response stream is re-checked: the stages run again every
  ``recheck_seconds`` while it is open, and the stream ends with the refusal as soon as
  one refuses (a revoked or expired certificate, an ended session, a revoked key, a
  deactivated user, a role that no longer allows the method).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import grpc

from nodepool.auth.authorization import Authorizer
from nodepool.auth.call import Call
from nodepool.auth.certificates import PeerCertificateCache
from nodepool.auth.principal import CURRENT_PRINCIPAL
from nodepool.auth.revocation import RevocationList
from nodepool.auth.rules import Access, MethodRule
from nodepool.errors import (
    InvalidArgumentError,
    NodePoolError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from nodepool.server.inputs import check_request_strings
from nodepool.status import status_for

__all__ = [
    "RECHECK_SECONDS",
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

# How often an open stream's caller is checked again: with the revocation poll (0.25 s)
# and credential announcements (immediate), a stream ends within about a second of a
# revocation, well inside the 2 s SECURITY.md promises.
RECHECK_SECONDS = 0.5

_UNDECODABLE = InvalidArgumentError("the request could not be decoded")


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


class CallPipeline(_Interceptor):
    """The server interceptor: wraps each method's handler once, then looks it up.

    ``grpc.aio`` asks the interceptor for a handler on every call; the wrapped handler is
    memoized per method, so the per-call cost is a dictionary lookup and the stages.
    """

    def __init__(
        self,
        method_rules: Mapping[str, MethodRule],
        stages: Sequence[Stage],
        auditor: CallAuditor,
        *,
        recheck_seconds: float = RECHECK_SECONDS,
    ) -> None:
        self._method_rules = method_rules
        self._stages = tuple(stages)
        self._auditor = auditor
        self._recheck_seconds = recheck_seconds
        # Bounded by the methods the server has: unknown names are answered by gRPC
        # (UNIMPLEMENTED) and never kept.
        self._wrapped: dict[str, _Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        # The stubs say a handler; gRPC gives None for a method no service has.
        handler: _Handler | None = await continuation(handler_call_details)
        if handler is None:
            return None  # type: ignore[return-value]
        wrapped = self.guard(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    def guard(self, method: str, handler: _Handler) -> _Handler:
        """``handler`` behind the stages (or refused, when ``method`` is not in the table)."""
        rule = self._method_rules.get(method)
        if rule is None:
            return self._refusing_handler(handler, method)
        return self._wrap(handler, method, rule)

    async def _refuse(self, call: Call, context: _Context, error: NodePoolError) -> NoReturn:
        self._auditor.refused(call, error)
        await context.abort(status_for(error), error.public_message)
        raise AssertionError("abort returned")  # pragma: no cover - abort raises

    def _refusing_handler(self, handler: _Handler, method: str) -> _Handler:
        error = PermissionDeniedError("method not allowed")
        rule = MethodRule(Access.USER, audited=True)

        async def refuse(request: Any, context: _Context) -> Any:
            await self._refuse(Call(method=method, rule=rule, context=context), context, error)

        return _replace_behaviour(handler, refuse)

    def _wrap(self, handler: _Handler, method: str, rule: MethodRule) -> _Handler:
        stages = self._stages
        auditor = self._auditor
        audited = rule.audited
        refuse = self._refuse
        decode: Callable[[bytes], Any] | None = handler.request_deserializer
        request_streaming = handler.request_streaming

        def failed(call: Call, context: _Context) -> None:
            auditor.finished(call, context.code() or grpc.StatusCode.UNKNOWN)

        if not handler.response_streaming:
            behaviour: Any = handler.unary_unary or handler.stream_unary

            async def unary_response(raw: Any, context: _Context) -> Any:
                # The stages run inline: no coroutine per call unless one must wait.
                call = Call(method=method, rule=rule, context=context)
                try:
                    for stage in stages:
                        pending = stage(call)
                        if pending is not None:
                            await pending
                except NodePoolError as error:
                    await refuse(call, context, error)
                except Exception:
                    # A stage that cannot decide must not let the call through, nor leak why.
                    _log.exception("call refused: a check failed unexpectedly")
                    await refuse(call, context, UnavailableError())
                # Decoded only now, for an admitted caller.
                if request_streaming:
                    request = _decoded(raw, decode, call, context, refuse)
                elif decode is None:
                    request = raw
                else:
                    try:
                        request = decode(raw)
                    except Exception:
                        # Refused and audited, never a traceback in the log.
                        await refuse(call, context, _UNDECODABLE)
                    try:
                        check_request_strings(request)  # one input rule for every backend
                    except NodePoolError as error:
                        await refuse(call, context, error)
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

        async def stream_response(raw: Any, context: _Context) -> None:
            call = Call(method=method, rule=rule, context=context)
            await self._admit(call, context)
            if request_streaming:
                request = _decoded(raw, decode, call, context, refuse)
            elif decode is None:
                request = raw
            else:
                try:
                    request = decode(raw)
                except Exception:
                    await refuse(call, context, _UNDECODABLE)
                try:
                    check_request_strings(request)  # one input rule for every backend
                except NodePoolError as error:
                    await refuse(call, context, error)
            token = CURRENT_PRINCIPAL.set(call.principal)  # type: ignore[arg-type]
            try:
                # A task of its own (it inherits the principal), so the stream can be
                # ended from here when a re-check refuses, even while it waits.
                serving = asyncio.ensure_future(_serve_stream(stream_behaviour, request, context))
            finally:
                CURRENT_PRINCIPAL.reset(token)
            try:
                await self._watch(call, context, serving)
            except BaseException:
                failed(call, context)
                raise
            finally:
                serving.cancel()
            if audited:
                auditor.finished(call, context.code() or grpc.StatusCode.OK)

        return _replace_behaviour(handler, stream_response)

    async def _admit(self, call: Call, context: _Context) -> None:
        """Runs the stages; refuses the call (and raises) when one refuses."""
        try:
            for stage in self._stages:
                pending = stage(call)
                if pending is not None:
                    await pending
        except NodePoolError as error:
            await self._refuse(call, context, error)
        except Exception:
            _log.exception("call refused: a check failed unexpectedly")
            await self._refuse(call, context, UnavailableError())

    async def _watch(self, call: Call, context: _Context, serving: asyncio.Future[None]) -> None:
        """Waits for the stream to end, re-running the stages while it is open."""
        while True:
            done, _ = await asyncio.wait((serving,), timeout=self._recheck_seconds)
            if done:
                serving.result()
                return
            again = Call(method=call.method, rule=call.rule, context=call.context)
            try:
                for stage in self._stages:
                    pending = stage(again)
                    if pending is not None:
                        await pending
                continue
            except NodePoolError as error:
                refusal = error
            except Exception:
                _log.exception("stream ended: a check failed unexpectedly")
                refusal = UnavailableError()
            serving.cancel()
            with contextlib.suppress(BaseException):
                await serving
            # Audited with what the stream was admitted as, and the reason it ended.
            await self._refuse(call, context, refusal)


async def _serve_stream(behaviour: Any, request: Any, context: _Context) -> None:
    result = behaviour(request, context)
    if inspect.isasyncgen(result):
        async for response in result:
            await context.write(response)
    else:
        # A coroutine that writes with context.write() itself.
        await result


async def _decoded(
    raw: AsyncIterator[bytes],
    decode: Callable[[bytes], Any] | None,
    call: Call,
    context: _Context,
    refuse: Callable[[Call, _Context, NodePoolError], Awaitable[NoReturn]],
) -> AsyncIterator[Any]:
    """A request stream decoded message by message, after the stages admitted the call."""
    async for message in raw:
        if decode is None:
            yield message
            continue
        try:
            decoded = decode(message)
        except Exception:
            await refuse(call, context, _UNDECODABLE)
        try:
            check_request_strings(decoded)  # one input rule for every backend
        except NodePoolError as error:
            await refuse(call, context, error)
        yield decoded


def _replace_behaviour(handler: _Handler, behaviour: Any) -> _Handler:
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    factory = factories[(handler.request_streaming, handler.response_streaming)]
    # No request deserializer: the wrapper decodes, after the stages.
    return factory(
        behaviour,
        request_deserializer=None,
        response_serializer=handler.response_serializer,
    )
