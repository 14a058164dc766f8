"""gRPC server reflection under its v1 name, ``grpc.reflection.v1.ServerReflection``.

grpcio-reflection serves only ``v1alpha``; current grpcurl, Postman and grpc_cli ask for
``v1`` first. The two protocols are the same messages under another package, so the v1
descriptor is the v1alpha one renamed, and the same servicer answers both (the messages
are identical on the wire).
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

__all__ = ["SERVICE", "add_to_server", "handler"]

SERVICE = "grpc.reflection.v1.ServerReflection"
_FILE = "grpc/reflection/v1/reflection.proto"


def _register() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = _FILE, "grpc.reflection.v1"

    def renamed(name: str) -> str:
        return name.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")

    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = renamed(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type, method.output_type = (
                renamed(method.input_type),
                renamed(method.output_type),
            )
    pool.AddSerializedFile(proto.SerializeToString())


_register()


def handler(servicer: Any) -> grpc.GenericRpcHandler[Any, Any]:
    """The v1 service, answered by the v1alpha ``servicer``."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=v1alpha.ServerReflectionRequest.FromString,
                response_serializer=v1alpha.ServerReflectionResponse.SerializeToString,
            )
        },
    )


def add_to_server(servicer: Any, server: grpc.aio.Server) -> None:
    """Registers the v1 service on ``server``, as a generated ``add_*_to_server`` does."""
    server.add_generic_rpc_handlers((handler(servicer),))
