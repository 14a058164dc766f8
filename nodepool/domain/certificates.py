"""Certificate renewal: a node or client gets a new certificate for the identity it proves.

The caller has already been authenticated by its current certificate (identity and
revocation stages). It sends a CSR made with a new key pair on its own machine; the CA
signs only that exact identity, and only while the presented certificate is valid and its
name has not been revoked.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from cryptography import x509

from nodepool.auth.principal import PeerIdentity
from nodepool.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnavailableError,
)
from pki import InvalidInputError, IssuanceRefusedError, PassphraseError, PkiError

__all__ = ["MAX_CSR_BYTES", "CertificateRenewal", "CertificateSigner", "RenewedCertificate"]

# A P-256 CSR is well under 1 KiB; anything near this is not one of ours.
MAX_CSR_BYTES = 16 * 1024


class CertificateSigner(Protocol):
    """The part of the CA that renewal needs (``pki.CertificateAuthority`` has it)."""

    @property
    def certificate_pem(self) -> bytes: ...

    def sign_csr(
        self,
        csr_pem: bytes,
        *,
        expected_kind: str,
        expected_name: str,
        presented_serial: int | None = None,
    ) -> bytes: ...


@dataclass(frozen=True, slots=True)
class RenewedCertificate:
    certificate_pem: bytes
    ca_pem: bytes
    not_after: datetime


class CertificateRenewal:
    def __init__(self, signer: CertificateSigner | None) -> None:
        self._signer = signer

    def renew(self, peer: PeerIdentity, csr_pem: bytes) -> RenewedCertificate:
        if self._signer is None:
            raise FailedPreconditionError("certificate renewal is not available on this server")
        if not csr_pem or len(csr_pem) > MAX_CSR_BYTES:
            raise InvalidArgumentError("csr_pem must be a PEM certificate signing request")
        try:
            certificate_pem = self._signer.sign_csr(
                csr_pem,
                expected_kind=str(peer.kind),
                expected_name=peer.name,
                presented_serial=peer.serial,
            )
        except InvalidInputError:
            raise InvalidArgumentError(
                "csr_pem must be a valid request for exactly your own identity"
            ) from None
        except IssuanceRefusedError:
            raise PermissionDeniedError("this certificate may not be renewed") from None
        except PassphraseError:
            raise FailedPreconditionError(
                "certificate renewal is not available on this server"
            ) from None
        except PkiError:
            raise UnavailableError("certificate renewal failed; try again") from None
        not_after = x509.load_pem_x509_certificate(certificate_pem).not_valid_after_utc
        return RenewedCertificate(certificate_pem, self._signer.certificate_pem, not_after)
