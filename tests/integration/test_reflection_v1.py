"""Server reflection answers under v1 (what grpcurl asks first) as well as v1alpha."""

from __future__ import annotations

from typing import Any

from grpc_reflection.v1alpha import reflection_pb2

from tests.fixtures.server import bearer, sign_up, user_channel


def _list_services(channel: Any, version: str, token: str) -> set[str]:
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    replies = list(
        call(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            timeout=10,
            metadata=bearer(token),
        )
    )
    return {service.name for service in replies[0].list_services_response.service}


def test_reflection_v1_and_v1alpha(mtls_server: Any, client_cert: Any) -> None:
    token = sign_up(mtls_server, client_cert, "reflector").access_token
    with user_channel(mtls_server, client_cert) as channel:
        for version in ("v1", "v1alpha"):
            services = _list_services(channel, version, token)
            assert "nodepool.v1.UserManager" in services
            assert "grpc.health.v1.Health" in services
            assert "grpc.reflection.v1.ServerReflection" in services
