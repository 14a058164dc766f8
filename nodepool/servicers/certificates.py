"""CertificateService: renewal of the caller's own certificate."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from nodepool.auth.principal import current_principal
from nodepool.domain.certificates import CertificateRenewal
from nodepool.status import translate_errors
from nodepool.v1 import certificates_pb2 as pb
from nodepool.v1 import certificates_pb2_grpc as pb_grpc

__all__ = ["CertificateServicer"]

_Context = grpc.aio.ServicerContext[Any, Any]


class CertificateServicer(pb_grpc.CertificateServiceServicer):
    def __init__(self, renewal: CertificateRenewal) -> None:
        self._renewal = renewal

    async def RenewCertificate(
        self, request: pb.RenewCertificateRequest, context: _Context
    ) -> pb.RenewCertificateResponse:
        async with translate_errors(context):
            peer = current_principal().peer
            renewed = await asyncio.to_thread(self._renewal.renew, peer, request.csr_pem)
        not_after = Timestamp()
        not_after.FromDatetime(renewed.not_after)
        return pb.RenewCertificateResponse(
            certificate_pem=renewed.certificate_pem, ca_pem=renewed.ca_pem, not_after=not_after
        )
