"""What each RPC demands of its caller; the table itself is ``nodepool.server.methods``."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Access", "MethodRule"]


class Access(enum.StrEnum):
    """What a client certificate must carry besides itself to call the method."""

    # The certificate alone: signing up, logging in, probing, and node calls (a node
    # certificate is a node's whole credential). Casbin still decides by role.
    CERTIFICATE = "certificate"
    # A user credential (access token or API key) with the client certificate.
    USER = "user"


@dataclass(frozen=True, slots=True)
class MethodRule:
    access: Access
    # Recorded in the audit log even when allowed: the call changes state.
    audited: bool
