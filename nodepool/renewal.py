"""Client side of certificate renewal: a new key made here, the same identity, before expiry.

The private key never leaves this machine: only a CSR goes to the server, over the mTLS
connection that the current certificate authenticates. ``nodepool cert renew`` runs one
renewal; :func:`keep_renewed` is the loop a long-running worker uses, renewing once two
thirds of the lifetime have passed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodepool.client import ClientConfigError, aio_secure_channel, secure_channel
from nodepool.v1 import certificates_pb2, certificates_pb2_grpc

__all__ = [
    "RENEW_AFTER_FRACTION",
    "CertificateFiles",
    "RenewalError",
    "keep_renewed",
    "renew_certificate",
    "renewal_due_at",
]

_log = logging.getLogger(__name__)

RENEW_AFTER_FRACTION = 2 / 3


class RenewalError(RuntimeError):
    """Renewal failed; the message is one line and the old files are untouched."""


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    cert: Path
    key: Path
    ca: Path

    @property
    def previous_key(self) -> Path:
        return self.key.with_name(self.key.name + ".prev")

    def recover(self) -> None:
        """Finishes or undoes a renewal that a crash interrupted between its two renames.

        The old key is kept as ``<key>.prev`` until the new certificate is in place; if the
        key on disk does not match the certificate, the old key goes back.
        """
        if not self.previous_key.exists():
            return
        try:
            key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
            matches = key.public_key() == self.load().public_key()
        except (OSError, ValueError, TypeError):
            matches = False
        if matches:
            self.previous_key.unlink()
        else:
            os.replace(self.previous_key, self.key)
            _log.warning("an interrupted renewal was rolled back to the previous key")

    def load(self) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(self.cert.read_bytes())
        except OSError as exc:
            raise ClientConfigError(f"cert: cannot read {self.cert} ({exc.strerror})") from None
        except ValueError:
            raise ClientConfigError(f"cert: {self.cert} is not a PEM certificate") from None


def renewal_due_at(certificate: x509.Certificate) -> datetime:
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    return certificate.not_valid_before_utc + lifetime * RENEW_AFTER_FRACTION


def _certificate_signing_request(
    certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> bytes:
    uris = certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, str(names[0].value))] if names else []
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri) for uri in uris]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _prepare(files: CertificateFiles) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, bytes]:
    files.recover()
    current = files.load()
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        csr = _certificate_signing_request(current, key)
    except x509.ExtensionNotFound:
        raise RenewalError("the current certificate carries no identity to renew") from None
    return key, current, csr


def _install(
    files: CertificateFiles,
    key: ec.EllipticCurvePrivateKey,
    current: x509.Certificate,
    reply: certificates_pb2.RenewCertificateResponse,
) -> x509.Certificate:
    try:
        renewed = x509.load_pem_x509_certificate(reply.certificate_pem)
    except ValueError:
        raise RenewalError("the server returned something that is not a certificate") from None
    if renewed.public_key() != key.public_key():
        raise RenewalError("the server returned a certificate for another key")
    if _uris(renewed) != _uris(current):
        raise RenewalError("the server returned a certificate for another identity")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Both files are complete on disk before either replaces the old one, and the old key
    # stays as <key>.prev until the new certificate is in place: a crash in between is
    # rolled back by CertificateFiles.recover(), never left as a mismatched pair.
    staged_key = _stage(files.key, key_pem, 0o600)
    staged_cert = _stage(files.cert, reply.certificate_pem, 0o644)
    os.replace(_stage(files.previous_key, files.key.read_bytes(), 0o600), files.previous_key)
    os.replace(staged_key, files.key)
    os.replace(staged_cert, files.cert)
    files.previous_key.unlink()
    if reply.ca_pem:
        os.replace(_stage(files.ca, reply.ca_pem, 0o644), files.ca)
    return renewed


def renew_certificate(
    files: CertificateFiles,
    target: str | None = None,
    *,
    metadata: Sequence[tuple[str, str]] = (),
) -> x509.Certificate:
    """Renews the certificate in ``files`` now and replaces the files; returns the new one.

    A node's certificate is its whole credential; a client certificate renews together
    with its user's credential, passed as ``metadata``.
    """
    key, current, csr = _prepare(files)
    with secure_channel(target, cert=files.cert, key=files.key, ca=files.ca) as channel:
        stub = certificates_pb2_grpc.CertificateServiceStub(channel)
        try:
            reply = stub.RenewCertificate(
                certificates_pb2.RenewCertificateRequest(csr_pem=csr),
                timeout=30,
                metadata=tuple(metadata),
            )
        except grpc.RpcError as exc:
            raise RenewalError(_describe(exc)) from None
    return _install(files, key, current, reply)


async def keep_renewed(
    files: CertificateFiles,
    target: str | None = None,
    *,
    on_renewed: Callable[[x509.Certificate], None] | None = None,
    retry_after: float = 30.0,
) -> None:
    """Renews ``files`` each time two thirds of the lifetime have passed, forever.

    A failed attempt is logged and retried after ``retry_after`` seconds; the current
    certificate keeps working until it expires.
    """
    while True:
        try:
            due = renewal_due_at(files.load())
            wait = (due - datetime.now(UTC)).total_seconds()
            if wait > 0:
                await asyncio.sleep(wait)
            renewed = await _renew_async(files, target)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Whatever went wrong (server away, files unreadable), the current certificate
            # keeps working until it expires; keep trying rather than stop renewing.
            _log.warning("certificate renewal failed: %s", exc)
            await asyncio.sleep(retry_after)
            continue
        _log.info("certificate renewed; valid until %s", renewed.not_valid_after_utc)
        if on_renewed is not None:
            on_renewed(renewed)


async def _renew_async(files: CertificateFiles, target: str | None) -> x509.Certificate:
    key, current, csr = await asyncio.to_thread(_prepare, files)
    async with aio_secure_channel(target, cert=files.cert, key=files.key, ca=files.ca) as channel:
        stub = certificates_pb2_grpc.CertificateServiceStub(channel)
        try:
            reply = await stub.RenewCertificate(
                certificates_pb2.RenewCertificateRequest(csr_pem=csr), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            raise RenewalError(_describe(exc)) from None
    return await asyncio.to_thread(_install, files, key, current, reply)


def _uris(certificate: x509.Certificate) -> list[str]:
    return certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)


def _stage(target: Path, data: bytes, mode: int) -> Path:
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        os.fchmod(handle, mode)
        os.write(handle, data)
        os.fsync(handle)
    finally:
        os.close(handle)
    return Path(name)


def _describe(error: grpc.RpcError) -> str:
    if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return "the server could not be reached"
