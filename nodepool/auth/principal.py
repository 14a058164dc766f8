"""The principal of one call, handed from the interceptor to servicers in a ContextVar."""

from __future__ import annotations

import enum
from contextvars import ContextVar
from dataclasses import dataclass, field

from nodepool.errors import UnauthenticatedError

__all__ = [
    "CURRENT_PRINCIPAL",
    "Credential",
    "PeerIdentity",
    "PeerKind",
    "Principal",
    "current_principal",
]


class PeerKind(enum.StrEnum):
    """Kinds of certificate that may call the server (a server certificate may not)."""

    NODE = "node"
    CLIENT = "client"


class Credential(enum.StrEnum):
    CERTIFICATE = "certificate"
    ACCESS_TOKEN = "access_token"  # noqa: S105 - a credential kind, not a secret
    API_KEY = "api_key"


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The verified identity carried by the caller's certificate."""

    kind: PeerKind
    name: str
    spiffe_id: str
    serial: int
    # Seconds since the epoch: compared on every call, so kept as a float.
    not_after: float
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class Principal:
    """Everything later stages and servicers may know about the caller."""

    peer: PeerIdentity
    credential: Credential = Credential.CERTIFICATE
    username: str | None = None
    roles: frozenset[str] = field(default_factory=frozenset)
    session_id: str | None = None

    @property
    def audit_name(self) -> str:
        if self.username:
            return f"{self.peer.spiffe_id} user={self.username}"
        return self.peer.spiffe_id


CURRENT_PRINCIPAL: ContextVar[Principal] = ContextVar("nodepool_principal")


def current_principal() -> Principal:
    """The principal of the call being served; the interceptor always sets it."""
    try:
        return CURRENT_PRINCIPAL.get()
    except LookupError:
        raise UnauthenticatedError() from None
