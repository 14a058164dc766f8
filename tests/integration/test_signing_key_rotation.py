"""Rotating the token signing key takes effect without a restart; old tokens stay valid."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt

from nodepool.v1 import user_manager_pb2, user_manager_pb2_grpc
from pki import CertificateAuthority
from tests.fixtures.server import bearer, running_server, server_settings, sign_up, user_channel

BIN = Path(sys.executable).parent


def _kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def test_rotation_is_picked_up_and_old_tokens_keep_working(
    pki_ca: CertificateAuthority, server_cert: Any, client_cert: Any, tmp_path: Path
) -> None:
    settings = server_settings(pki_ca.directory, server_cert, tmp_path / "data")
    with running_server(settings) as server:
        old = sign_up(server, client_cert, "rotating-user").access_token
        rotated = subprocess.run(
            [BIN / "nodepool", "keys", "rotate"],
            env={"NODEPOOL_DATA_DIR": str(settings.data_dir), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=False,
        )
        assert rotated.returncode == 0, rotated.stderr
        new_kid = rotated.stdout.strip()
        assert new_kid != _kid(old)

        deadline = time.monotonic() + 15
        new = sign_up(server, client_cert, "rotating-user").access_token
        while _kid(new) != new_kid and time.monotonic() < deadline:
            time.sleep(1.0)
            new = sign_up(server, client_cert, "rotating-user").access_token
        assert _kid(new) == new_kid, "the server still signs with the old key"

        with user_channel(server, client_cert) as channel:
            stub = user_manager_pb2_grpc.UserManagerStub(channel)
            for token in (old, new):
                info = stub.GetUserInfo(
                    user_manager_pb2.GetUserInfoRequest(), metadata=bearer(token), timeout=10
                )
                assert info.user.username == "rotating-user"
    keys = sorted(p.name for p in (settings.data_dir / "jwt-keys").iterdir())
    assert f"{new_kid}.pem" in keys
    # Both keys stay on disk: the old one still verifies the tokens it signed.
    assert len([k for k in keys if k.endswith(".pem")]) == 2
