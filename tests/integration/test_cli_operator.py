"""The ``nodepool`` CLI as an operator meets it: the real command against a real server.

Contexts, one-line errors that say what to do, session files on disk, stable ``--json``,
tables, colours, exit codes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cli_helpers import (
    NODEPOOL,
    Pool,
    clean_env,
    free_port,
    nodepool,
    one_error_line,
    serve_pool,
)

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with serve_pool(tmp_path_factory.mktemp("cli-pool")) as served:
        env = served.env(NODEPOOL_PASSWORD=PASSWORD)
        for name in ("alice", "bob"):
            result = nodepool("user", "register", name, env=env)
            assert result.returncode == 0, result.stderr
        yield served


def _context_env(pool: Pool, home: Path, **extra: str | Path) -> dict[str, str]:
    """A terminal with no NODEPOOL_* exports but NODEPOOL_HOME (and what a test adds)."""
    return clean_env(NODEPOOL_HOME=home, **extra)


def _add_context(pool: Pool, home: Path, name: str, *extra: str, server: str = "") -> None:
    result = nodepool(
        "context", "add", name,
        "--server", server or pool.target,
        "--cert", pool.client.cert_path,
        "--key", pool.client.key_path,
        "--ca", pool.client.ca_path,
        *extra,
        env=_context_env(pool, home),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


# -- 1. contexts -------------------------------------------------------------------------------


def test_contexts_add_use_list_remove(pool: Pool, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = _context_env(pool, home)
    empty = nodepool("context", "list", "--json", env=env)
    assert json.loads(empty.stdout) == {"current": None, "contexts": []}

    _add_context(pool, home, "prod")
    _add_context(pool, home, "staging", server="localhost")
    assert (home / "contexts.json").stat().st_mode & 0o777 == 0o600
    listed = json.loads(nodepool("context", "list", "--json", env=env).stdout)
    assert listed["current"] == "prod"  # the first one added
    by_name = {c["name"]: c for c in listed["contexts"]}
    assert by_name["staging"]["server"] == "localhost:50051"  # no port means 50051
    assert by_name["prod"]["current"] is True
    assert by_name["prod"]["logged_in_as"] is None
    assert by_name["prod"]["cert"] == str(pool.client.cert_path)

    health = nodepool("health", env=env)
    assert health.returncode == 0, health.stderr
    assert health.stdout.strip() == "SERVING"

    assert nodepool("context", "use", "staging", env=env).returncode == 0
    refused = nodepool("health", env=env)
    assert "localhost:50051" in one_error_line(refused)

    again = nodepool("context", "add", "prod", "--server", "x", "--cert", "a", "--key", "b",
                     "--ca", "c", env=env)  # fmt: skip
    assert "cert: cannot read" in one_error_line(again)
    duplicate = nodepool(
        "context", "add", "prod", "--server", pool.target, "--cert", pool.client.cert_path,
        "--key", pool.client.key_path, "--ca", pool.client.ca_path, env=env,
    )  # fmt: skip
    assert "exists (use --replace" in one_error_line(duplicate)

    assert nodepool("context", "remove", "staging", env=env).returncode == 0
    listed = json.loads(nodepool("context", "list", "--json", env=env).stdout)
    assert listed == {"current": None, "contexts": [dict(by_name["prod"], current=False)]}
    missing = nodepool("context", "use", "staging", env=env)
    assert "context 'staging' does not exist" in one_error_line(missing)
    table = nodepool("context", "list", env=env)
    assert "prod" in table.stdout
    assert pool.target in table.stdout


def test_flags_beat_environment_beat_the_context(pool: Pool, tmp_path: Path) -> None:
    home = tmp_path / "home"
    dead = f"localhost:{free_port()}"
    _add_context(pool, home, "broken", server=dead)
    env = _context_env(pool, home)
    assert dead in one_error_line(nodepool("health", env=env))
    from_env = dict(env, NODEPOOL_SERVER=pool.target)
    assert nodepool("health", env=from_env).returncode == 0
    wrong_env = dict(env, NODEPOOL_SERVER=dead)
    assert nodepool("health", "--server", pool.target, env=wrong_env).returncode == 0
    # Only the setting given is overridden; the files still come from the context.
    bad_ca = dict(env, NODEPOOL_SERVER=pool.target, NODEPOOL_CA=str(pool.client.cert_path))
    assert "does not vouch for" in one_error_line(nodepool("health", env=bad_ca))
    # --context and NODEPOOL_CONTEXT pick another context for one command.
    _add_context(pool, home, "good")
    assert nodepool("--context", "good", "health", env=env).returncode == 0
    assert nodepool("health", env=dict(env, NODEPOOL_CONTEXT="good")).returncode == 0
    unknown = nodepool("--context", "nope", "health", env=env)
    assert "context 'nope' (from --context) does not exist" in one_error_line(unknown)


def test_sessions_are_kept_per_context(pool: Pool, tmp_path: Path) -> None:
    home = tmp_path / "home"
    _add_context(pool, home, "one")
    _add_context(pool, home, "two")
    env = _context_env(pool, home, NODEPOOL_PASSWORD=PASSWORD)
    for context, name in (("one", "alice"), ("two", "bob")):
        login = nodepool("--context", context, "user", "login", name, env=env)
        assert login.returncode == 0, login.stderr
        assert f"(context {context})" in login.stderr
    assert (home / "sessions" / "one.json").stat().st_mode & 0o777 == 0o600
    for context, name in (("one", "alice"), ("two", "bob")):
        info = nodepool("--context", context, "user", "info", "--json", env=env)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["username"] == name
    listed = json.loads(nodepool("context", "list", "--json", env=env).stdout)
    assert {c["name"]: c["logged_in_as"] for c in listed["contexts"]} == {
        "one": "alice",
        "two": "bob",
    }
    assert nodepool("--context", "two", "user", "logout", env=env).returncode == 0
    # Logging out of one pool leaves the other logged in.
    assert nodepool("--context", "one", "user", "info", env=env).returncode == 0
    after = nodepool("--context", "two", "user", "info", env=env)
    assert "not logged in to context 'two'" in one_error_line(after)


# -- 3. errors that say what to do -------------------------------------------------------------


def test_garbage_certificate_is_one_line_naming_the_file(pool: Pool, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("this is not a certificate\n")
    line = one_error_line(nodepool("health", "--cert", garbage, env=pool.env()))
    assert line == f"error: cert: {garbage} is not a PEM certificate"
    assert str(garbage) in one_error_line(nodepool("health", "--key", garbage, env=pool.env()))
    assert "is a directory" in one_error_line(nodepool("health", "--ca", tmp_path, env=pool.env()))
    unreadable = one_error_line(nodepool("health", "--cert", tmp_path / "no.crt", env=pool.env()))
    assert (
        unreadable == f"error: cert: cannot read {tmp_path / 'no.crt'} (No such file or directory)"
    )


def test_a_key_of_another_certificate_is_named(pool: Pool, tmp_path: Path) -> None:
    other = pool.ca.issue("client", "someone-else", tmp_path)
    line = one_error_line(nodepool("health", "--key", other.key_path, env=pool.env()))
    assert f"key: {other.key_path} is not the key of the certificate" in line


def test_connection_failures_name_the_likely_cause(
    pool: Pool, foreign_client_cert: object, tmp_path: Path
) -> None:
    env = pool.env()
    dead = f"127.0.0.1:{free_port()}"
    assert f"nothing answers at {dead}" in one_error_line(
        nodepool("health", "--server", dead, env=env)
    )
    no_port = one_error_line(nodepool("health", "--server", "127.0.0.1", "--timeout", "3", env=env))
    assert "127.0.0.1:50051" in no_port
    foreign = one_error_line(
        nodepool(
            "health",
            "--cert",
            foreign_client_cert.cert_path,  # type: ignore[attr-defined]
            "--key",
            foreign_client_cert.key_path,  # type: ignore[attr-defined]
            env=env,
        )
    )
    assert "refused the TLS handshake" in foreign
    assert "another CA" in foreign
    wrong_ca = one_error_line(
        nodepool("health", "--ca", foreign_client_cert.ca_path, env=env)  # type: ignore[attr-defined]
    )
    assert "does not vouch for" in wrong_ca
    assert "wrong --ca" in wrong_ca
    by_ip = one_error_line(nodepool("health", "--server", f"127.0.0.2:{pool.port}", env=env))
    assert "does not name the host" in by_ip
    resolve = one_error_line(nodepool("health", "--server", "no-such-host.invalid", env=env))
    assert "cannot resolve the host" in resolve
    # A revoked certificate: refused on the first call.
    revoked = pool.ca.issue("client", "stolen-laptop", tmp_path)
    pool.ca.revoke(serial=revoked.serial, reason="keyCompromise", actor="test")
    time.sleep(1)
    line = one_error_line(
        nodepool(
            "user",
            "info",
            "--cert",
            revoked.cert_path,
            "--key",
            revoked.key_path,
            env=dict(env, NODEPOOL_API_KEY="np_unused"),
        )
    )
    assert "has been revoked" in line
    assert str(revoked.cert_path) in line


def test_a_normal_start_logs_no_alembic_or_grpc_core_lines(pool: Pool) -> None:
    log = pool.log.read_text()
    assert "serving on port" in log
    assert "alembic" not in log
    assert "ssl_transport_security" not in log


# -- 5. output for people and for scripts --------------------------------------------------


@pytest.fixture(scope="module")
def admin_env(pool: Pool, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("admin-home")
    env = pool.env(NODEPOOL_HOME=home, NODEPOOL_PASSWORD=PASSWORD)
    created = nodepool(
        "user", "create-admin", "root-admin", env=dict(pool.server_env, NODEPOOL_PASSWORD=PASSWORD)
    )
    assert created.returncode == 0, created.stderr
    login = nodepool("user", "login", "root-admin", env=env)
    assert login.returncode == 0, login.stderr
    return env


def test_read_commands_give_stable_json(pool: Pool, admin_env: dict[str, str]) -> None:
    info = json.loads(nodepool("user", "info", "--json", env=admin_env).stdout)
    assert info["email"] is None  # absent: null, not missing
    assert set(info) == {"username", "email", "roles", "is_active", "created_at", "last_login"}
    keys = nodepool("apikey", "list", "--json", env=admin_env)
    assert json.loads(keys.stdout) == {"api_keys": []}  # empty: [], never a missing key
    health = json.loads(nodepool("health", "--json", env=admin_env).stdout)
    assert health == {"server": pool.target, "context": None, "status": "SERVING"}

    for _ in range(3):
        nodepool("user", "info", env=admin_env)
    time.sleep(1.5)  # the audit trail is written behind, every half second
    first = json.loads(nodepool("audit", "list", "--limit", "2", "--json", env=admin_env).stdout)
    assert set(first) == {"events", "next_page_token"}
    assert len(first["events"]) == 2
    assert first["next_page_token"]
    assert isinstance(first["events"][0]["id"], int)
    second = json.loads(
        nodepool(
            "audit",
            "list",
            "--limit",
            "2",
            "--page-token",
            first["next_page_token"],
            "--json",
            env=admin_env,
        ).stdout
    )
    assert first["events"][-1]["id"] > second["events"][0]["id"]
    everything = json.loads(
        nodepool("audit", "list", "--limit", "2", "--all", "--json", env=admin_env).stdout
    )
    assert everything["next_page_token"] is None
    assert len(everything["events"]) > 4
    nothing = json.loads(
        nodepool("audit", "list", "--user", "nobody-at-all", "--json", env=admin_env).stdout
    )
    assert nothing == {"events": [], "next_page_token": None}


def test_audit_method_filter_takes_the_name_the_table_shows(admin_env: dict[str, str]) -> None:
    result = nodepool("audit", "list", "--method", "LoginUser", "--json", env=admin_env)
    assert result.returncode == 0, result.stderr
    events = json.loads(result.stdout)["events"]
    assert events
    assert {e["method"] for e in events} == {"/nodepool.v1.UserManager/LoginUser"}
    table = nodepool("audit", "list", "--method", "UserManager/LoginUser", env=admin_env)
    assert "LoginUser" in table.stdout
    assert "GetUserInfo" not in table.stdout
    bogus = nodepool("audit", "list", "--method", "Nope", env=admin_env)
    assert "not a method of Node Pool" in one_error_line(bogus)
    helptext = nodepool("audit", "list", "--help", env=admin_env).stdout
    for explained in (
        "only calls made as this user",
        "as the table shows it",
        "refused by a check",
        "next_page_token",
    ):
        assert explained in " ".join(helptext.split())


def test_tables_keep_ids_whole_and_colour_statuses(admin_env: dict[str, str]) -> None:
    created = nodepool("apikey", "create", "a-rather-long-key-name-for-ci", "--json", env=admin_env)
    key_id = json.loads(created.stdout)["api_key"]["key_id"]
    narrow = nodepool("apikey", "list", env=dict(admin_env, COLUMNS="50"))
    assert "…" not in narrow.stdout
    wide = nodepool("apikey", "list", "--wide", env=dict(admin_env, COLUMNS="50"))
    assert key_id in wide.stdout
    coloured = nodepool("apikey", "list", env=dict(admin_env, FORCE_COLOR="1"))
    assert "\x1b[32mactive" in coloured.stdout
    plain = nodepool("apikey", "list", env=admin_env)
    assert "\x1b[" not in plain.stdout
    health = nodepool("health", env=dict(admin_env, FORCE_COLOR="1"))
    assert "\x1b[32mSERVING" in health.stdout


def test_versions() -> None:
    for command, name in (("nodepool", "nodepool"), ("nodepool-pki", "nodepool-pki")):
        result = subprocess.run(
            [NODEPOOL.parent / command, "--version"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{name}, version 0.1.0")


def test_update_with_nothing_to_change_says_so(admin_env: dict[str, str]) -> None:
    result = nodepool("user", "update", env=admin_env)
    assert result.returncode == 2
    assert "nothing to change" in one_error_line(result)


def test_ctrl_c_at_a_prompt_exits_130(pool: Pool) -> None:
    env = pool.env()
    with subprocess.Popen(
        [NODEPOOL, "user", "login", "alice"],
        env=env,
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as process:
        assert process.stderr is not None
        os.set_blocking(process.stderr.fileno(), False)
        seen = b""
        deadline = time.monotonic() + 30
        while b"Password" not in seen and time.monotonic() < deadline:
            seen += process.stderr.read() or b""
            time.sleep(0.05)
        assert b"Password" in seen
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
        os.set_blocking(process.stderr.fileno(), True)
        assert b"error: interrupted" in seen + process.stderr.read()


# -- 6. session files --------------------------------------------------------------------------


def _session_env(pool: Pool, home: Path) -> dict[str, str]:
    return pool.env(NODEPOOL_HOME=home)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "is damaged; remove it and log in again"),
        ('["a", "list"]', "is damaged"),
        ('{"server": 1, "username": 2}', "is damaged"),
        (
            json.dumps(
                dict.fromkeys(
                    (
                        "server",
                        "username",
                        "access_token",
                        "access_expires_at",
                        "refresh_token",
                        "refresh_expires_at",
                    ),
                    "x",
                )
            ),
            "is damaged",
        ),
    ],
)
def test_a_damaged_session_file_has_its_own_message(
    pool: Pool, tmp_path: Path, content: str, expected: str
) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    session = home / "session.json"
    session.write_text(content)
    session.chmod(0o600)
    line = one_error_line(nodepool("user", "info", env=_session_env(pool, home)))
    assert f"session file {session} {expected}" in line


def test_a_session_file_others_can_read_is_refused(pool: Pool, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = dict(_session_env(pool, home), NODEPOOL_PASSWORD=PASSWORD)
    assert nodepool("user", "login", "alice", env=env).returncode == 0
    session = home / "session.json"
    session.chmod(0o644)
    line = one_error_line(nodepool("user", "info", env=env))
    assert f"session file {session} is accessible by others (mode 0644)" in line
    assert f"chmod 600 {session}" in line
    session.chmod(0o600)
    assert nodepool("user", "info", env=env).returncode == 0


def test_a_session_path_that_is_not_a_file_is_named(pool: Pool, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "session.json").mkdir(parents=True)
    line = one_error_line(nodepool("user", "info", env=_session_env(pool, home)))
    assert "is not a regular file" in line or "cannot read it" in line
