"""Who is calling: peer identities from certificates and the principal of a call."""

from nodepool.auth.principal import (
    CURRENT_PRINCIPAL,
    Credential,
    PeerIdentity,
    PeerKind,
    Principal,
    current_principal,
)

__all__ = [
    "CURRENT_PRINCIPAL",
    "Credential",
    "PeerIdentity",
    "PeerKind",
    "Principal",
    "current_principal",
]
