"""``nodepool-pki``: thin commands over :class:`pki.CertificateAuthority`.

Results go to stdout, notes to stderr, and every failure is a single ``error: ...`` line on
stderr with exit status 2 for usage errors and 1 otherwise. Secrets never come from the
command line: the CA passphrase is read from ``--passphrase-file``,
``NODEPOOL_CA_PASSPHRASE_FILE`` or ``NODEPOOL_CA_PASSPHRASE``, in that order.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography.hazmat.primitives import hashes
from rich.console import Console
from rich.table import Table

from pki.authority import DEFAULT_TRUST_DOMAIN, REVOCATION_REASONS, CertificateAuthority
from pki.errors import InvalidInputError, PkiError
from pki.identity import CertificateKind
from pki.passphrase import PASSPHRASE_ENV, PASSPHRASE_FILE_ENV, read_ca_passphrase
from pki.store import CertificateRecord, CertificateStatus, CertificateStore, format_serial

__all__ = ["cli", "main"]

PROG_NAME = "nodepool-pki"
DIR_ENV = "NODEPOOL_PKI_DIR"
DEBUG_ENV = "NODEPOOL_PKI_DEBUG"
DATABASE_URL_ENV = "NODEPOOL_PKI_DATABASE_URL"

_F = TypeVar("_F", bound=Callable[..., Any])


class _UsageError(click.UsageError):
    """A usage error found after parsing; exits 2 like click's own."""


def _parse_serial(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip().lower().removeprefix("0x").replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{1,64}", text) or int(text, 16) == 0:
        raise click.BadParameter(f"{value!r} is not a hexadecimal serial number", ctx, param)
    return int(text, 16)


def _dir_option(function: _F) -> _F:
    return click.option(
        "--dir",
        "directory",
        type=click.Path(path_type=Path, file_okay=False),
        help=f"CA directory [default: ${DIR_ENV}]",
    )(function)


def _passphrase_file_option(function: _F) -> _F:
    return click.option(
        "--passphrase-file",
        type=click.Path(path_type=Path, dir_okay=False),
        help=f"file holding the CA key passphrase [or ${PASSPHRASE_FILE_ENV}, ${PASSPHRASE_ENV}]",
    )(function)


def _days_option(default: int | None, help_text: str) -> Callable[[_F], _F]:
    return click.option(
        "--days",
        type=click.IntRange(min=1, max=36500),
        default=default,
        show_default=default is not None,
        help=help_text,
    )


def _directory(value: Path | None) -> Path:
    if value is not None:
        return value
    from_env = os.environ.get(DIR_ENV)
    if not from_env:
        raise _UsageError(f"missing --dir (or set {DIR_ENV})")
    return Path(from_env)


def _records(*, create: bool = False) -> CertificateStore | None:
    """The records database named by $NODEPOOL_PKI_DATABASE_URL, else the CA directory's."""
    url = os.environ.get(DATABASE_URL_ENV)
    return CertificateStore.from_url(url, create=create) if url else None


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def _timestamp(value: datetime | None) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _stdout() -> Console:
    console = Console(highlight=False)
    # Piped output keeps whole rows rather than rich's 80-column default.
    return console if console.is_terminal else Console(highlight=False, width=200)


def _note(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nodepool", prog_name="nodepool-pki")
def cli() -> None:
    """Node Pool's certificate authority: issue, revoke and list certificates."""


@cli.command()
@_dir_option
@click.option(
    "--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True, help="SPIFFE trust domain"
)
@_passphrase_file_option
def init(directory: Path | None, trust_domain: str, passphrase_file: Path | None) -> None:
    """Create a new CA in --dir."""
    directory = _directory(directory)
    passphrase = read_ca_passphrase(passphrase_file)
    with CertificateAuthority.init(
        directory, trust_domain, passphrase, store=_records(create=True)
    ) as ca:
        fingerprint = ca.certificate.fingerprint(hashes.SHA256()).hex(":").upper()
    click.echo(f"created CA for spiffe://{trust_domain} in {directory}")
    click.echo(f"CA certificate: {directory / 'ca.crt'}")
    click.echo(f"SHA-256 fingerprint: {fingerprint}")
    if passphrase is None:
        _note(f"note: the CA key is not encrypted (set {PASSPHRASE_ENV} or use a passphrase file)")


@cli.group()
def issue() -> None:
    """Issue a server, node or client certificate and its key."""


def _issue_options(default_days: int) -> Callable[[_F], _F]:
    def decorate(function: _F) -> _F:
        function = _passphrase_file_option(function)
        function = click.option(
            "--allow-reissue",
            is_flag=True,
            help="issue even if the name was revoked or still has a valid certificate",
        )(function)
        function = _days_option(default_days, "lifetime in days")(function)
        function = click.option(
            "--out",
            type=click.Path(path_type=Path, file_okay=False),
            required=True,
            help="directory for NAME.crt, NAME.key and ca.crt",
        )(function)
        return _dir_option(function)

    return decorate


def _issue(
    kind: CertificateKind,
    name: str,
    *,
    directory: Path | None,
    out: Path,
    days: int,
    passphrase_file: Path | None,
    allow_reissue: bool,
    owner: str | None = None,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
) -> None:
    directory = _directory(directory)
    passphrase = read_ca_passphrase(passphrase_file)
    with CertificateAuthority.open(directory, passphrase, store=_records()) as ca:
        issued = ca.issue(
            kind,
            name,
            out,
            owner=owner,
            dns_names=dns_names,
            ip_addresses=ip_addresses,
            lifetime=timedelta(days=days),
            allow_reissue=allow_reissue,
        )
    click.echo(f"issued {kind} certificate {name}")
    click.echo(f"  identity: {issued.spiffe_id}")
    if owner is not None:
        click.echo(f"  owner:    {owner}")
    click.echo(f"  serial:   {format_serial(issued.serial)}")
    click.echo(f"  expires:  {_timestamp(issued.not_after)}")
    click.echo(f"  files:    {issued.cert_path} {issued.key_path} {issued.ca_path}")


@issue.command("server")
@click.argument("name")
@click.option("--dns", "dns_names", multiple=True, metavar="H", help="DNS name (repeatable)")
@click.option("--ip", "ip_addresses", multiple=True, metavar="A", help="IP address (repeatable)")
@_issue_options(default_days=366)
def issue_server(
    name: str,
    dns_names: tuple[str, ...],
    ip_addresses: tuple[str, ...],
    directory: Path | None,
    out: Path,
    days: int,
    allow_reissue: bool,
    passphrase_file: Path | None,
) -> None:
    """Issue a server certificate (serverAuth) for NAME."""
    _issue(
        CertificateKind.SERVER,
        name,
        directory=directory,
        out=out,
        days=days,
        passphrase_file=passphrase_file,
        allow_reissue=allow_reissue,
        dns_names=dns_names,
        ip_addresses=ip_addresses,
    )


@issue.command("node")
@click.argument("node_id", metavar="NODE_ID")
@click.option("--owner", required=True, metavar="USERNAME", help="user who owns the node")
@_issue_options(default_days=7)
def issue_node(
    node_id: str,
    owner: str,
    directory: Path | None,
    out: Path,
    days: int,
    allow_reissue: bool,
    passphrase_file: Path | None,
) -> None:
    """Issue a short-lived node certificate (clientAuth) for NODE_ID."""
    _issue(
        CertificateKind.NODE,
        node_id,
        directory=directory,
        out=out,
        days=days,
        passphrase_file=passphrase_file,
        allow_reissue=allow_reissue,
        owner=owner,
    )


@issue.command("client")
@click.argument("name")
@_issue_options(default_days=90)
def issue_client(
    name: str,
    directory: Path | None,
    out: Path,
    days: int,
    allow_reissue: bool,
    passphrase_file: Path | None,
) -> None:
    """Issue a client device certificate (clientAuth) for NAME."""
    _issue(
        CertificateKind.CLIENT,
        name,
        directory=directory,
        out=out,
        days=days,
        passphrase_file=passphrase_file,
        allow_reissue=allow_reissue,
    )


@cli.command()
@click.argument("name", required=False)
@click.option(
    "--serial",
    metavar="HEX",
    callback=_parse_serial,
    help="serial number of the certificate, in hex",
)
@_dir_option
@click.option(
    "--reason",
    default="unspecified",
    show_default=True,
    help=f"RFC 5280 reason: {', '.join(REVOCATION_REASONS)}",
)
def revoke(name: str | None, serial: int | None, directory: Path | None, reason: str) -> None:
    """Revoke every certificate named NAME, or the one with --serial."""
    if (name is None) == (serial is None):
        raise _UsageError("give either NAME or --serial")
    directory = _directory(directory)
    # Revoking needs the records, not the CA key: it must work in an emergency.
    with CertificateAuthority.open(directory, store=_records()) as ca:
        revoked = ca.revoke(name=name, serial=serial, reason=reason, actor=_actor())
    target = name if name is not None else f"serial {format_serial(serial or 0)}"
    if not revoked:
        _note(f"note: {target} was already revoked; nothing to do")
        return
    for record in revoked:
        click.echo(
            f"revoked {record.kind} certificate {record.name} "
            f"(serial {format_serial(record.serial)}, reason {record.revocation_reason})"
        )
    _note("note: run `nodepool-pki crl` to publish a new CRL")


@cli.command("list")
@_dir_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable JSON output")
def list_(directory: Path | None, as_json: bool) -> None:
    """List issued certificates and their status."""
    directory = _directory(directory)
    with CertificateAuthority.open(directory, store=_records()) as ca:
        records = ca.list_certificates()
    now = datetime.now(UTC)
    if as_json:
        click.echo(json.dumps([_record_json(record, now) for record in records], indent=2))
        return
    if not records:
        _note("no certificates issued yet")
        return
    table = Table("kind", "name", "owner", "serial", "not after", "status")
    styles = {
        CertificateStatus.VALID: "green",
        CertificateStatus.EXPIRED: "yellow",
        CertificateStatus.REVOKED: "red",
    }
    for record in records:
        status = record.status(now)
        table.add_row(
            record.kind.value,
            record.name,
            record.owner or "-",
            format_serial(record.serial),
            _timestamp(record.not_after),
            f"[{styles.get(status, 'default')}]{status.value}[/]",
        )
    _stdout().print(table)


def _record_json(record: CertificateRecord, now: datetime) -> dict[str, str | None]:
    return {
        "kind": record.kind.value,
        "name": record.name,
        "owner": record.owner,
        "serial": format_serial(record.serial),
        "spiffe_id": record.spiffe_id,
        "not_before": _timestamp(record.not_before),
        "not_after": _timestamp(record.not_after),
        "status": record.status(now).value,
        "revoked_at": _timestamp(record.revoked_at),
        "revocation_reason": record.revocation_reason,
    }


@cli.command()
@_dir_option
@click.option(
    "--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="CRL file"
)
@_days_option(7, "days until the CRL's nextUpdate")
@_passphrase_file_option
def crl(directory: Path | None, out: Path, days: int, passphrase_file: Path | None) -> None:
    """Write a signed CRL of every revoked certificate."""
    directory = _directory(directory)
    passphrase = read_ca_passphrase(passphrase_file)
    with CertificateAuthority.open(directory, passphrase, store=_records()) as ca:
        ca.write_crl(out, lifetime=timedelta(days=days))
    click.echo(f"wrote CRL to {out}")


def _error(message: str, status: int) -> int:
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI and returns its exit status; never lets a traceback reach the user."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = cli.main(args=args, prog_name=PROG_NAME, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else PROG_NAME
        return _error(f"missing command (see {command} --help)", 2)
    except click.UsageError as exc:
        return _error(exc.format_message(), 2)
    except click.ClickException as exc:
        return _error(exc.format_message(), exc.exit_code or 1)
    except click.Abort as exc:
        # click turns Ctrl-C at a prompt into Abort; a shell reports Ctrl-C as 130.
        if isinstance(exc.__cause__ or exc.__context__, EOFError):
            return _error("no input (end of file at a prompt)", 1)
        return _error("interrupted", 130)
    except InvalidInputError as exc:
        return _error(str(exc), 2)
    except PkiError as exc:
        return _error(str(exc), 1)
    except KeyboardInterrupt:
        return _error("interrupted", 130)
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        if isinstance(exc, OSError) and exc.strerror:
            return _error(exc.strerror, 1)
        return _error(f"unexpected internal error ({type(exc).__name__}; set {DEBUG_ENV}=1)", 1)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
