"""Node Pool's bundled certificate authority (``nodepool-pki``).

Issues server, node and client certificates whose identity is a SPIFFE URI SAN, records
every certificate and revocation, and publishes a CRL. It never imports the server; the
server reads revocations through :class:`RevocationSource` and identities with
:func:`parse_identity`.
"""

from pki.authority import (
    DEFAULT_LIFETIMES,
    DEFAULT_TRUST_DOMAIN,
    REVOCATION_REASONS,
    CertificateAuthority,
    IssuedCertificate,
    parse_revocation_reason,
)
from pki.errors import (
    InvalidInputError,
    IssuanceRefusedError,
    NotFoundError,
    NotInitializedError,
    PassphraseError,
    PkiError,
    StoreError,
)
from pki.identity import CertificateKind, Identity, parse_identity, spiffe_id
from pki.passphrase import read_ca_passphrase
from pki.store import (
    CertificateRecord,
    CertificateStatus,
    CertificateStore,
    RevocationSource,
    format_serial,
)

__all__ = [
    "DEFAULT_LIFETIMES",
    "DEFAULT_TRUST_DOMAIN",
    "REVOCATION_REASONS",
    "CertificateAuthority",
    "CertificateKind",
    "CertificateRecord",
    "CertificateStatus",
    "CertificateStore",
    "Identity",
    "InvalidInputError",
    "IssuanceRefusedError",
    "IssuedCertificate",
    "NotFoundError",
    "NotInitializedError",
    "PassphraseError",
    "PkiError",
    "RevocationSource",
    "StoreError",
    "format_serial",
    "parse_identity",
    "parse_revocation_reason",
    "read_ca_passphrase",
    "spiffe_id",
]
