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

        def read(value: str | Path | None, variable: str, what: str) -> bytes:
            path = value or env.get(variable)
            if not path:
                raise ClientConfigError(f"{what}: not given (use --{what} or {variable})")
            try:
                return Path(path).expanduser().read_bytes()
            except OSError as exc:
                raise ClientConfigError(f"{what}: cannot read {path} ({exc.strerror})") from None

        return cls(
            target=target or env.get("NODEPOOL_SERVER") or DEFAULT_SERVER,
            cert_pem=read(cert, "NODEPOOL_CERT", "cert"),
            key_pem=read(key, "NODEPOOL_KEY", "key"),
            ca_pem=read(ca, "NODEPOOL_CA", "ca"),
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )


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
