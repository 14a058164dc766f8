"""What the checks know about one call, independent of the transport.

The pipeline (``nodepool.server.pipeline``) makes a :class:`Call` per call and each stage
reads or adds to it. The context is anything that answers the three questions the
stages ask; a ``grpc.aio.ServicerContext`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from nodepool.auth.principal import PeerIdentity, Principal
from nodepool.auth.rules import MethodRule

__all__ = ["Call", "CallContext"]


class CallContext(Protocol):
    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        """The TLS session's properties (``x509_pem_cert`` among them)."""

    def invocation_metadata(self) -> Iterable[tuple[str, str | bytes]] | None:
        """The request headers."""

    def peer(self) -> str:
        """The caller's address as the transport names it."""


@dataclass(slots=True)
class Call:
    """One call as the stages see it; each stage may add to it."""

    method: str
    rule: MethodRule
    context: CallContext
    peer: PeerIdentity | None = None
    principal: Principal | None = None
