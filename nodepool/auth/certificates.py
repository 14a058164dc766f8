"""Stage 1: the caller's identity, read from its verified certificate.

The TLS layer has already verified the chain to our CA and the validity dates at the
handshake. This stage turns the certificate into a :class:`PeerIdentity`, refusing
anything that is not a client or node certificate of our trust domain, and re-checks
expiry on every call because a connection may outlive its certificate.
"""

from __future__ import annotations

from collections import OrderedDict

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from nodepool.auth.principal import PeerIdentity, PeerKind
from nodepool.errors import UnauthenticatedError
from pki import parse_identity

__all__ = ["PeerCertificateCache", "identity_from_certificate"]

_REFUSED = "certificate is not accepted"


def identity_from_certificate(certificate: x509.Certificate, trust_domain: str) -> PeerIdentity:
    """The peer identity of ``certificate``, or :class:`UnauthenticatedError`."""
    identity = parse_identity(certificate, trust_domain)
    if identity is None:
        raise UnauthenticatedError(_REFUSED)
    try:
        kind = PeerKind(str(identity.kind))
    except ValueError:
        # A server certificate (or any other kind) never authenticates a caller.
        raise UnauthenticatedError(_REFUSED) from None
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise UnauthenticatedError(_REFUSED) from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise UnauthenticatedError(_REFUSED)
    return PeerIdentity(
        kind=kind,
        name=identity.name,
        spiffe_id=identity.spiffe_id,
        serial=certificate.serial_number,
        not_after=certificate.not_valid_after_utc.timestamp(),
        owner=identity.owner,
    )


class PeerCertificateCache:
    """Parses each distinct peer certificate once; later calls are a dict lookup.

    Refusals are cached too, so a client retrying with a bad certificate costs no
    parsing. Entries are evicted least-recently-used beyond ``max_entries``.
    """

    def __init__(self, trust_domain: str, max_entries: int = 65536) -> None:
        self._trust_domain = trust_domain
        self._max_entries = max_entries
        self._entries: OrderedDict[bytes, PeerIdentity | None] = OrderedDict()

    def identify(self, pem: bytes) -> PeerIdentity:
        try:
            identity = self._entries[pem]
            self._entries.move_to_end(pem)
        except KeyError:
            identity = self._parse(pem)
            self._entries[pem] = identity
            if len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        if identity is None:
            raise UnauthenticatedError(_REFUSED)
        return identity

    def _parse(self, pem: bytes) -> PeerIdentity | None:
        try:
            certificate = x509.load_pem_x509_certificate(pem)
            return identity_from_certificate(certificate, self._trust_domain)
        except (ValueError, UnauthenticatedError):
            return None
