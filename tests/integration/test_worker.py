"""`nodepool worker` keeps its node identity alive: it renews its own certificate in time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from pki import CertificateAuthority
from tests.fixtures.server import ServerThread

BIN = Path(sys.executable).parent


def _env(server: ServerThread, issued: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODEPOOL_")}
    env.update(
        NODEPOOL_SERVER=server.target,
        NODEPOOL_CERT=str(issued.cert_path),
        NODEPOOL_KEY=str(issued.key_path),
        NODEPOOL_CA=str(issued.ca_path),
    )
    return env


def _serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_worker_renews_its_certificate_automatically(
    mtls_server: ServerThread, pki_ca: CertificateAuthority, tmp_path: Path
) -> None:
    issued = pki_ca.issue(
        "node",
        "worker-renews",
        tmp_path,
        owner="alice",
        not_before=datetime.now(UTC),
        lifetime=timedelta(seconds=6),
    )
    first = _serial(issued.cert_path)
    with subprocess.Popen(
        [BIN / "nodepool", "worker"], env=_env(mtls_server, issued), stderr=subprocess.PIPE
    ) as process:
        try:
            deadline = time.monotonic() + 15
            while _serial(issued.cert_path) == first and time.monotonic() < deadline:
                assert process.poll() is None, "the worker exited"
                time.sleep(0.2)
            renewed = _serial(issued.cert_path)
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=20)
        finally:
            if process.poll() is None:
                process.kill()
    assert renewed != first, "no renewal within 15 s of a 6 s certificate"
    assert process.returncode == 0
    log = stderr.decode()
    assert "certificate renewed" in log
    assert "Traceback" not in log
    assert issued.key_path.stat().st_mode & 0o777 == 0o600


def test_worker_refuses_a_client_certificate(mtls_server: ServerThread, client_cert: Any) -> None:
    result = subprocess.run(
        [BIN / "nodepool", "worker"],
        env=_env(mtls_server, client_cert),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: cert: not a node certificate")


def test_worker_with_a_revoked_certificate_cannot_start(
    mtls_server: ServerThread, pki_ca: CertificateAuthority, tmp_path: Path
) -> None:
    issued = pki_ca.issue("node", "worker-revoked", tmp_path, owner="alice")
    pki_ca.revoke(serial=issued.serial, reason="keyCompromise", actor="test")
    time.sleep(1.0)  # several revocation polls
    result = subprocess.run(
        [BIN / "nodepool", "worker"],
        env=_env(mtls_server, issued),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: server: UNAUTHENTICATED")
