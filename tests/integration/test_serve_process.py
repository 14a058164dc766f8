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
    assert result.stderr == (
        f"error: NODEPOOL_GRPC_PORT: port {port} is in use on [::] "
        "(another server? choose another port)\n"
    )


def _start_scripts_run(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(
            [ROOT / "scripts" / "run"], env=env, stdout=subprocess.DEVNULL, stderr=sink
        )


def _wait_for_log(log: Path, process: subprocess.Popen[bytes], text: str, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        content = log.read_text()
        if text in content:
            return content
        if process.poll() is not None:
            raise AssertionError(f"scripts/run exited with {process.returncode}: {content}")
        time.sleep(0.3)
    raise AssertionError(f"{text!r} not printed in time: {log.read_text()}")


def _instructions(banner: str) -> list[str]:
    lines = banner.split("In another terminal", 1)[1].splitlines()[1:]
    commands = []
    for line in lines:
        if not line.strip():
            break
        commands.append(line.strip())
    return commands


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_scripts_run_starts_a_server_from_nothing(tmp_path: Path) -> None:
    """The README's first command, then its next lines in a new terminal with no exports.

    On another port than the default, so the instructions must carry it; then the local
    admin commands on the same data; then a restart after the admin password file is lost.
    """
    port = _free_port()
    workdir = tmp_path / "checkout"
    dev = workdir / ".dev"
    user_home = tmp_path / "user-home"  # ~/.nodepool: where the dev context goes
    env = _clean_env(NODEPOOL_DEV_DIR=str(dev), NODEPOOL_GRPC_PORT=str(port), HOME=str(user_home))
    log = tmp_path / "run.log"
    process = _start_scripts_run(env, log)
    try:
        banner = _wait_for_log(log, process, "serving on port", 180)
        assert f"localhost:{port}" in banner
        assert (dev / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600
        assert (dev / "client" / "dev.key").stat().st_mode & 0o777 == 0o600
        assert (dev / "data" / "nodepool.db").exists()
        admin_password = dev / "admin-password"
        assert admin_password.stat().st_mode & 0o777 == 0o600
        assert (user_home / ".nodepool" / "contexts.json").stat().st_mode & 0o777 == 0o600

        # A new terminal: no NODEPOOL_* variable at all. The lines run as printed.
        terminal = _clean_env(HOME=str(user_home))
        commands = _instructions(banner)
        assert commands[0] == ".venv/bin/nodepool health"
        outputs = []
        for command in commands:
            result = subprocess.run(
                ["bash", "-c", command],
                cwd=ROOT,
                env=terminal,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == 0, (command, result.stderr)
            outputs.append(result.stdout)
        assert outputs[0].strip() == "SERVING"
        assert "admin" in outputs[-1]
        session = user_home / ".nodepool" / "sessions" / "dev.json"
        assert session.stat().st_mode & 0o777 == 0o600
        info = subprocess.run(
            [BIN / "nodepool", "user", "info", "--json"],
            env=terminal,
            capture_output=True,
            text=True,
            check=False,
        )
        assert json.loads(info.stdout)["roles"] == ["admin", "user"]

        # Local admin commands, run where scripts/run was, act on its data directory.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        keys_before = set((dev / "data" / "jwt-keys").iterdir())
        for cwd, extra in ((workdir, {}), (elsewhere, {"NODEPOOL_DEV_DIR": str(dev)})):
            rotated = subprocess.run(
                [BIN / "nodepool", "keys", "rotate"],
                cwd=cwd,
                env=dict(terminal, **extra),
                capture_output=True,
                text=True,
                check=False,
            )
            assert rotated.returncode == 0, rotated.stderr
            assert "data directory of scripts/run" in rotated.stderr
        assert len(set((dev / "data" / "jwt-keys").iterdir()) - keys_before) >= 2
        for args in (["keys", "rotate"], ["db", "migrate"], ["user", "reset-password", "admin"]):
            refused = subprocess.run(
                [BIN / "nodepool", *args],
                cwd=elsewhere,
                env=terminal,
                capture_output=True,
                text=True,
                check=False,
            )
            assert refused.returncode == 1
            assert refused.stderr.startswith("error: NODEPOOL_DATA_DIR: not set"), refused.stderr
            assert len(refused.stderr.splitlines()) == 1
        assert not (elsewhere / "nodepool-data").exists()

        # A lost administrator password is reset on the server host; sessions end.
        new_password = tmp_path / "new-password"
        new_password.write_text("a brand new root passphrase\n")
        reset = subprocess.run(
            [BIN / "nodepool", "user", "reset-password", "admin", "--password-file", new_password],
            cwd=workdir,
            env=terminal,
            capture_output=True,
            text=True,
            check=False,
        )
        assert reset.returncode == 0, reset.stderr
        assert "1 session(s) ended" in reset.stderr
        time.sleep(2)  # servers see ended sessions within a second
        ended = subprocess.run(
            [BIN / "nodepool", "user", "info"], env=terminal, capture_output=True, text=True
        )
        assert ended.returncode == 1
        login = subprocess.run(
            [BIN / "nodepool", "user", "login", "admin", "--password-file", new_password],
            env=terminal,
            capture_output=True,
            text=True,
            check=False,
        )
        assert login.returncode == 0, login.stderr
        _stop(process)

        # scripts/run again, with the password file gone: a new password, not a failure.
        admin_password.unlink()
        process = _start_scripts_run(env, log)
        banner = _wait_for_log(log, process, "serving on port", 180)
        assert "has a new password" in banner
        login = subprocess.run(
            [BIN / "nodepool", "user", "login", "admin", "--password-file", admin_password],
            env=terminal,
            capture_output=True,
            text=True,
            check=False,
        )
        assert login.returncode == 0, login.stderr
        _stop(process)
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
        ("NODEPOOL_GRPC_HOST", "no-such-host.invalid", "error: NODEPOOL_GRPC_HOST: cannot resolve"),
        ("NODEPOOL_GRPC_HOST", "192.0.2.7", "error: NODEPOOL_GRPC_HOST: 192.0.2.7 is not an"),
        ("NODEPOOL_TLS_CERT", "/nonexistent/s.crt", "error: NODEPOOL_TLS_CERT: cannot read"),
        ("NODEPOOL_TLS_CERT", "/etc/hostname", "error: NODEPOOL_TLS_CERT: /etc/hostname is not"),
        ("NODEPOOL_TLS_KEY", "/etc/hostname", "error: NODEPOOL_TLS_KEY: /etc/hostname is not a"),
        ("NODEPOOL_PKI_DIR", "/nonexistent", "error: NODEPOOL_PKI_DIR: /nonexistent is not a dir"),
        ("NODEPOOL_PKI_DIR", "/etc", "error: NODEPOOL_PKI_DIR: /etc is not a CA directory"),
        ("NODEPOOL_DATA_DIR", "/proc/nodepool", "error: NODEPOOL_DATA_DIR: cannot create"),
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
    assert result.stderr.startswith(expected), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    if variable != "NODEPOOL_POLICY_DIR":  # the policy is loaded after the database opens
        # Checked before anything is created or migrated.
        assert not (Path(serve_env["NODEPOOL_DATA_DIR"]) / "nodepool.db").exists()


def test_a_key_of_another_certificate_stops_start_up(
    serve_env: dict[str, str], client_cert: Any
) -> None:
    result = subprocess.run(
        [BIN / "nodepool", "serve"],
        env=dict(serve_env, NODEPOOL_TLS_KEY=str(client_cert.key_path)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"error: NODEPOOL_TLS_KEY: {client_cert.key_path} is not the key of the certificate "
        f"{serve_env['NODEPOOL_TLS_CERT']}\n"
    )
