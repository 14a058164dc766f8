"""`nodepool serve` and `scripts/run` as an operator runs them: real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodepool.client import secure_channel
from nodepool.v1 import user_manager_pb2, user_manager_pb2_grpc
from tests.fixtures.server import PASSWORD

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODEPOOL_")}
    env.update(extra)
    return env


def _wait_serving(env: dict[str, str], process: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early with {process.returncode}")
        health = subprocess.run(
            [BIN / "nodepool", "health", "--timeout", "2"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if health.returncode == 0 and health.stdout.strip() == "SERVING":
            return
        last = health.stderr.strip()
        time.sleep(0.5)
    raise AssertionError(f"server not serving in time: {last}")


@pytest.fixture
def serve_env(pki_ca: Any, server_cert: Any, client_cert: Any, tmp_path: Path) -> dict[str, str]:
    port = _free_port()
    return _clean_env(
        NODEPOOL_GRPC_PORT=str(port),
        NODEPOOL_GRPC_HOST="localhost",
        NODEPOOL_DATA_DIR=str(tmp_path / "data"),
        NODEPOOL_TRUST_DOMAIN="nodepool.test",
        NODEPOOL_PKI_DIR=str(pki_ca.directory),
        NODEPOOL_TLS_CERT=str(server_cert.cert_path),
        NODEPOOL_TLS_KEY=str(server_cert.key_path),
        NODEPOOL_TLS_CA=str(server_cert.ca_path),
        NODEPOOL_SERVER=f"localhost:{port}",
        NODEPOOL_CERT=str(client_cert.cert_path),
        NODEPOOL_KEY=str(client_cert.key_path),
        NODEPOOL_CA=str(client_cert.ca_path),
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_signal(serve_env: dict[str, str], signum: int) -> None:
    with subprocess.Popen(
        [BIN / "nodepool", "serve"], env=serve_env, stderr=subprocess.PIPE
    ) as process:
        try:
            _wait_serving(serve_env, process, 60)
            process.send_signal(signum)
            _, stderr = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0
    log = stderr.decode()
    assert "shutting down" in log
    assert "Traceback" not in log


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["serve"], {"NODEPOOL_GRPC_PORT": "http"}, "error: NODEPOOL_GRPC_PORT: must be a whole"),
        (["serve"], {"NODEPOOL_NODE_TIMEOUT": "5"}, "error: NODEPOOL_NODE_TIMEOUT: must be"),
        (["serve"], {}, "error: NODEPOOL_TLS_CERT: not set"),
        (["serve", "--config", "/nonexistent/n.toml"], {}, "error: config file:"),
        (["serve", "--bogus"], {}, "error: No such option '--bogus'"),
        (["no-such-command"], {}, "error: No such command 'no-such-command'"),
        (["db", "migrate"], {"NODEPOOL_DATABASE_URL": "oracle://x"}, "error: NODEPOOL_DATABASE"),
        (
            ["db", "migrate"],
            {"NODEPOOL_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"},
            "error: database: cannot migrate (the database cannot be reached or created)",
        ),
    ],
)
def test_bad_settings_and_arguments_give_one_line(
    args: list[str], env: dict[str, str], expected: str
) -> None:
    result = subprocess.run(
        [BIN / "nodepool", *args],
        env=_clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert result.stderr.startswith(expected), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_port_in_use(serve_env: dict[str, str]) -> None:
    with socket.socket(socket.AF_INET6) as holder:
        holder.bind(("::", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = dict(serve_env, NODEPOOL_GRPC_PORT=str(port), NODEPOOL_GRPC_HOST="[::]")
        result = subprocess.run(
            [BIN / "nodepool", "serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert "error: NODEPOOL_GRPC_PORT: cannot listen on" in result.stderr
    assert "Traceback" not in result.stderr


def test_scripts_run_starts_a_server_from_nothing(tmp_path: Path) -> None:
    """The README's first command: dev CA, migrated SQLite, mTLS server; health SERVING."""
    port = _free_port()
    dev = tmp_path / "dev"
    env = _clean_env(NODEPOOL_DEV_DIR=str(dev), NODEPOOL_GRPC_PORT=str(port))
    process = subprocess.Popen(
        [ROOT / "scripts" / "run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client = _clean_env(
        NODEPOOL_SERVER=f"localhost:{port}",
        NODEPOOL_CERT=str(dev / "client" / "dev.crt"),
        NODEPOOL_KEY=str(dev / "client" / "dev.key"),
        NODEPOOL_CA=str(dev / "client" / "ca.crt"),
    )
    try:
        _wait_serving(client, process, 120)
        assert (dev / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600
        assert (dev / "client" / "dev.key").stat().st_mode & 0o777 == 0o600
        assert (dev / "data" / "nodepool.db").exists()
        admin_password = dev / "admin-password"
        assert admin_password.stat().st_mode & 0o777 == 0o600
        # The README's next steps: log in as the first administrator and look at yourself.
        as_admin = dict(client, NODEPOOL_HOME=str(tmp_path / "home"))
        login = subprocess.run(
            [BIN / "nodepool", "user", "login", "admin", "--password-file", admin_password],
            env=as_admin,
            capture_output=True,
            text=True,
            check=False,
        )
        assert login.returncode == 0, login.stderr
        assert (tmp_path / "home" / "session.json").stat().st_mode & 0o777 == 0o600
        info = subprocess.run(
            [BIN / "nodepool", "user", "info", "--json"],
            env=as_admin,
            capture_output=True,
            text=True,
            check=False,
        )
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["roles"] == ["admin", "user"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_lets_an_in_flight_call_finish(serve_env: dict[str, str]) -> None:
    """Shutdown stops taking calls but lets the ones already running complete."""
    # An expensive password hash makes LoginUser take about a second.
    env = dict(serve_env, NODEPOOL_PASSWORD_HASH_TIME_COST="20")
    results: list[object] = []
    with subprocess.Popen(
        [BIN / "nodepool", "serve"], env=env, stderr=subprocess.DEVNULL
    ) as process:
        try:
            _wait_serving(env, process, 60)
            with secure_channel(
                env["NODEPOOL_SERVER"],
                cert=env["NODEPOOL_CERT"],
                key=env["NODEPOOL_KEY"],
                ca=env["NODEPOOL_CA"],
            ) as channel:
                stub = user_manager_pb2_grpc.UserManagerStub(channel)
                stub.RegisterUser(
                    user_manager_pb2.RegisterUserRequest(username="slowpoke", password=PASSWORD),
                    timeout=60,
                )

                def login() -> None:
                    try:
                        results.append(
                            stub.LoginUser(
                                user_manager_pb2.LoginUserRequest(
                                    username="slowpoke", password=PASSWORD
                                ),
                                timeout=60,
                            )
                        )
                    except grpc.RpcError as exc:
                        results.append(exc)

                caller = threading.Thread(target=login)
                caller.start()
                time.sleep(0.3)
                process.send_signal(signal.SIGTERM)
                caller.join(timeout=60)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
    assert len(results) == 1
    assert not isinstance(results[0], grpc.RpcError), results[0]
    assert results[0].access_token  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("NODEPOOL_REDIS_URL", "redis://127.0.0.1:1/0", "error: NODEPOOL_REDIS_URL: Redis does"),
        ("NODEPOOL_TRUST_DOMAIN", "other.test", "error: NODEPOOL_TRUST_DOMAIN: 'other.test'"),
        ("NODEPOOL_POLICY_DIR", "/nonexistent", "error: NODEPOOL_POLICY_DIR: cannot load"),
    ],
)
def test_serve_refuses_to_start_half_configured(
    serve_env: dict[str, str], variable: str, value: str, expected: str
) -> None:
    result = subprocess.run(
        [BIN / "nodepool", "serve"],
        env=dict(serve_env, **{variable: value}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines, result.stderr
    assert lines[0].startswith(expected), result.stderr
    assert "Traceback" not in result.stderr
