"""Server TLS: mutual TLS only, and certificate rotation without a restart.

gRPC asks the fetcher for a new configuration at each new handshake, so the fetcher
only hands over a configuration that the background watcher already loaded and checked;
no file is read on the connection path. Existing connections keep their session.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["TlsError", "TlsFiles", "TlsMaterial", "TlsReloader"]

_log = logging.getLogger(__name__)


class TlsError(ValueError):
    """The certificate files are missing, unreadable or do not belong together."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path

    def stamp(self) -> tuple[tuple[int, int, int, int], ...]:
        """Changes whenever any of the files is replaced or rewritten."""
        stamps = []
        for path in (self.cert, self.key, self.ca):
            info = path.stat()
            # The inode and ctime catch a same-size replacement that kept its mtime.
            stamps.append((info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size))
        return tuple(stamps)


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    @classmethod
    def load(cls, files: TlsFiles) -> TlsMaterial:
        try:
            material = cls(files.cert.read_bytes(), files.key.read_bytes(), files.ca.read_bytes())
        except OSError as exc:
            raise TlsError(f"cannot read {exc.filename}: {exc.strerror}") from None
        material.validate()
        return material

    def validate(self) -> None:
        """Refuses a pair that would break handshakes, e.g. a rotation caught half-written."""
        try:
            certificate = x509.load_pem_x509_certificate(self.cert_pem)
            key = serialization.load_pem_private_key(self.key_pem, password=None)
            x509.load_pem_x509_certificates(self.ca_pem)
        except (ValueError, TypeError) as exc:
            raise TlsError(f"server TLS files are not valid PEM ({exc})") from None
        if certificate.public_key() != key.public_key():
            raise TlsError("server certificate and key do not belong together")

    def server_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem
        )


class TlsReloader:
    """Owns the server credentials and swaps in rotated files for new connections."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._material = TlsMaterial.load(files)
        self._stamp = files.stamp()
        self._rejected_stamp: object = None
        self._pending: grpc.ServerCertificateConfiguration | None = None
        # gRPC takes the pending configuration on its handshake threads while the watcher
        # sets it on another; without the lock a rotation could be lost in between.
        self._lock = threading.Lock()

    @property
    def material(self) -> TlsMaterial:
        return self._material

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._material.server_configuration(),
            # The stubs say the fetcher must return a configuration; gRPC documents
            # None as "keep the current one", which is what we return between rotations.
            self._take_pending,  # type: ignore[arg-type]
            require_client_authentication=True,
        )

    def _take_pending(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC core for each new handshake; must stay cheap and never raise.
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def reload_if_changed(self) -> bool:
        """Loads the files if they changed; keeps serving the old ones if the new are bad."""
        try:
            stamp = self._files.stamp()
        except OSError:
            return False
        if stamp == self._stamp:
            return False
        try:
            material = TlsMaterial.load(self._files)
        except TlsError as exc:
            # Retried every tick until the pair is whole; said once per version of the files.
            if stamp != self._rejected_stamp:
                _log.warning("server TLS files changed but were not loaded: %s", exc)
                self._rejected_stamp = stamp
            return False
        self._stamp = stamp
        if material == self._material:
            return False
        with self._lock:
            self._material = material
            self._pending = material.server_configuration()
        _log.info("server TLS certificate reloaded for new connections")
        return True
