"""CA records in PostgreSQL: servers on other hosts see revocations without the CA directory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nodepool.client import secure_channel
from tests.fixtures.server import running_server, server_settings

BIN = Path(sys.executable).parent


def _pki(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [BIN / "nodepool-pki", *args], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _health(target: str, out: Path, name: str) -> grpc.StatusCode:
    with secure_channel(
        target, cert=out / f"{name}.crt", key=out / f"{name}.key", ca=out / "ca.crt"
    ) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


def test_revocation_recorded_in_postgresql_reaches_the_server(
    postgres_database_factory: Callable[[], str], tmp_path: Path
) -> None:
    url = postgres_database_factory()
    ca_dir, out = tmp_path / "ca", tmp_path / "certs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODEPOOL_")}
    env["NODEPOOL_PKI_DATABASE_URL"] = url
    _pki(env, "init", "--dir", str(ca_dir), "--trust-domain", "nodepool.test")
    _pki(
        env,
        "issue",
        "server",
        "server",
        "--dir",
        str(ca_dir),
        "--out",
        str(out),
        "--dns",
        "localhost",
        "--ip",
        "127.0.0.1",
        "--ip",
        "::1",
    )
    _pki(env, "issue", "client", "far-away", "--dir", str(ca_dir), "--out", str(out))
    listed = _pki(env, "list", "--dir", str(ca_dir), "--json")
    assert '"far-away"' in listed

    class Issued:
        cert_path = out / "server.crt"
        key_path = out / "server.key"
        ca_path = out / "ca.crt"

    settings = server_settings(ca_dir, Issued(), tmp_path / "data", pki_database_url=url)
    with running_server(settings) as server:
        assert _health(server.target, out, "far-away") == grpc.StatusCode.OK
        _pki(env, "revoke", "far-away", "--dir", str(ca_dir), "--reason", "keyCompromise")
        deadline = time.monotonic() + 2.0
        code = _health(server.target, out, "far-away")
        while code == grpc.StatusCode.OK and time.monotonic() < deadline:
            time.sleep(0.05)
            code = _health(server.target, out, "far-away")
        assert code == grpc.StatusCode.UNAUTHENTICATED
