"""Running the real ``nodepool`` CLI against a real ``nodepool serve`` process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pki import CertificateAuthority, IssuedCertificate

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NODEPOOL = BIN / "nodepool"
TRUST_DOMAIN = "nodepool.test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env(**extra: str | Path) -> dict[str, str]:
    """This process's environment without any NODEPOOL_* or gRPC logging variable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("NODEPOOL_", "GRPC_")) and k not in ("COLUMNS", "FORCE_COLOR")
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def nodepool(
    *args: str | Path,
    env: Mapping[str, str],
    input: str | None = None,
    timeout: float = 60,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NODEPOOL), *(str(a) for a in args)],
        env=dict(env),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


def wait_serving(env: Mapping[str, str], process: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early with {process.returncode}")
        health = nodepool("health", "--timeout", "2", env=env)
        if health.returncode == 0 and health.stdout.strip() == "SERVING":
            return
        last = health.stderr.strip()
        time.sleep(0.3)
    raise AssertionError(f"server not serving in time: {last}")


@dataclass
class Pool:
    """A served pool with its own CA, and a client environment to reach it."""

    ca: CertificateAuthority
    server_env: dict[str, str]
    client_env: dict[str, str]
    client: IssuedCertificate
    port: int
    log: Path
    home: Path

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    def env(self, **extra: str | Path) -> dict[str, str]:
        return dict(self.client_env, **{k: str(v) for k, v in extra.items()})


@contextmanager
def serve_pool(directory: Path) -> Iterator[Pool]:
    """Its own CA (tests here revoke certificates), a server process, a client certificate."""
    with CertificateAuthority.init(directory / "ca", trust_domain=TRUST_DOMAIN) as ca:
        server = ca.issue(
            "server",
            "server",
            directory / "server",
            dns_names=["localhost"],
            ip_addresses=["127.0.0.1", "::1"],
        )
        client = ca.issue("client", "operator-laptop", directory / "client")
        port = free_port()
        server_env = clean_env(
            NODEPOOL_GRPC_PORT=str(port),
            NODEPOOL_GRPC_HOST="[::]",
            NODEPOOL_DATA_DIR=directory / "data",
            NODEPOOL_TRUST_DOMAIN=TRUST_DOMAIN,
            NODEPOOL_PKI_DIR=ca.directory,
            NODEPOOL_TLS_CERT=server.cert_path,
            NODEPOOL_TLS_KEY=server.key_path,
            NODEPOOL_TLS_CA=server.ca_path,
            NODEPOOL_PASSWORD_HASH_TIME_COST="1",
            NODEPOOL_PASSWORD_HASH_MEMORY_KIB="1024",
            NODEPOOL_REGISTRATIONS_PER_PEER_PER_MINUTE="10000",
            NODEPOOL_LOGIN_ATTEMPTS_PER_PEER_PER_MINUTE="10000",
            NODEPOOL_LOGIN_ATTEMPTS_PER_USER_PER_MINUTE="10000",
        )
        home = directory / "home"
        client_env = clean_env(
            NODEPOOL_HOME=home,
            NODEPOOL_SERVER=f"localhost:{port}",
            NODEPOOL_CERT=client.cert_path,
            NODEPOOL_KEY=client.key_path,
            NODEPOOL_CA=client.ca_path,
        )
        log = directory / "server.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [NODEPOOL, "serve"], env=server_env, stderr=sink, stdout=sink
            )
        try:
            wait_serving(client_env, process, 120)
            yield Pool(ca, server_env, client_env, client, port, log, home)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``error: ...`` line a failed command must print, and nothing else."""
    assert result.returncode != 0, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]
