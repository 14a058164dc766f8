"""``nodepool task submit|status|cancel|list`` as a user runs them: the real CLI, a real
server over mTLS, and a real ``nodepool worker`` producing the results."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.accounts import Pool, start_pool
from tests.fixtures.server import PASSWORD
from tests.fixtures.tasks import workers

BIN = Path(sys.executable).parent


@dataclass
class Cli:
    env: dict[str, str]

    def run(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        raw = subprocess.run(
            [BIN / "nodepool", *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            timeout=120,
            check=False,
        )
        return subprocess.CompletedProcess(
            raw.args, raw.returncode, raw.stdout.decode(), raw.stderr.decode()
        )

    def ok(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        return result


@dataclass
class Setup:
    pool: Pool
    alice: Cli
    bob: Cli
    admin: Cli
    alice_name: str


def _cli(pool: Pool, home: Path, username: str, password: str) -> Cli:
    cert = pool.client_cert
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODEPOOL_")}
    env.update(
        NODEPOOL_SERVER=pool.server.target,
        NODEPOOL_CERT=str(cert.cert_path),
        NODEPOOL_KEY=str(cert.key_path),
        NODEPOOL_CA=str(cert.ca_path),
        NODEPOOL_HOME=str(home),
        NODEPOOL_PASSWORD=password,
        COLUMNS="200",
    )
    cli = Cli(env)
    cli.ok("user", "login", username)
    return cli


@pytest.fixture(scope="module")
def setup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki_ca: Any
) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("cli-tasks")
    with start_pool(request, base, "memory") as pool:
        alice = pool.new_user("alice")
        bob = pool.new_user("bob")
        with workers(pool.server.target, pki_ca, base, alice.username):
            yield Setup(
                pool,
                _cli(pool, base / "alice", alice.username, PASSWORD),
                _cli(pool, base / "bob", bob.username, PASSWORD),
                _cli(pool, base / "admin", pool.admin.username, pool.admin.password),
                alice.username,
            )


def test_submit_wait_prints_the_result_on_stdout(setup: Setup) -> None:
    result = setup.alice.ok("task", "submit", "echo", "--payload", "hello pool", "--wait")
    assert result.stdout == "hello pool\n"
    assert "submitted task" in result.stderr
    assert "completed" in result.stderr


def test_submit_prints_the_full_id_and_status_waits_for_it(setup: Setup, tmp_path: Path) -> None:
    payload = tmp_path / "in.bin"
    payload.write_bytes(b"abc")
    submitted = setup.alice.ok(
        "task",
        "submit",
        "sha256",
        "--payload-file",
        str(payload),
        "--cpu",
        "1",
        "--priority",
        "5",
        "--timeout",
        "2m",
        "--max-attempts",
        "2",
    )
    task_id = submitted.stdout.strip()
    assert len(task_id) == 32, submitted.stdout
    waited = setup.alice.ok("task", "status", task_id, "--wait", "--json")
    data = json.loads(waited.stdout)
    assert data["task_id"] == task_id
    assert data["status"] == "completed"
    assert data["priority"] == 5
    assert data["timeout_seconds"] == 120
    assert data["max_attempts"] == 2
    assert base64.b64decode(data["result"]) == hashlib.sha256(b"abc").hexdigest().encode()
    # The table for people never shortens the id.
    shown = setup.alice.ok("task", "status", task_id)
    assert task_id in shown.stderr
    listed = setup.alice.ok("task", "list")
    assert task_id in listed.stdout


def test_binary_results_are_shown_as_base64_with_a_note(setup: Setup) -> None:
    result = setup.alice.ok(
        "task", "submit", "echo", "--payload-file", "-", "--wait", stdin=b"\xff\xfe\x00"
    )
    assert result.stdout.strip() == "//4A"
    assert "binary" in result.stderr


def test_cancel_and_list_filters(setup: Setup) -> None:
    long = setup.alice.ok("task", "submit", "sleep", "--payload", "300").stdout.strip()
    # Bob may not see or cancel it: the same answer as for a task that does not exist.
    for args in (("task", "status", long), ("task", "cancel", long)):
        refused = setup.bob.run(*args)
        assert refused.returncode == 1
        assert refused.stderr.startswith("error: NOT_FOUND: no such task"), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    cancelled = setup.alice.ok("task", "cancel", long, "--json")
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    again = setup.alice.run("task", "cancel", long)
    assert again.returncode == 1
    assert again.stderr.startswith("error: FAILED_PRECONDITION")
    mine = json.loads(setup.alice.ok("task", "list", "--status", "cancelled", "--json").stdout)
    assert long in [t["task_id"] for t in mine["tasks"]]
    assert all(t["status"] == "cancelled" for t in mine["tasks"])
    assert json.loads(setup.bob.ok("task", "list", "--json").stdout)["tasks"] == []
    # An admin sees everyone's, and may narrow to one owner; a user may not ask for others'.
    everyone = json.loads(
        setup.admin.ok("task", "list", "--all", "--owner", setup.alice_name, "--json").stdout
    )
    assert long in [t["task_id"] for t in everyone["tasks"]]
    denied = setup.bob.run("task", "list", "--owner", setup.alice_name)
    assert denied.returncode == 1
    assert denied.stderr.startswith("error: PERMISSION_DENIED")


def test_bad_input_gives_one_line(setup: Setup) -> None:
    cases = [
        (("task", "submit", "rm-rf"), "error: INVALID_ARGUMENT: unknown task type"),
        (("task", "submit", "echo", "--label", "novalue"), "error: Invalid value for '--label'"),
        (("task", "submit", "echo", "--timeout", "soon"), "error: Invalid value for '--timeout'"),
        (("task", "submit", "echo", "--payload", "a", "--payload-file", "x"), "error: give"),
        (("task", "status", "nope"), "error: NOT_FOUND"),
    ]
    for args, expected in cases:
        result = setup.alice.run(*args)
        assert result.returncode != 0
        assert result.stderr.startswith(expected), (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
