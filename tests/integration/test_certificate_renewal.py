"""Renewal over the existing mTLS connection: new key made by the holder, same identity."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nodepool.client import secure_channel
from nodepool.renewal import CertificateFiles, RenewalError, keep_renewed, renew_certificate
from nodepool.v1 import certificates_pb2, certificates_pb2_grpc
from pki import CertificateAuthority
from tests.fixtures.server import ServerThread, bearer, sign_up

BIN = Path(sys.executable).parent


def _issue(
    ca: CertificateAuthority, out: Path, kind: str, name: str, **kw: Any
) -> CertificateFiles:
    issued = ca.issue(kind, name, out, owner="alice" if kind == "node" else None, **kw)
    return CertificateFiles(issued.cert_path, issued.key_path, issued.ca_path)


def _uri(certificate: x509.Certificate) -> list[str]:
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _health(server: ServerThread, files: CertificateFiles) -> int:
    with secure_channel(server.target, cert=files.cert, key=files.key, ca=files.ca) as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(), timeout=10)
            .status
        )


@pytest.mark.parametrize("kind", ["node", "client"])
def test_renewal_keeps_identity_with_a_new_key(
    mtls_server: ServerThread,
    pki_ca: CertificateAuthority,
    client_cert: Any,
    tmp_path: Path,
    kind: str,
) -> None:
    issued = pki_ca.issue(
        kind, f"renew-{kind}", tmp_path, owner="alice" if kind == "node" else None
    )
    files = CertificateFiles(issued.cert_path, issued.key_path, issued.ca_path)
    old = files.load()
    old_key = files.key.read_bytes()
    # A client certificate renews only with its user's credential, a session opened
    # through that very device (tokens are bound to it); a node's is its own.
    metadata = (
        bearer(sign_up(mtls_server, issued, "renewing-user").access_token)
        if kind == "client"
        else ()
    )

    renewed = renew_certificate(files, mtls_server.target, metadata=metadata)

    assert _uri(renewed) == _uri(old)
    assert renewed.serial_number != old.serial_number
    assert renewed.public_key() != old.public_key()
    assert files.load() == renewed
    assert files.key.read_bytes() != old_key
    assert files.key.stat().st_mode & 0o777 == 0o600
    assert _health(mtls_server, files) == health_pb2.HealthCheckResponse.SERVING
    recorded = {r.serial for r in pki_ca.list_certificates() if r.name == f"renew-{kind}"}
    assert {old.serial_number, renewed.serial_number} <= recorded


def test_client_certificate_alone_cannot_renew(
    mtls_server: ServerThread, pki_ca: CertificateAuthority, tmp_path: Path
) -> None:
    files = _issue(pki_ca, tmp_path, "client", "renew-bare-device")
    with pytest.raises(RenewalError, match="^UNAUTHENTICATED"):
        renew_certificate(files, mtls_server.target)


def test_revoked_certificate_cannot_renew(
    mtls_server: ServerThread, pki_ca: CertificateAuthority, tmp_path: Path
) -> None:
    files = _issue(pki_ca, tmp_path, "node", "renew-revoked")
    before = files.cert.read_bytes(), files.key.read_bytes()
    pki_ca.revoke(serial=files.load().serial_number, reason="keyCompromise", actor="test")

    # Refused by the revocation stage once the server has seen the revocation, and by
    # the CA's own records before that: either way nothing is signed or written.
    with pytest.raises(RenewalError, match="^(UNAUTHENTICATED|PERMISSION_DENIED)"):
        renew_certificate(files, mtls_server.target)
    assert (files.cert.read_bytes(), files.key.read_bytes()) == before
    assert len([r for r in pki_ca.list_certificates() if r.name == "renew-revoked"]) == 1


def _renew_stub_call(
    server: ServerThread, files: CertificateFiles, csr_pem: bytes
) -> grpc.StatusCode:
    with secure_channel(server.target, cert=files.cert, key=files.key, ca=files.ca) as channel:
        stub = certificates_pb2_grpc.CertificateServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.RenewCertificate(certificates_pb2.RenewCertificateRequest(csr_pem=csr_pem))
    details = raised.value.details() or ""
    assert "/" not in details
    assert "Traceback" not in details
    return raised.value.code()


def _csr_for(uri: str, name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def test_renewal_for_another_identity_is_refused(
    mtls_server: ServerThread, pki_ca: CertificateAuthority, node_cert: Any, tmp_path: Path
) -> None:
    files = CertificateFiles(node_cert.cert_path, node_cert.key_path, node_cert.ca_path)
    other = _csr_for("spiffe://nodepool.test/node/node-b", "node-b")
    assert _renew_stub_call(mtls_server, files, other) == grpc.StatusCode.INVALID_ARGUMENT
    as_client = _csr_for("spiffe://nodepool.test/client/node-a", "node-a")
    assert _renew_stub_call(mtls_server, files, as_client) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "csr", [b"", b"not a csr", b"-----BEGIN CERTIFICATE REQUEST-----\n" * 2000]
)
def test_malformed_requests_are_invalid_argument(
    mtls_server: ServerThread, node_cert: Any, csr: bytes
) -> None:
    files = CertificateFiles(node_cert.cert_path, node_cert.key_path, node_cert.ca_path)
    assert _renew_stub_call(mtls_server, files, csr) == grpc.StatusCode.INVALID_ARGUMENT


def test_keep_renewed_renews_after_two_thirds_of_the_lifetime(
    mtls_server: ServerThread, pki_ca: CertificateAuthority, tmp_path: Path
) -> None:
    files = _issue(
        pki_ca,
        tmp_path,
        "node",
        "renew-loop",
        not_before=datetime.now(UTC),
        lifetime=timedelta(seconds=6),
    )
    first = files.load()
    renewed: list[x509.Certificate] = []

    async def run() -> None:
        task = asyncio.create_task(
            keep_renewed(files, mtls_server.target, on_renewed=renewed.append, retry_after=0.5)
        )
        try:
            for _ in range(200):
                if renewed:
                    return
                await asyncio.sleep(0.05)
        finally:
            task.cancel()

    asyncio.run(run())
    assert renewed, "no renewal within 10 s of a 6 s certificate"
    assert renewed[0].serial_number != first.serial_number
    assert renewed[0].not_valid_after_utc > first.not_valid_after_utc
    assert _health(mtls_server, files) == health_pb2.HealthCheckResponse.SERVING


def test_cli_renews_only_when_due_with_if_due(
    mtls_server: ServerThread, pki_ca: CertificateAuthority, tmp_path: Path
) -> None:
    files = _issue(pki_ca, tmp_path, "node", "renew-cli")
    args = [
        BIN / "nodepool",
        "cert",
        "renew",
        "--server",
        mtls_server.target,
        "--cert",
        str(files.cert),
        "--key",
        str(files.key),
        "--ca",
        str(files.ca),
    ]
    not_due = subprocess.run([*args, "--if-due"], capture_output=True, text=True, check=False)
    assert not_due.returncode == 0
    assert "not due yet" in not_due.stderr
    serial = files.load().serial_number
    now = subprocess.run(args, capture_output=True, text=True, check=False)
    assert now.returncode == 0, now.stderr
    assert now.stdout.startswith("renewed; valid until ")
    assert files.load().serial_number != serial
