"""nodepool-pki: commands, output shapes, secrets handling, and one-line errors."""

from __future__ import annotations

import getpass
import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import pytest

from pki import CertificateAuthority
from pki.cli import cli, main

TD = "nodepool.test"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "NODEPOOL_PKI_DIR",
        "NODEPOOL_CA_PASSPHRASE",
        "NODEPOOL_CA_PASSPHRASE_FILE",
        "NODEPOOL_PKI_DEBUG",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def ca_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    # A space and a '#' make sure paths reach SQLite intact.
    directory = tmp_path / "my ca#1"
    assert main(["init", "--dir", str(directory), "--trust-domain", TD]) == 0
    capsys.readouterr()
    return directory


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def listing(capsys: pytest.CaptureFixture[str], ca_dir: Path) -> list[dict[str, object]]:
    status, out, _ = run(capsys, "list", "--dir", ca_dir, "--json")
    assert status == 0
    result: list[dict[str, object]] = json.loads(out)
    return result


def assert_one_line_error(err: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- happy paths -----------------------------------------------------------------------------


def test_init(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, err = run(capsys, "init", "--dir", tmp_path / "ca")
    assert status == 0
    assert "spiffe://nodepool.local" in out
    assert "not encrypted" in err
    assert mode(tmp_path / "ca") == 0o700
    assert mode(tmp_path / "ca" / "ca.key") == 0o600
    with CertificateAuthority.open(tmp_path / "ca") as ca:
        assert ca.trust_domain == "nodepool.local"


def test_issue_each_kind(capsys: pytest.CaptureFixture[str], ca_dir: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    commands = [
        ["server", "api", "--dns", "localhost", "--ip", "127.0.0.1", "--ip", "::1"],
        ["node", "node-a", "--owner", "alice", "--days", "2"],
        ["client", "alice-laptop"],
    ]
    for command in commands:
        status, out, _ = run(capsys, "issue", *command, "--dir", ca_dir, "--out", out_dir)
        assert status == 0
        assert f"spiffe://{TD}/{command[0]}/{command[1]}" in out
    assert mode(out_dir) == 0o700
    for name in ("api", "node-a", "alice-laptop"):
        assert mode(out_dir / f"{name}.key") == 0o600
        assert (out_dir / f"{name}.crt").is_file()
    assert (out_dir / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()
    [node] = [row for row in listing(capsys, ca_dir) if row["kind"] == "node"]
    assert node["owner"] == "alice"
    not_after = datetime.fromisoformat(str(node["not_after"]))
    assert timedelta(days=1) < not_after - datetime.now(UTC) <= timedelta(days=2)


def test_dir_from_environment(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    ca_dir: Path,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("NODEPOOL_PKI_DIR", str(ca_dir))
    status, _, _ = run(capsys, "issue", "client", "c1", "--out", tmp_path / "out")
    assert status == 0
    assert [row["name"] for row in listing(capsys, ca_dir)] == ["c1"]


def test_list_json_shape_and_statuses(
    capsys: pytest.CaptureFixture[str], ca_dir: Path, tmp_path: Path
) -> None:
    run(capsys, "issue", "client", "good", "--dir", ca_dir, "--out", tmp_path)
    run(capsys, "issue", "node", "gone", "--owner", "bob", "--dir", ca_dir, "--out", tmp_path)
    with CertificateAuthority.open(ca_dir) as ca:
        ca.issue(
            "client",
            "old",
            tmp_path,
            not_before=datetime.now(UTC) - timedelta(days=3),
            lifetime=timedelta(days=1),
        )
    assert run(capsys, "revoke", "gone", "--dir", ca_dir, "--reason", "key_compromise")[0] == 0

    rows = listing(capsys, ca_dir)
    assert [list(row) for row in rows] == [
        [
            "kind",
            "name",
            "owner",
            "serial",
            "spiffe_id",
            "not_before",
            "not_after",
            "status",
            "revoked_at",
            "revocation_reason",
        ]
    ] * 3
    by_name = {row["name"]: row for row in rows}
    assert {name: row["status"] for name, row in by_name.items()} == {
        "good": "valid",
        "gone": "revoked",
        "old": "expired",
    }
    gone = by_name["gone"]
    assert gone["revocation_reason"] == "keyCompromise"
    assert gone["spiffe_id"] == f"spiffe://{TD}/node/gone"
    assert by_name["good"]["revoked_at"] is None
    for row in rows:
        for key in ("not_before", "not_after"):
            assert str(row[key]).endswith("Z")
            datetime.fromisoformat(str(row[key]))
        int(str(row["serial"]), 16)
    assert str(gone["revoked_at"]).endswith("Z")


def test_list_table(capsys: pytest.CaptureFixture[str], ca_dir: Path, tmp_path: Path) -> None:
    run(capsys, "issue", "node", "node-a", "--owner", "alice", "--dir", ca_dir, "--out", tmp_path)
    status, out, _ = run(capsys, "list", "--dir", ca_dir)
    assert status == 0
    for text in ("kind", "status", "node-a", "alice", "valid"):
        assert text in out
    serial = listing(capsys, ca_dir)[0]["serial"]
    assert str(serial) in out


def test_list_empty(capsys: pytest.CaptureFixture[str], ca_dir: Path) -> None:
    assert listing(capsys, ca_dir) == []
    status, out, err = run(capsys, "list", "--dir", ca_dir)
    assert (status, out) == (0, "")
    assert "no certificates" in err


def test_revoke_by_serial_records_actor(
    capsys: pytest.CaptureFixture[str], ca_dir: Path, tmp_path: Path
) -> None:
    run(capsys, "issue", "client", "c1", "--dir", ca_dir, "--out", tmp_path)
    serial = str(listing(capsys, ca_dir)[0]["serial"])
    colon_form = ":".join(serial.upper()[i : i + 2] for i in range(0, len(serial), 2))
    status, out, _ = run(capsys, "revoke", "--serial", colon_form, "--dir", ca_dir)
    assert status == 0
    assert "revoked client certificate c1" in out
    with CertificateAuthority.open(ca_dir) as ca:
        [record] = ca.list_certificates()
    assert record.revoked_by == getpass.getuser()
    assert record.revocation_reason == "unspecified"


def test_revoke_twice_is_harmless(
    capsys: pytest.CaptureFixture[str], ca_dir: Path, tmp_path: Path
) -> None:
    run(capsys, "issue", "client", "c1", "--dir", ca_dir, "--out", tmp_path)
    assert run(capsys, "revoke", "c1", "--dir", ca_dir)[0] == 0
    status, out, err = run(capsys, "revoke", "c1", "--dir", ca_dir, "--reason", "superseded")
    assert status == 0
    assert out == ""
    assert "already revoked" in err
    assert listing(capsys, ca_dir)[0]["revocation_reason"] == "unspecified"


def test_reissue_needs_flag(
    capsys: pytest.CaptureFixture[str], ca_dir: Path, tmp_path: Path
) -> None:
    issue: list[str | Path] = ["issue", "node", "n1", "--owner", "alice"]
    issue += ["--dir", ca_dir, "--out", tmp_path]
    assert run(capsys, *issue)[0] == 0
    status, _, err = run(capsys, *issue)
    assert status == 1
    assert_one_line_error(err)
    assert "--allow-reissue" in err
    run(capsys, "revoke", "n1", "--dir", ca_dir)
    status, _, err = run(capsys, *issue)
    assert status == 1
    assert "revoked" in err
    assert run(capsys, *issue, "--allow-reissue")[0] == 0
    assert [row["status"] for row in listing(capsys, ca_dir)] == ["revoked", "valid"]


def test_crl(capsys: pytest.CaptureFixture[str], ca_dir: Path, tmp_path: Path) -> None:
    run(capsys, "issue", "client", "c1", "--dir", ca_dir, "--out", tmp_path)
    run(capsys, "revoke", "c1", "--dir", ca_dir)
    status, _, _ = run(capsys, "crl", "--dir", ca_dir, "--out", tmp_path / "crl.pem", "--days", "3")
    assert status == 0
    assert (tmp_path / "crl.pem").read_bytes().startswith(b"-----BEGIN X509 CRL-----")


# -- secrets ---------------------------------------------------------------------------------


def test_no_option_takes_a_secret_value() -> None:
    def options(command: click.Command) -> list[click.Option]:
        found = [p for p in command.params if isinstance(p, click.Option)]
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                found += options(sub)
        return found

    every = options(cli)
    assert any(o.name == "passphrase_file" for o in every)
    secret_words = ("pass", "secret", "password", "token", "key")
    for option in every:
        spelled = " ".join(option.opts + option.secondary_opts).lower()
        if any(word in spelled for word in secret_words):
            assert option.opts == ["--passphrase-file"], option.opts
            assert isinstance(option.type, click.Path)
        assert option.envvar is None or "PASS" not in str(option.envvar)


def test_passphrase_from_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    directory = tmp_path / "ca"
    monkeypatch.setenv("NODEPOOL_CA_PASSPHRASE", "s3cret phrase")
    status, _, err = run(capsys, "init", "--dir", directory)
    assert status == 0
    assert "not encrypted" not in err
    assert b"ENCRYPTED PRIVATE KEY" in (directory / "ca.key").read_bytes()
    assert run(capsys, "issue", "client", "c1", "--dir", directory, "--out", tmp_path)[0] == 0

    monkeypatch.setenv("NODEPOOL_CA_PASSPHRASE", "wrong")
    status, _, err = run(capsys, "issue", "client", "c2", "--dir", directory, "--out", tmp_path)
    assert status == 1
    assert_one_line_error(err)
    assert "wrong CA passphrase" in err

    monkeypatch.delenv("NODEPOOL_CA_PASSPHRASE")
    status, _, err = run(capsys, "crl", "--dir", directory, "--out", tmp_path / "crl.pem")
    assert status == 1
    assert_one_line_error(err)
    assert "encrypted" in err
    # Listing and revoking need no passphrase.
    assert run(capsys, "revoke", "c1", "--dir", directory)[0] == 0
    assert listing(capsys, directory)[0]["status"] == "revoked"


def test_passphrase_from_files(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    directory = tmp_path / "ca"
    secret = tmp_path / "passphrase"
    secret.write_text("from a file\n")
    assert run(capsys, "init", "--dir", directory, "--passphrase-file", secret)[0] == 0
    with CertificateAuthority.open(directory, b"from a file") as ca:
        assert ca.signing_key is not None

    monkeypatch.setenv("NODEPOOL_CA_PASSPHRASE_FILE", str(secret))
    monkeypatch.setenv("NODEPOOL_CA_PASSPHRASE", "ignored: the file wins")
    assert run(capsys, "issue", "client", "c1", "--dir", directory, "--out", tmp_path)[0] == 0

    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    status, _, err = run(
        capsys, "crl", "--dir", directory, "--out", tmp_path / "c.pem", "--passphrase-file", wrong
    )
    assert status == 1
    assert_one_line_error(err)

    empty = tmp_path / "empty"
    empty.write_text("\n")
    monkeypatch.setenv("NODEPOOL_CA_PASSPHRASE_FILE", str(empty))
    status, _, err = run(capsys, "crl", "--dir", directory, "--out", tmp_path / "c.pem")
    assert status == 1
    assert "empty" in err


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "status", "text"),
    [
        ([], 2, "missing command"),
        (["issue"], 2, "missing command"),
        (["frobnicate"], 2, "frobnicate"),
        (["list"], 2, "NODEPOOL_PKI_DIR"),
        (["list", "--dir", "{missing}"], 1, "no CA in"),
        (["list", "--dir", "{ca}", "--verbose"], 2, "--verbose"),
        (["init", "--dir", "{ca}"], 1, "already exists"),
        (["init", "--dir", "{tmp}/x", "--trust-domain", "Bad Domain"], 2, "trust domain"),
        (["init", "--dir", "{tmp}/x", "--passphrase", "hunter2"], 2, "--passphrase"),
        (["issue", "client", "Bad_Name", "--dir", "{ca}", "--out", "{tmp}"], 2, "invalid name"),
        (["issue", "node", "n1", "--dir", "{ca}", "--out", "{tmp}"], 2, "--owner"),
        (["issue", "node", "n1", "--owner", "x", "--dir", "{ca}", "--out", "{tmp}"], 2, "username"),
        (["issue", "client", "c1", "--dir", "{ca}"], 2, "--out"),
        (["issue", "client", "c1", "--dir", "{ca}", "--out", "{tmp}", "--days", "0"], 2, "days"),
        (["issue", "client", "c1", "--dir", "{ca}", "--out", "{tmp}", "--days", "x"], 2, "days"),
        (["issue", "server", "s", "--ip", "1.2.3", "--dir", "{ca}", "--out", "{tmp}"], 2, "IP"),
        (["issue", "client", "c1", "--dir", "{ca}", "--out", "{ca}/ca.crt"], 2, "file"),
        (["revoke", "--dir", "{ca}"], 2, "NAME or --serial"),
        (["revoke", "x", "--serial", "ab", "--dir", "{ca}"], 2, "NAME or --serial"),
        (["revoke", "--serial", "xyz", "--dir", "{ca}"], 2, "hexadecimal"),
        (["revoke", "--serial", "0", "--dir", "{ca}"], 2, "hexadecimal"),
        (["revoke", "nobody", "--dir", "{ca}"], 1, "no certificate named nobody"),
        (["revoke", "--serial", "abcdef", "--dir", "{ca}"], 1, "serial abcdef"),
        (["revoke", "c1", "--dir", "{ca}", "--reason", "meh"], 2, "revocation reason"),
        (["crl", "--dir", "{ca}", "--out", "{tmp}/no/such/dir/crl.pem"], 1, "cannot write"),
        (["crl", "--dir", "{ca}", "--out", "{tmp}/c.pem", "--passphrase-file", "{tmp}/x"], 1, "x"),
    ],
)
def test_errors_are_one_line(
    capsys: pytest.CaptureFixture[str],
    ca_dir: Path,
    tmp_path: Path,
    args: list[str],
    status: int,
    text: str,
) -> None:
    values = {"ca": str(ca_dir), "tmp": str(tmp_path), "missing": str(tmp_path / "missing")}
    code, out, err = run(capsys, *(arg.format(**values) for arg in args))
    assert code == status, err
    assert out == ""
    assert_one_line_error(err)
    assert text in err
    # Internals of the CA directory never show up in messages.
    assert "pki.db" not in err
    assert "ca.key" not in err


def test_console_script_errors_without_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODEPOOL_")}
    for args, status in (
        (["list", "--dir", str(tmp_path / "nothing")], 1),
        (["issue", "node", "n1", "--dir", str(tmp_path)], 2),
        (["revoke", "--serial", "not-hex", "--dir", str(tmp_path)], 2),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "pki.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=60,
        )
        assert result.returncode == status
        assert result.stdout == ""
        assert_one_line_error(result.stderr)


def test_help_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "issue", "node", "--help")
    assert status == 0
    assert "--owner" in out
