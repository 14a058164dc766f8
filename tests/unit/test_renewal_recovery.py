"""A renewal interrupted between its two renames is rolled back, not left mismatched."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodepool.renewal import CertificateFiles


def _files(issued: Any, tmp_path: Path) -> CertificateFiles:
    for path in (issued.cert_path, issued.key_path, issued.ca_path):
        shutil.copy(path, tmp_path / path.name)
    return CertificateFiles(
        tmp_path / issued.cert_path.name, tmp_path / issued.key_path.name, tmp_path / "ca.crt"
    )


def _key_matches(files: CertificateFiles) -> bool:
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    return key.public_key() == files.load().public_key()


def test_new_key_beside_the_old_certificate_is_rolled_back(node_cert: Any, tmp_path: Path) -> None:
    files = _files(node_cert, tmp_path)
    shutil.copy(files.key, files.previous_key)
    stray = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    files.key.write_bytes(stray)  # the crash: new key in place, certificate not yet
    assert not _key_matches(files)

    files.recover()

    assert _key_matches(files)
    assert not files.previous_key.exists()


def test_a_completed_renewal_only_drops_the_previous_key(node_cert: Any, tmp_path: Path) -> None:
    files = _files(node_cert, tmp_path)
    files.previous_key.write_bytes(b"the old key")
    files.recover()
    assert _key_matches(files)
    assert not files.previous_key.exists()
