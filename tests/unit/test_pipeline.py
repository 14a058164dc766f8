"""The pipeline is the server's interceptor: every handler passes it; a registered method
missing from the table is refused."""

from __future__ import annotations

import asyncio
import logging
from types import MappingProxyType
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from nodepool.auth.rules import Access, MethodRule
from nodepool.errors import NodePoolError, UnauthenticatedError
from nodepool.server.pipeline import Call, CallPipeline

HEALTH = "grpc.health.v1.Health"
CHECK = f"/{HEALTH}/Check"
LIST = f"/{HEALTH}/List"
WATCH = f"/{HEALTH}/Watch"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


class RecordingAuditor:
    def __init__(self) -> None:
        self.refusals: list[tuple[str, str]] = []
        self.completions: list[tuple[str, grpc.StatusCode]] = []

    def refused(self, call: Call, error: NodePoolError) -> None:
        self.refusals.append((call.method, error.public_message))

    def finished(self, call: Call, code: grpc.StatusCode) -> None:
        self.completions.append((call.method, code))


def _pipeline(stages: list[Any], auditor: Any) -> CallPipeline:
    # Check is in the table (and audited); List is registered but deliberately absent.
    rules = MappingProxyType({CHECK: MethodRule(Access.CERTIFICATE, audited=True)})
    return CallPipeline(rules, stages=stages, auditor=auditor)


Outcome = tuple[grpc.StatusCode, str]


async def _serve_and_call(pipeline: CallPipeline) -> tuple[Outcome, Outcome]:
    """Serves Health through ``pipeline``; the code and details of Check, then of List."""
    server = grpc.aio.server(interceptors=[pipeline])
    health_pb2_grpc.add_HealthServicer_to_server(
        health.aio.HealthServicer(),  # type: ignore[attr-defined]
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    outcomes: list[Outcome] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for call in (
                lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=10),
                lambda: stub.List(health_pb2.HealthListRequest(), timeout=10),
            ):
                try:
                    await call()
                    outcomes.append((grpc.StatusCode.OK, ""))
                except grpc.aio.AioRpcError as exc:
                    outcomes.append((exc.code(), exc.details() or ""))
    finally:
        await server.stop(None)
    return outcomes[0], outcomes[1]


def test_registered_handlers_run_the_stages_and_unlisted_methods_are_refused() -> None:
    seen: list[str] = []
    auditor = RecordingAuditor()
    pipeline = _pipeline([lambda call: seen.append(call.method)], auditor)

    check, listed = asyncio.run(_serve_and_call(pipeline))

    assert check == (grpc.StatusCode.OK, "")
    assert seen == [CHECK], "the stages did not run for the registered method"
    assert auditor.completions == [(CHECK, grpc.StatusCode.OK)]
    assert listed == (grpc.StatusCode.PERMISSION_DENIED, "method not allowed")
    assert (LIST, "method not allowed") in auditor.refusals


def test_a_refusing_stage_stops_the_call_before_the_servicer() -> None:
    def refuse(call: Call) -> None:
        raise UnauthenticatedError("no entry")

    auditor = RecordingAuditor()
    check, _ = asyncio.run(_serve_and_call(_pipeline([refuse], auditor)))

    assert check == (grpc.StatusCode.UNAUTHENTICATED, "no entry")
    assert (CHECK, "no entry") in auditor.refusals
    assert auditor.completions == []


def test_a_failing_stage_fails_closed_without_leaking() -> None:
    def broken(call: Call) -> None:
        raise RuntimeError("connection to /var/lib/db failed: SELECT secret")

    auditor = RecordingAuditor()
    (code, details), _ = asyncio.run(_serve_and_call(_pipeline([broken], auditor)))

    assert code == grpc.StatusCode.UNAVAILABLE
    assert "/" not in details
    assert "SELECT" not in details
    assert CHECK in [method for method, _ in auditor.refusals]


async def _serve(pipeline: CallPipeline) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=[pipeline])
    health_pb2_grpc.add_HealthServicer_to_server(
        health.aio.HealthServicer(),  # type: ignore[attr-defined]
        server,
    )
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer([HEALTH]),  # type: ignore[attr-defined]
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_every_handler_passes_the_pipeline_reflection_included() -> None:
    seen: list[str] = []
    auditor = RecordingAuditor()
    server, port = await _serve(_pipeline([lambda call: seen.append(call.method)], auditor))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in stub.ServerReflectionInfo(iter([request]), timeout=10):
                    pass
    finally:
        await server.stop(None)
    # Reflection is not in this table: refused by the interceptor, before any servicer.
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (REFLECTION, "method not allowed") in auditor.refusals


async def test_an_undecodable_body_is_refused_after_the_stages_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []
    auditor = RecordingAuditor()
    server, port = await _serve(_pipeline([lambda call: seen.append(call.method)], auditor))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            raw = channel.unary_unary(CHECK)  # no serializers: bytes as they are
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await raw(b"\xff\xff\xff\xff", timeout=10)
    finally:
        await server.stop(None)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "the request could not be decoded"
    assert seen == [CHECK], "the stages run before anything is decoded"
    assert auditor.refusals == [(CHECK, "the request could not be decoded")]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_a_refused_caller_sends_a_body_that_is_never_decoded() -> None:
    decoded: list[bytes] = []

    def refuse(call: Call) -> None:
        raise UnauthenticatedError("no entry")

    pipeline = _pipeline([refuse], RecordingAuditor())
    handler = grpc.unary_unary_rpc_method_handler(
        lambda request, context: request,
        request_deserializer=lambda data: decoded.append(data),
    )
    wrapped = pipeline.guard(CHECK, handler)
    assert wrapped.request_deserializer is None, "gRPC must hand the wrapper raw bytes"


async def test_an_open_stream_ends_when_a_recheck_refuses() -> None:
    refusing = False

    def gate(call: Call) -> None:
        if refusing:
            raise UnauthenticatedError("certificate has been revoked")

    auditor = RecordingAuditor()
    rules = MappingProxyType({WATCH: MethodRule(Access.CERTIFICATE, audited=False)})
    pipeline = CallPipeline(rules, stages=[gate], auditor=auditor, recheck_seconds=0.02)
    server, port = await _serve(pipeline)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            stream = stub.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            first = await stream.read()  # type: ignore[attr-defined]
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            refusing = True
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stream.read()  # type: ignore[attr-defined]
    finally:
        await server.stop(None)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (WATCH, "certificate has been revoked") in auditor.refusals
