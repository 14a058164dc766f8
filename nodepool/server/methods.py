"""The deny-by-default table of every RPC the server answers and who may call it.

A method missing here is refused before any servicer runs; a test asserts that the
table covers exactly the methods of the registered services.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from nodepool.auth.rules import Access, MethodRule

__all__ = [
    "HEALTH_SERVICE",
    "METHOD_ACCESS",
    "METHOD_RULES",
    "REFLECTION_SERVICES",
    "Access",
    "MethodRule",
]

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = (
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
)


_CERT = MethodRule(Access.CERTIFICATE, audited=False)
_CERT_AUDITED = MethodRule(Access.CERTIFICATE, audited=True)
_READ = MethodRule(Access.USER, audited=False)
_WRITE = MethodRule(Access.USER, audited=True)

_NODE = "/nodepool.v1.NodeManager/"
_USER = "/nodepool.v1.UserManager/"
_MASTER = "/nodepool.v1.MasterNodeService/"
_CERTIFICATES = "/nodepool.v1.CertificateService/"
_AUDIT = "/nodepool.v1.AuditService/"

METHOD_RULES: Mapping[str, MethodRule] = MappingProxyType(
    {
        _NODE + "RegisterNode": _CERT_AUDITED,
        # Heartbeats change only liveness and metrics, every 30 s per node: auditing
        # them would drown the log; refusals are still recorded.
        _NODE + "UpdateNodeStatus": _CERT,
        _NODE + "GetNodeList": _READ,
        _NODE + "RemoveNode": _WRITE,
        _NODE + "GetNodeEvents": _READ,
        _NODE + "GetPoolStats": _READ,
        _NODE + "ReadmitNode": _WRITE,
        _USER + "RegisterUser": _CERT_AUDITED,
        _USER + "LoginUser": _CERT_AUDITED,
        # The refresh token in the request is the credential.
        _USER + "RefreshToken": _CERT_AUDITED,
        _USER + "UpdateUserProfile": _WRITE,
        _USER + "GetUserInfo": _READ,
        _USER + "LogoutUser": _WRITE,
        _USER + "CreateApiKey": _WRITE,
        _USER + "ListApiKeys": _READ,
        _USER + "RevokeApiKey": _WRITE,
        _USER + "GrantRole": _WRITE,
        _USER + "RevokeRole": _WRITE,
        _USER + "SetUserActive": _WRITE,
        _AUDIT + "ListAuditEvents": _READ,
        _MASTER + "SubmitTask": _WRITE,
        _MASTER + "GetTaskStatus": _READ,
        _MASTER + "CancelTask": _WRITE,
        _MASTER + "SubmitTasks": _WRITE,
        _MASTER + "ListTasks": _READ,
        # A worker's delivery stream is opened once per connection: worth a line.
        _MASTER + "PullTasks": _CERT_AUDITED,
        # Reports are as frequent as tasks; each changes a task the owner can read, and
        # refusals are still recorded.
        _MASTER + "ReportTasks": _CERT,
        # A node proves itself with the certificate; a client certificate also needs its
        # user (enforced by the USER access and the policy).
        _CERTIFICATES + "RenewCertificate": _WRITE,
        f"/{HEALTH_SERVICE}/Check": _CERT,
        f"/{HEALTH_SERVICE}/Watch": _CERT,
        f"/{HEALTH_SERVICE}/List": _CERT,
        **{f"/{service}/ServerReflectionInfo": _CERT for service in REFLECTION_SERVICES},
    }
)

# The method names alone, for coverage checks.
METHOD_ACCESS: Mapping[str, Access] = MappingProxyType(
    {method: rule.access for method, rule in METHOD_RULES.items()}
)
