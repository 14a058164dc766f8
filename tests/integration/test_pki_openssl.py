"""Our certificates and CRLs as the real openssl binary sees them."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pki import CertificateAuthority, IssuedCertificate
from pki.cli import main
from tests.fixtures.pki import TEST_TRUST_DOMAIN, issue_odd_certificate


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    # scripts/test installs openssl when it is missing; without it these tests must fail.
    binary = shutil.which("openssl")
    assert binary is not None, "the openssl command is required (scripts/test installs it)"
    return subprocess.run(
        [binary, *map(str, args)], capture_output=True, text=True, check=False, timeout=60
    )


@pytest.fixture
def ca(tmp_path: Path) -> Iterator[CertificateAuthority]:
    with CertificateAuthority.init(tmp_path / "ca", TEST_TRUST_DOMAIN) as authority:
        yield authority


@pytest.mark.parametrize(
    ("fixture", "purpose"),
    [("server_cert", "sslserver"), ("client_cert", "sslclient"), ("node_cert", "sslclient")],
)
def test_verify_each_kind(request: pytest.FixtureRequest, fixture: str, purpose: str) -> None:
    issued: IssuedCertificate = request.getfixturevalue(fixture)
    result = openssl("verify", "-CAfile", issued.ca_path, issued.cert_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": OK")
    # The extended key usage keeps each kind to its side of the handshake.
    other = "sslclient" if purpose == "sslserver" else "sslserver"
    result = openssl("verify", "-purpose", purpose, "-CAfile", issued.ca_path, issued.cert_path)
    assert result.returncode == 0, result.stderr
    result = openssl("verify", "-purpose", other, "-CAfile", issued.ca_path, issued.cert_path)
    assert result.returncode != 0


def test_foreign_ca_does_not_verify(
    foreign_ca: CertificateAuthority, client_cert: IssuedCertificate
) -> None:
    result = openssl("verify", "-CAfile", foreign_ca.directory / "ca.crt", client_cert.cert_path)
    assert result.returncode != 0


def test_expired_certificate_does_not_verify(pki_ca: CertificateAuthority, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    odd = issue_odd_certificate(
        pki_ca, tmp_path, "old", not_before=now - timedelta(days=2), not_after=now - timedelta(1)
    )
    result = openssl("verify", "-CAfile", odd.ca_path, odd.cert_path)
    assert result.returncode != 0
    assert "expired" in result.stdout + result.stderr


def test_crl_verifies_and_revokes(ca: CertificateAuthority, tmp_path: Path) -> None:
    good = ca.issue("client", "good", tmp_path)
    bad = ca.issue("node", "bad", tmp_path, owner="alice")
    ca.revoke(name="bad", reason="keyCompromise", actor="root")
    crl = tmp_path / "crl.pem"
    ca.write_crl(crl)
    ca_path = ca.directory / "ca.crt"

    result = openssl("crl", "-in", crl, "-CAfile", ca_path, "-noout")
    assert result.returncode == 0, result.stderr
    assert "verify OK" in result.stdout + result.stderr

    result = openssl("crl", "-in", crl, "-noout", "-text")
    assert f"{bad.serial:X}" in result.stdout.replace(":", "")
    assert "Key Compromise" in result.stdout

    result = openssl("verify", "-crl_check", "-CRLfile", crl, "-CAfile", ca_path, bad.cert_path)
    assert result.returncode != 0
    assert "revoked" in result.stdout + result.stderr

    result = openssl("verify", "-crl_check", "-CRLfile", crl, "-CAfile", ca_path, good.cert_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


def test_foreign_crl_is_rejected(
    ca: CertificateAuthority, foreign_ca: CertificateAuthority, tmp_path: Path
) -> None:
    crl = tmp_path / "crl.pem"
    ca.write_crl(crl)
    result = openssl("crl", "-in", crl, "-CAfile", foreign_ca.directory / "ca.crt", "-noout")
    assert "verify OK" not in result.stdout + result.stderr


def test_cli_issued_files_verify(tmp_path: Path) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "out"
    assert main(["init", "--dir", str(ca_dir), "--trust-domain", TEST_TRUST_DOMAIN]) == 0
    issue = [
        "issue",
        "server",
        "api",
        "--dns",
        "localhost",
        "--dir",
        str(ca_dir),
        "--out",
        str(out),
    ]
    assert main(issue) == 0
    result = openssl("verify", "-CAfile", out / "ca.crt", out / "api.crt")
    assert result.returncode == 0, result.stderr
    result = openssl("pkey", "-in", out / "api.key", "-noout", "-check")
    assert result.returncode == 0, result.stderr
