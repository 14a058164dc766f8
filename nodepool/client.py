"""Client side: one call builds an mTLS channel to a Node Pool server.

    from nodepool.client import secure_channel
    from nodepool.v1 import node_manager_pb2, node_manager_pb2_grpc

    channel = secure_channel("localhost:50051", cert="me.crt", key="me.key", ca="ca.crt")
    stub = node_manager_pb2_grpc.NodeManagerStub(channel)

Arguments left out come from ``NODEPOOL_SERVER``, ``NODEPOOL_CERT``, ``NODEPOOL_KEY`` and
``NODEPOOL_CA``; an address without a port means 50051. Build a channel once and reuse it:
each one is a TLS connection. The files are checked before any connection is made, so an
unreadable, malformed or mismatched certificate or key is one :class:`ClientConfigError`
naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_SERVER",
    "ClientConfigError",
    "ClientCredentials",
    "aio_secure_channel",
    "credential_paths",
    "normalize_target",
    "secure_channel",
]

DEFAULT_PORT = 50051
DEFAULT_SERVER = f"localhost:{DEFAULT_PORT}"

# Targets in gRPC's own URI forms are passed through as they are.
_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")

_CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
)


class ClientConfigError(ValueError):
    """A missing or unreadable client credential; the message is one line."""


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    target: str
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    @classmethod
    def resolve(
        cls,
        target: str | None = None,
        *,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        ca: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ClientCredentials:
        env = os.environ if environ is None else environ
        paths = credential_paths(cert=cert, key=key, ca=ca, environ=env)
        cert_pem, key_pem, ca_pem = (
            _read(path, what) for path, what in zip(paths, _WHAT, strict=True)
        )
        _check_material(paths, cert_pem, key_pem, ca_pem)
        return cls(
            target=normalize_target(target or env.get("NODEPOOL_SERVER") or DEFAULT_SERVER),
            cert_pem=cert_pem,
            key_pem=key_pem,
            ca_pem=ca_pem,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )


_WHAT = ("cert", "key", "ca")


def credential_paths(
    *,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    ca: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Path, Path, Path]:
    """The certificate, key and CA paths, each from its argument or NODEPOOL_* variable."""
    env = os.environ if environ is None else environ
    paths = []
    for value, what in zip((cert, key, ca), _WHAT, strict=True):
        variable = f"NODEPOOL_{what.upper()}"
        path = value or env.get(variable)
        if not path:
            raise ClientConfigError(f"{what}: not given (use --{what} or {variable})")
        paths.append(Path(path).expanduser())
    return paths[0], paths[1], paths[2]


def normalize_target(target: str) -> str:
    """``HOST`` or ``HOST:PORT`` (IPv6 in brackets, or bare) as a gRPC target; 50051 by default.

    gRPC itself would take a missing port to mean 443.
    """
    target = target.strip()
    if target.startswith(_SCHEMES) or "://" in target:
        return target
    if target.startswith("["):
        return target if "]:" in target else f"{target}:{DEFAULT_PORT}"
    if target.count(":") > 1:  # a bare IPv6 address
        return f"[{target}]:{DEFAULT_PORT}"
    if target.endswith(":"):
        return f"{target}{DEFAULT_PORT}"
    return target if ":" in target else f"{target}:{DEFAULT_PORT}"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise ClientConfigError(f"{what}: {path} is a directory, not a file") from None
    except OSError as exc:
        raise ClientConfigError(f"{what}: cannot read {path} ({exc.strerror})") from None


def _check_material(
    paths: tuple[Path, Path, Path], cert_pem: bytes, key_pem: bytes, ca_pem: bytes
) -> None:
    """Parses the three files so a bad one is named here, not as a failed handshake."""
    cert_path, key_path, ca_path = paths
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ClientConfigError(f"cert: {cert_path} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ClientConfigError(
            f"key: {key_path} is encrypted; give the key without a passphrase"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ClientConfigError(f"key: {key_path} is not a PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise ClientConfigError(
            f"key: {key_path} is not the key of the certificate {cert_path} "
            "(give the pair issued together)"
        )
    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise ClientConfigError(f"ca: {ca_path} is not a PEM certificate") from None


def secure_channel(
    target: str | None = None,
    *,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    ca: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> grpc.Channel:
    """A blocking mTLS channel; see the module docstring."""
    creds = ClientCredentials.resolve(target, cert=cert, key=key, ca=ca, environ=environ)
    return grpc.secure_channel(creds.target, creds.channel_credentials(), _CHANNEL_OPTIONS)


def aio_secure_channel(
    target: str | None = None,
    *,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    ca: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> grpc.aio.Channel:
    """The asyncio flavour of :func:`secure_channel`."""
    creds = ClientCredentials.resolve(target, cert=cert, key=key, ca=ca, environ=environ)
    return grpc.aio.secure_channel(creds.target, creds.channel_credentials(), _CHANNEL_OPTIONS)
