"""Thin gRPC servicers: proto ⇄ domain, domain errors ⇄ status codes. One module per service."""

from nodepool.servicers.audit import AuditServicer
from nodepool.servicers.certificates import CertificateServicer
from nodepool.servicers.master_node import MasterNodeServicer
from nodepool.servicers.node_manager import NodeManagerServicer
from nodepool.servicers.user_manager import UserManagerServicer

__all__ = [
    "AuditServicer",
    "CertificateServicer",
    "MasterNodeServicer",
    "NodeManagerServicer",
    "UserManagerServicer",
]
