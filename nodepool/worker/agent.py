"""The reference worker: a contributed machine's side of Node Pool.

Today it keeps its node identity alive: it checks that the server answers over mTLS with
its node certificate and renews that certificate (new key made here) once two thirds of
its lifetime have passed. Registering, heartbeats and task pulling join this loop when
the node and task capabilities land.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nodepool.client import aio_secure_channel
from nodepool.renewal import CertificateFiles, keep_renewed, renewal_due_at

__all__ = ["WorkerError", "run_worker"]

_log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """The worker cannot run; the message is one line."""


def _node_id(certificate: x509.Certificate) -> str:
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        kind, _, name = uri.rpartition("/")
        if kind.endswith("/node"):
            return name
    raise WorkerError("cert: not a node certificate (issue one with nodepool-pki issue node)")


async def _check_server(files: CertificateFiles, target: str | None) -> None:
    async with aio_secure_channel(target, cert=files.cert, key=files.key, ca=files.ca) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise WorkerError(f"server: {exc.code().name}: {exc.details()}") from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise WorkerError("server: not serving")


def _on_renewed(certificate: x509.Certificate) -> None:
    _log.info(
        "certificate renewed; valid until %s, next renewal at %s",
        certificate.not_valid_after_utc.isoformat(),
        renewal_due_at(certificate).isoformat(),
    )


async def run_worker(files: CertificateFiles, target: str | None, stop: asyncio.Event) -> None:
    """Runs until ``stop`` is set. Raises :class:`WorkerError` when it cannot start."""
    files.recover()
    certificate = files.load()
    node_id = _node_id(certificate)
    if certificate.not_valid_after_utc <= datetime.now(UTC):
        raise WorkerError("cert: the node certificate has expired; ask an admin for a new one")
    await _check_server(files, target)
    _log.info(
        "worker %s connected; certificate valid until %s, renewal at %s",
        node_id,
        certificate.not_valid_after_utc.isoformat(),
        renewal_due_at(certificate).isoformat(),
    )
    renewing = asyncio.create_task(keep_renewed(files, target, on_renewed=_on_renewed))
    try:
        await stop.wait()
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing
    _log.info("worker %s stopped", node_id)
