"""Client side: one call builds an mTLS channel to a Node Pool server.

    from nodepool.client import secure_channel
    from nodepool.v1 import node_manager_pb2, node_manager_pb2_grpc

    channel = secure_channel("localhost:50051", cert="me.crt", key="me.key", ca="ca.crt")
    stub = node_manager_pb2_grpc.NodeManagerStub(channel)

Arguments left out come from ``NODEPOOL_SERVER``, ``NODEPOOL_CERT``, ``NODEPOOL_KEY`` and
``NODEPOOL_CA``. Build a channel once and reuse it: each one is a TLS connection.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = [
    "DEFAULT_SERVER",
    "ClientConfigError",
    "ClientCredentials",
    "aio_secure_channel",
    "credential_paths",
    "secure_channel",
]

DEFAULT_SERVER = "localhost:50051"

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
        return cls(
            target=target or env.get("NODEPOOL_SERVER") or DEFAULT_SERVER,
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


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ClientConfigError(f"{what}: cannot read {path} ({exc.strerror})") from None


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
