"""Handlers are wrapped when registered; a registered method missing from the table is refused."""

from __future__ import annotations

import asyncio
from types import MappingProxyType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nodepool.auth.rules import Access, MethodRule
from nodepool.errors import NodePoolError, UnauthenticatedError
from nodepool.server.pipeline import Call, CallPipeline

CHECK = "/grpc.health.v1.Health/Check"
LIST = "/grpc.health.v1.Health/List"


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
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(
        health.aio.HealthServicer(),  # type: ignore[attr-defined]
        pipeline.guarded(server),
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
