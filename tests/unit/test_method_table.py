"""The deny-by-default method table covers exactly the methods the server registers."""

from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from nodepool.server.app import SERVICE_NAMES
from nodepool.server.methods import HEALTH_SERVICE, METHOD_ACCESS, REFLECTION_SERVICES
from nodepool.v1 import certificates_pb2, master_node_pb2, node_manager_pb2, user_manager_pb2


def _methods_of(file_descriptor: object) -> set[str]:
    return {
        f"/{service.full_name}/{method.name}"
        for service in file_descriptor.services_by_name.values()  # type: ignore[attr-defined]
        for method in service.methods
    }


def test_table_equals_the_registered_methods() -> None:
    registered = (
        _methods_of(node_manager_pb2.DESCRIPTOR)
        | _methods_of(user_manager_pb2.DESCRIPTOR)
        | _methods_of(master_node_pb2.DESCRIPTOR)
        | _methods_of(certificates_pb2.DESCRIPTOR)
        | _methods_of(health_pb2.DESCRIPTOR)
        | _methods_of(reflection_pb2.DESCRIPTOR)
    )
    assert set(METHOD_ACCESS) == registered


def test_service_names_match_the_protocol() -> None:
    assert SERVICE_NAMES == (
        "nodepool.v1.NodeManager",
        "nodepool.v1.UserManager",
        "nodepool.v1.MasterNodeService",
        "nodepool.v1.CertificateService",
    )
    assert health_pb2.DESCRIPTOR.services_by_name["Health"].full_name == HEALTH_SERVICE
    assert reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name in (
        REFLECTION_SERVICES
    )
