"""Server certificate rotation: new connections get the new certificate, nothing is dropped.

The server watches copies of its TLS files in a temporary directory, as an operator's
deployment would, and the tests replace those files while clients keep calling.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nodepool.client import secure_channel
from pki import CertificateAuthority, IssuedCertificate
from tests.fixtures.server import ServerThread, running_server, server_settings

RELOAD_INTERVAL = 0.2
# Many reload ticks: long enough that a rotation that should show has shown.
ROTATION_DEADLINE = 5.0


@dataclass(frozen=True)
class _TlsFiles:
    cert_path: Path
    key_path: Path
    ca_path: Path


@pytest.fixture
def tls_files(server_cert: IssuedCertificate, tmp_path: Path) -> _TlsFiles:
    """Copies of the session server certificate that the test is free to overwrite."""
    directory = tmp_path / "tls"
    directory.mkdir(mode=0o700)
    files = _TlsFiles(directory / "server.crt", directory / "server.key", directory / "ca.crt")
    shutil.copy(server_cert.cert_path, files.cert_path)
    shutil.copy(server_cert.key_path, files.key_path)
    shutil.copy(server_cert.ca_path, files.ca_path)
    return files


@pytest.fixture
def rotating_server(
    pki_ca: CertificateAuthority, tls_files: _TlsFiles, tmp_path: Path
) -> Iterator[ServerThread]:
    settings = server_settings(
        pki_ca.directory, tls_files, tmp_path / "data", tls_reload_interval=RELOAD_INTERVAL
    )
    with running_server(settings) as server:
        yield server


def _channel(server: ServerThread, client: Any) -> grpc.Channel:
    return secure_channel(
        server.target, cert=client.cert_path, key=client.key_path, ca=client.ca_path
    )


def _check(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _served_serial(server: ServerThread, client: Any) -> int:
    """The serial of the certificate the server presents to a brand-new connection."""
    context = ssl.create_default_context(cafile=str(client.ca_path))
    context.load_cert_chain(str(client.cert_path), str(client.key_path))
    # Offer h2 like a gRPC client, so the server treats this as an ordinary handshake.
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("localhost", server.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _replace(path: Path, data: bytes) -> None:
    """Writes beside ``path`` and renames over it, so a reader sees old or new, never half."""
    staging = path.with_name(f".{path.name}.new")
    staging.write_bytes(data)
    staging.chmod(0o600)
    os.replace(staging, path)


def _wait_for_serial(server: ServerThread, client: Any, serial: int) -> None:
    deadline = time.monotonic() + ROTATION_DEADLINE
    while (served := _served_serial(server, client)) != serial:
        assert time.monotonic() < deadline, f"still serving {served:x}, expected {serial:x}"
        time.sleep(0.05)


class _CallLoop(threading.Thread):
    """Calls ``attempt`` until stopped, counting successes and keeping every failure."""

    def __init__(self, name: str, attempt: Callable[[], None], pause: float) -> None:
        super().__init__(name=name, daemon=True)
        self._attempt = attempt
        self._pause = pause
        self._stopping = threading.Event()
        self.succeeded = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._attempt()
                self.succeeded += 1
            except Exception as exc:
                # Kept as text: the thread must not die on the first failure.
                self.failures.append(f"{self.name}: {exc!r}")
            time.sleep(self._pause)

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=15)
        assert not self.is_alive(), f"{self.name} did not stop"

    def wait_for(self, calls: int, seconds: float = 10.0) -> None:
        """Waits until ``calls`` more calls have succeeded."""
        target = self.succeeded + calls
        deadline = time.monotonic() + seconds
        while self.succeeded < target:
            assert not self.failures, self.failures
            assert time.monotonic() < deadline, f"{self.name}: only {self.succeeded} calls"
            time.sleep(0.02)


def test_rotation_serves_the_new_certificate_without_failing_a_call(
    rotating_server: ServerThread,
    pki_ca: CertificateAuthority,
    server_cert: IssuedCertificate,
    client_cert: IssuedCertificate,
    tls_files: _TlsFiles,
    tmp_path: Path,
) -> None:
    assert _served_serial(rotating_server, client_cert) == server_cert.serial
    with _channel(rotating_server, client_cert) as kept_open:
        kept = _CallLoop("kept-open channel", lambda: _check(kept_open), pause=0.002)

        def fresh_connection() -> None:
            with _channel(rotating_server, client_cert) as channel:
                _check(channel)

        fresh = _CallLoop("new channels", fresh_connection, pause=0.0)
        kept.start()
        fresh.start()
        try:
            kept.wait_for(50)
            fresh.wait_for(5)

            rotated = pki_ca.issue(
                "server",
                "server-rotated",
                tmp_path / "rotated",
                dns_names=["localhost"],
                ip_addresses=["127.0.0.1", "::1"],
            )
            # Each file is swapped atomically; between the two swaps the pair on disk does
            # not match, and the reloader must keep the old pair and retry on its next tick.
            _replace(tls_files.key_path, rotated.key_path.read_bytes())
            _replace(tls_files.cert_path, rotated.cert_path.read_bytes())

            _wait_for_serial(rotating_server, client_cert, rotated.serial)
            # Both kinds of traffic carry on after the swap: the open connection keeps its
            # session, and new ones handshake against the new certificate.
            kept.wait_for(100)
            fresh.wait_for(10)
        finally:
            kept.stop()
            fresh.stop()
        _check(kept_open)

    assert kept.failures == []
    assert fresh.failures == []
    assert _served_serial(rotating_server, client_cert) == rotated.serial


def test_mismatched_rotation_is_ignored_until_completed(
    caplog: pytest.LogCaptureFixture,
    rotating_server: ServerThread,
    pki_ca: CertificateAuthority,
    server_cert: IssuedCertificate,
    client_cert: IssuedCertificate,
    tls_files: _TlsFiles,
    tmp_path: Path,
) -> None:
    rotated = pki_ca.issue(
        "server",
        "server-half-rotated",
        tmp_path / "rotated",
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1", "::1"],
    )
    new_key = rotated.key_path.read_bytes()

    # A new certificate beside the old key: the pair does not belong together.
    caplog.set_level(logging.WARNING, logger="nodepool.server.tls")
    _replace(tls_files.cert_path, rotated.cert_path.read_bytes())
    time.sleep(RELOAD_INTERVAL * 5)
    # gRPC would also refuse to switch to a pair that does not match, so the old serial
    # alone cannot show that the reloader checked; its warning to the operator does.
    assert any(
        record.name == "nodepool.server.tls" and record.levelno == logging.WARNING
        for record in caplog.records
    ), "a mismatched pair was loaded without a warning"
    assert _served_serial(rotating_server, client_cert) == server_cert.serial
    with _channel(rotating_server, client_cert) as channel:
        _check(channel)

    # A key file caught half-written is no better.
    _replace(tls_files.key_path, new_key[: len(new_key) // 2])
    time.sleep(RELOAD_INTERVAL * 5)
    assert _served_serial(rotating_server, client_cert) == server_cert.serial
    with _channel(rotating_server, client_cert) as channel:
        _check(channel)

    # Once the pair is whole the reloader, which has kept retrying, takes it.
    _replace(tls_files.key_path, new_key)
    _wait_for_serial(rotating_server, client_cert, rotated.serial)
    with _channel(rotating_server, client_cert) as channel:
        _check(channel)
