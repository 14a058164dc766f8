"""The deny-by-default table of every RPC the server answers and who may call it.

A method missing here is refused before any servicer runs; a test asserts that the
table covers exactly the methods of the registered services.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["HEALTH_SERVICE", "METHOD_ACCESS", "REFLECTION_SERVICES", "Access"]

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection",)


class Access(enum.StrEnum):
    """The credential a method needs on top of a valid certificate."""

    # Any certificate of ours, no user credential: enough to sign up, log in and probe.
    DEVICE = "device"
    # A node certificate, acting only for the node it names.
    NODE = "node"
    # A client certificate plus a user credential (access token or API key).
    USER = "user"


_NODE = "/nodepool.v1.NodeManager/"
_USER = "/nodepool.v1.UserManager/"
_MASTER = "/nodepool.v1.MasterNodeService/"
_CERTIFICATES = "/nodepool.v1.CertificateService/"

METHOD_ACCESS: Mapping[str, Access] = MappingProxyType(
    {
        _NODE + "RegisterNode": Access.NODE,
        _NODE + "UpdateNodeStatus": Access.NODE,
        _NODE + "GetNodeList": Access.USER,
        _NODE + "RemoveNode": Access.USER,
        _USER + "RegisterUser": Access.DEVICE,
        _USER + "LoginUser": Access.DEVICE,
        _USER + "UpdateUserProfile": Access.USER,
        _USER + "GetUserInfo": Access.USER,
        _MASTER + "SubmitTask": Access.USER,
        _MASTER + "GetTaskStatus": Access.USER,
        _MASTER + "CancelTask": Access.USER,
        # Renewal is proven by the certificate being renewed; nothing else is needed.
        _CERTIFICATES + "RenewCertificate": Access.DEVICE,
        f"/{HEALTH_SERVICE}/Check": Access.DEVICE,
        f"/{HEALTH_SERVICE}/Watch": Access.DEVICE,
        f"/{HEALTH_SERVICE}/List": Access.DEVICE,
        **{f"/{service}/ServerReflectionInfo": Access.DEVICE for service in REFLECTION_SERVICES},
    }
)
